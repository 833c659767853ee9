"""FSDP learners (ray.learner_parallelism=fsdp): two replicas over gloo end with DDP's weights after the same steps
(DDPO, NFT, DRaFT), publish identical full weights while each holds about half the parameters, checkpoint in DDP's
format and resume exactly; a run through the CLI with Ray and its resumption; and the combinations refused."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlft.checkpoint import Checkpoint, Checkpointer, committed
from rlft.config import compose, to_dict
from rlft.learner import Learner
from rlft.rollout import RolloutGroup, RolloutWorker, derive_seed
from tests.helpers import TINY_OVERRIDES


def spawn(target, out: Path, *args) -> list[dict]:
    """`target(rank, *args, init_file, out_dir)` in two processes; what each rank saved in out/rank<r>.pt."""
    import torch.multiprocessing as mp

    mp.spawn(target, args=(*args, str(out / "init"), str(out)), nprocs=2)
    return [torch.load(out / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def replica(model_dir: str, overrides: list[str], parallelism: str, rank: int) -> tuple[Learner, RolloutWorker]:
    """Learner replica `rank` of two on the tiny model, and its own rollout worker (its own trajectories)."""
    cfg = compose([f"env.base_model={model_dir}", *overrides, "ray.num_learners=2",
                   f"ray.learner_parallelism={parallelism}"])  # fmt: skip
    return Learner(cfg, torch.device("cpu"), rank, world_size=2), RolloutWorker(cfg, rank)


def in_process_group(rank: int, init_file: str, work) -> None:
    """`work()` in a gloo process group of two, then leave as tests/test_pipeline.py's replicas do (no destructors
    racing gloo's worker threads). A collective that one replica never joins fails within two minutes, not never."""
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))  # fmt: skip
    try:
        work()
    finally:
        dist.destroy_process_group()
    os._exit(0)


def epochs(learner: Learner, worker: RolloutWorker, rank: int, first: int, end: int) -> dict[str, torch.Tensor]:
    """Epochs first..end-1 of publish, collect 16 trajectories, ingest and update (tests/test_scale_out.py's
    two_epochs), each replica on seeds of its own; returns the weights published last."""
    group = RolloutGroup([worker])
    for epoch in range(first, end):
        published = learner.policy.trainable_state_dict()
        group.publish(published, learner.policy_version)
        learner.ingest(group.collect(learner.policy_version, derive_seed(7, epoch, rank), 16))
        learner.update()
    return published


