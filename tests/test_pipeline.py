"""The run end to end: the driver through real Ray as a subprocess, the single-process loop, the learner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlft.learner import Learner
from rlft.rollout import RolloutGroup, RolloutWorker
from rlft.run import main
from tests.helpers import run_rlft, tiny_cfg

TINY = ["env.num_inference_steps=4", "trainer.rollout_batch_size=8", "trainer.samples_per_epoch=16",
        "algo.minibatch_size=8", "eval.num_samples=8", "eval.every=1", "ray.rollout_threads=1", "ray.learner_threads=1",
        "logging.wandb=disabled"]  # fmt: skip


def check_run_folder(run_dir: Path, epochs: int) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in lines if "reward/mean" in m]
    eval_lines = [m for m in lines if "eval/reward_mean" in m]
    assert [m["epoch"] for m in train_lines] == list(range(1, epochs + 1))
    assert [m["epoch"] for m in eval_lines] == list(range(0, epochs + 1))
    assert all(m["policy_version"] == m["epoch"] for m in train_lines)
    assert {"loss/policy", "ddpo/approx_kl", "ddpo/clip_fraction", "perf/samples_per_s"} <= set(train_lines[0])
    assert all(m["perf/update_preemptions"] >= 0 for m in train_lines)  # reported every epoch, as a count
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"epoch_{e:04d}.png" for e in range(epochs + 1)]
    assert (run_dir / "reward_curve.png").stat().st_size > 1000
    assert (run_dir / "final" / "policy.safetensors").stat().st_size > 1000
    assert "algo:" in (run_dir / "config.yaml").read_text()
    return train_lines


@pytest.mark.slow
def test_run_through_real_ray_as_a_subprocess(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    run_rlft(f"env.base_model={tiny_model_dir}", f"logging.run_dir={run_dir}", "trainer.epochs=2", "ray.num_cpus=4",
             *TINY)  # fmt: skip
    check_run_folder(run_dir, epochs=2)


@pytest.mark.slow
def test_adjoint_matching_through_real_ray(tiny_model_dir, tmp_path):
    """Rollout actors hold the frozen base and attach lean adjoints; the learner makes its buffered passes."""
    run_dir = tmp_path / "run"
    run_rlft("algo=adjoint_matching", "algo.passes_per_buffer=2", f"env.base_model={tiny_model_dir}",
             f"logging.run_dir={run_dir}", "trainer.epochs=1", "ray.num_cpus=4", *TINY)  # fmt: skip
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "reward/mean" in m]
    assert len(train) == 1 and train[0]["am/passes"] == 2 and train[0]["train/optimizer_steps"] == 4
    assert 0 < train[0]["am/ess_fraction"] <= 1 and train[0]["am/final_adjoint_norm"] > 0


def test_single_process_run_writes_the_same_outputs_and_an_offline_wandb_run(tiny_model_dir, tmp_path):
    run_dir = main([f"env.base_model={tiny_model_dir}", f"logging.run_dir={tmp_path / 'run'}", "trainer.epochs=2",
                    "ray.enabled=false", "logging.progress=false", *TINY, "logging.wandb=offline"])  # fmt: skip
    metrics = check_run_folder(run_dir, epochs=2)
    assert all(m["reward/nonfinite"] == 0 for m in metrics)
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_config_errors_stop_before_anything_starts(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rlft.run", "trainer.epoch=3"], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)  # fmt: skip
    assert result.returncode != 0
    assert "unknown config key 'trainer.epoch'; did you mean 'trainer.epochs'?" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_non_finite_rewards_are_counted_and_kept_out_of_the_update(tiny_model_dir):
    cfg = tiny_cfg(tiny_model_dir)
    batch = RolloutWorker(cfg).collect(0, seed=0, n=8)
    batch["reward"][2] = float("nan")
    batch["reward_finite"][2] = False
    learner = Learner(cfg, torch.device("cpu"))
    metrics = learner.ingest([("only", batch)])
    assert metrics["reward/nonfinite"] == 1
    assert len(learner.buffer) == 7 and torch.isfinite(learner.buffer.contents()["advantage"]).all()
    assert metrics["reward/mean"] == pytest.approx(batch["reward"][batch["reward_finite"]].mean().item())


def _ingest_on_rank(rank: int, model_dir: str, init_file: str, out_dir: str) -> None:
    """One of two DDP learner replicas (gloo, no Ray) ingesting its own batch; rank 1's holds a NaN reward."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = tiny_cfg(model_dir)
        batch = RolloutWorker(cfg).collect(0, seed=10 + rank, n=8)
        if rank == 1:
            batch["reward"][3], batch["reward_finite"][3] = float("nan"), False
        learner = Learner(cfg, torch.device("cpu"), rank, world_size=2)
        learner.ingest([(f"rank-{rank}", batch)])
        stored = learner.buffer.contents()
        torch.save({"reward": stored["reward"], "advantage": stored["advantage"]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # The results are saved, so the replica leaves without running destructors: freeing the learner's DDP reducer
    # joins gloo's worker thread while holding the GIL, and that thread can still be freeing the all-gather's tensors,
    # which needs the GIL (a deadlock seen once: main thread in ~ProcessGroupGloo, worker in ~AsyncAllgatherWork).
    os._exit(0)


def test_ddpo_advantages_with_two_learners_use_the_whole_epochs_rewards(tiny_model_dir, tmp_path):
    """Each replica keeps its own rows, standardised with the mean and std of both replicas' finite rewards."""
    import torch.multiprocessing as mp

    mp.spawn(_ingest_on_rank, args=(str(tiny_model_dir), str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    shards = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [len(shard["reward"]) for shard in shards] == [8, 7]  # the NaN row stayed out
    rewards = torch.cat([shard["reward"] for shard in shards]).float()
    expected = ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)).clamp(-5, 5)
    advantages = torch.cat([shard["advantage"] for shard in shards])
    torch.testing.assert_close(advantages, expected)
    # not what one shard's statistics would give
    own = (shards[0]["reward"] - shards[0]["reward"].mean()) / shards[0]["reward"].std(unbiased=False)
    assert (shards[0]["advantage"] - own).abs().max() > 1e-3


def test_a_retried_collect_reproduces_the_batch_and_is_not_stored_twice(tiny_model_dir):
    cfg = tiny_cfg(tiny_model_dir)
    group = RolloutGroup([RolloutWorker(cfg)])
    first, again = group.collect(0, seed=3, n=8), group.collect(0, seed=3, n=8)
    assert first[0][0] == again[0][0]
    assert torch.equal(first[0][1]["latents"], again[0][1]["latents"])
    learner = Learner(cfg, torch.device("cpu"))
    learner.ingest(first)
    metrics = learner.ingest(again)
    assert metrics["buffer/duplicates"] == 1 and len(learner.buffer) == 8


def test_workers_refuse_to_collect_with_weights_they_do_not_hold(tiny_model_dir):
    worker = RolloutWorker(tiny_cfg(tiny_model_dir))
    with pytest.raises(RuntimeError, match="holds policy version 0 but was asked to collect with version 3"):
        worker.collect(3, seed=0, n=8)