def _ddpo_on_rank(rank: int, model_dir: str, overrides: list[str], init_file: str, out_dir: str) -> None:
    """Two epochs of DDP learners, then two of FSDP learners from the same base weights on the same seeds, each
    checkpointing after them; the FSDP one takes a third epoch, and a new FSDP learner, then a new DDP learner,
    resume its checkpoint and take that epoch again."""

    def checkpointer(learner: Learner, name: str) -> Checkpointer:
        return Checkpointer(f"{out_dir}/{name}", every=1, keep=1, config_hash="h", config=to_dict(learner.spec),
                            signature={})  # fmt: skip

    def work() -> None:
        from rlft.fsdp import local_numel

        results = {}
        ddp, worker = replica(model_dir, overrides, "ddp", rank)
        results["base"] = ddp.policy.trainable_state_dict()
        epochs(ddp, worker, rank, 0, 2)
        results["ddp"] = ddp.policy.trainable_state_dict()
        checkpointer(ddp, "ddp").save(ddp, 2)

        fsdp, worker = replica(model_dir, overrides, "fsdp", rank)
        results["numel"] = torch.tensor([local_numel(fsdp.policy), sum(p.numel() for p in fsdp.policy.parameters())])
        results["fsdp_published"] = epochs(fsdp, worker, rank, 0, 2)  # what its worker sampled epoch 2 with
        results["fsdp"] = fsdp.policy.trainable_state_dict()
        checkpointer(fsdp, "fsdp").save(fsdp, 2)
        results["exp_avg_shard"] = fsdp.ctx.optimizer.state_dict()["state"][0]["exp_avg"].to_local()
        epochs(fsdp, worker, rank, 2, 3)
        results["third"] = fsdp.policy.trainable_state_dict()

        resumed, worker = replica(model_dir, overrides, "fsdp", rank)
        assert checkpointer(resumed, "fsdp").restore(resumed) == 2
        epochs(resumed, worker, rank, 2, 3)
        results["resumed_third"] = resumed.policy.trainable_state_dict()
        switched, worker = replica(model_dir, overrides, "ddp", rank)  # DDP learners resume it as well
        assert checkpointer(switched, "fsdp").restore(switched) == 2
        epochs(switched, worker, rank, 2, 3)
        results["switched_third"] = switched.policy.trainable_state_dict()
        torch.save(results, f"{out_dir}/rank{rank}.pt")

    in_process_group(rank, init_file, work)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddpo_replicas(tiny_model_dir, tmp_path_factory) -> tuple[dict, dict, Path]:
    """What each of two replicas recorded in _ddpo_on_rank, and the folder of their checkpoints: DDPO on the tiny DDPM
    with its KL to the base model (a frozen reference network, sharded too), 16 trajectories per replica per epoch,
    2 optimizer steps per epoch."""
    out = tmp_path_factory.mktemp("fsdp_ddpo")
    first, second = spawn(_ddpo_on_rank, out, str(tiny_model_dir), [*TINY_OVERRIDES, "trainer.samples_per_epoch=32"])
    return first, second, out


def test_fsdp_learners_end_with_ddps_weights_and_publish_identical_full_weights(ddpo_replicas):
    first, second, _ = ddpo_replicas
    update = max_difference(first["ddp"], first["base"])
    difference = max_difference(first["fsdp"], first["ddp"])
    print(f"FSDP vs DDP after 4 DDPO steps: max |difference| {difference:.3g}, max |update| {update:.3g}")
    assert update > 1e-4  # the steps changed the weights
    assert difference < 1e-5 and difference < 1e-2 * update
    assert first["fsdp"].keys() == first["base"].keys() and all(v.device.type == "cpu" for v in first["fsdp"].values())
    for name in ("ddp", "fsdp", "fsdp_published", "third", "resumed_third"):  # the replicas agree bit for bit
        assert max_difference(first[name], second[name]) == 0.0, name


def test_each_fsdp_replica_holds_about_half_of_the_parameters_and_of_the_optimizer_state(ddpo_replicas):
    first, second, _ = ddpo_replicas
    (local_0, total), (local_1, total_1) = first["numel"].tolist(), second["numel"].tolist()
    assert total == total_1 and local_0 + local_1 == total  # the network and its frozen reference, split in two
    assert abs(local_0 - total / 2) < 0.01 * total and abs(local_1 - total / 2) < 0.01 * total
    # AdamW's first moment of the first parameter (the input convolution's 8 output channels): 4 channels each
    channels = first["ddp"]["unet.conv_in.weight"].shape[0]
    assert first["exp_avg_shard"].shape[0] == second["exp_avg_shard"].shape[0] == channels // 2


def test_an_fsdp_checkpoint_is_a_ddp_checkpoint_and_resumes_exactly(ddpo_replicas):
    first, _, out = ddpo_replicas
    ddp, fsdp = (Checkpoint.open(committed(out / name / "checkpoints")[-1]) for name in ("ddp", "fsdp"))
    assert ddp.state["files"].keys() == fsdp.state["files"].keys()  # weights, optimizer, each replica's part
    (ddp_weights, ddp_optimizer), (fsdp_weights, fsdp_optimizer) = ddp.shared(), fsdp.shared()
    assert max_difference(fsdp_weights, first["fsdp"]) == 0.0  # full tensors, not one replica's shards
    assert max_difference(fsdp_weights, ddp_weights) < 1e-5
    assert fsdp_optimizer["state"].keys() == ddp_optimizer["state"].keys()
    for index, state in ddp_optimizer["state"].items():  # the full AdamW state, indexed as DDP's
        assert fsdp_optimizer["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert fsdp_optimizer["state"][index][key].shape == value.shape
            assert (fsdp_optimizer["state"][index][key] - value).abs().max() <= 1e-6 + 1e-3 * value.abs().max()
    # a third epoch from the checkpoint (weights, sharded optimizer state, RNG, buffer) is the uninterrupted one's
    assert max_difference(first["third"], first["fsdp"]) > 0
    assert max_difference(first["resumed_third"], first["third"]) == 0.0
    assert max_difference(first["switched_third"], first["third"]) < 1e-5  # ray.learner_parallelism is operational


def uneven_stale_updates(learner: Learner, worker: RolloutWorker, rank: int) -> None:
    """Replica 0 holds 16 trajectories, replica 1 holds 8; both are trained on once fresh (one minibatch of 8, the
    fewest any replica has), then once stale (trainer.max_staleness=1), when their proximal log-probabilities are
    recomputed: 2 network calls per timestep on replica 0, 1 on replica 1, which FSDP evens out with a spare call."""
    batches = [(f"rank{rank}-{i}", worker.collect(0, derive_seed(9, rank, i), 8)) for i in range(2 - rank)]
    learner.ingest(batches)
    learner.update()
    learner.update()


def draft_updates(learner: Learner, worker: RolloutWorker, rank: int) -> None:
    """DRaFT samples for itself: two updates of one differentiable sampling pass each, gradient checkpointing on."""
    learner.update()
    learner.update()


def nft_epochs(learner: Learner, worker: RolloutWorker, rank: int) -> None:
    epochs(learner, worker, rank, 0, 2)


def _compare_on_rank(rank: int, model_dir: str, overrides: list[str], steps, init_file: str, out_dir: str) -> None:
    """`steps(learner, worker, rank)` on a DDP learner, then on an FSDP learner from the same base weights and seeds."""

    def work() -> None:
        results = {}
        for parallelism in ("ddp", "fsdp"):
            learner, worker = replica(model_dir, overrides, parallelism, rank)
            results.setdefault("base", learner.policy.trainable_state_dict())
            steps(learner, worker, rank)
            results[parallelism] = learner.policy.trainable_state_dict()
        torch.save(results, f"{out_dir}/rank{rank}.pt")

    in_process_group(rank, init_file, work)


TINY_DRAFT = [o for o in TINY_OVERRIDES if not o.startswith("algo.minibatch_size")]  # DRaFT has no minibatches
COMPARED = {
    "ddpo-stale-rows-uneven": ("model", uneven_stale_updates, [*TINY_OVERRIDES, "trainer.samples_per_epoch=32",
                                                              "trainer.max_staleness=1"]),
    "draft": ("model", draft_updates, ["algo=draft", *TINY_DRAFT, "env.num_inference_steps=4"]),
    "nft": ("flow", nft_epochs, ["algo=nft", "env=flow", *TINY_OVERRIDES, "trainer.samples_per_epoch=32",
                                 "env.num_inference_steps=3", "algo.group_size=2"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(COMPARED))
def test_fsdp_learners_take_ddps_steps(case, tiny_model_dir, tiny_flow_dir, tmp_path):
    model, steps, overrides = COMPARED[case]
    model_dir = tiny_model_dir if model == "model" else tiny_flow_dir
    first, second = spawn(_compare_on_rank, tmp_path, str(model_dir), overrides, steps)
    update, difference = max_difference(first["ddp"], first["base"]), max_difference(first["fsdp"], first["ddp"])
    print(f"{case}: FSDP vs DDP max |difference| {difference:.3g}, max |update| {update:.3g}")
    assert update > 1e-5 and difference < 1e-5 and difference < 2e-2 * update
    assert max_difference(first["fsdp"], second["fsdp"]) == 0.0


@pytest.mark.parametrize("overrides, message", [
    (["ray.num_learners=1"], "ray.learner_parallelism=fsdp shards the network across learners, and "
     "ray.num_learners=1: set ray.num_learners=2 (or more), or ray.learner_parallelism=ddp"),
    (["policy.lora_rank=4"], "ray.learner_parallelism=fsdp shards a fully fine-tuned network, and policy.lora_rank=4 "
     "trains small LoRA adapters that every learner can hold: use ray.learner_parallelism=ddp for LoRA (or "
     "policy.lora_rank=0)"),
    (["policy.compile=true"], "ray.learner_parallelism=fsdp runs the sharded network eager, and policy.compile=true "
     "compiles it unsharded: set policy.compile=false, or ray.learner_parallelism=ddp"),
    (["algo=deft", "env=digits_sr", "reward=measurement", "judge=none"], "algo=deft trains a small h-transform beside "
     "a frozen base network, and ray.learner_parallelism=fsdp shards a network that is fully fine-tuned: use "
     "ray.learner_parallelism=ddp"),
])  # fmt: skip
def test_fsdp_refuses_what_it_cannot_shard_with_one_line(overrides, message, tiny_model_dir, tmp_path, monkeypatch):
    from rlft.run import main

    monkeypatch.chdir(tmp_path)
    model = [] if "algo=deft" in overrides else [f"env.base_model={tiny_model_dir}"]  # DEFT: the shipped digits DDPM
    with pytest.raises(SystemExit) as refused:
        main([*model, *TINY_OVERRIDES, "ray.num_learners=2", "ray.learner_parallelism=fsdp", *overrides])
    assert str(refused.value) == f"rlft: {message}"
    assert not list(tmp_path.iterdir())  # refused before anything started


@pytest.mark.slow
def test_an_fsdp_run_through_the_cli_and_its_resumption(tiny_model_dir, tmp_path, monkeypatch):
    """Two epochs with 2 FSDP learners and 2 rollout actors through Ray; the same run stopped after its first epoch
    (a copy of the folder without what came later) resumes and ends with the same weights, bit for bit."""
    import ray

    from rlft.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "")
    overrides = [f"env.base_model={tiny_model_dir}", *TINY_OVERRIDES, "env.num_inference_steps=4", "eval.every=2",
                 "trainer.checkpoint_every=1", "trainer.epochs=2", "ray.num_learners=2", "ray.num_rollout_workers=2",
                 "ray.learner_parallelism=fsdp", "ray.num_cpus=4"]  # fmt: skip
    try:
        run_dir = main([*overrides, "logging.run_dir=runs/fsdp"])
        stopped = tmp_path / "runs" / "stopped"
        shutil.copytree(run_dir, stopped, ignore=shutil.ignore_patterns("final", "epoch_000002", ".lock", "ray"))
        resumed = main([*overrides, "logging.run_dir=runs/stopped", "resume=runs/stopped"])
    finally:
        ray.shutdown()
    assert resumed == stopped.resolve()
    final = load_file(str(run_dir / "final" / "policy.safetensors"))
    assert max_difference(load_file(str(stopped / "final" / "policy.safetensors")), final) == 0.0
    first = Checkpoint.open(committed(run_dir / "checkpoints")[0]).shared()[0]
    assert first.keys() == final.keys() and max_difference(first, final) > 0
    for folder in (run_dir, stopped):  # both FSDP replicas hold the same full weights after every epoch
        checksums = {}
        for line in (folder / "replicas.jsonl").read_text().splitlines():
            record = json.loads(line)
            checksums.setdefault(record["epoch"], set()).add(record["weights_sha256"])
        assert sorted(checksums) == [1, 2] and all(len(c) == 1 for c in checksums.values())
