"""The run end to end: the driver through real Ray as a subprocess, the single-process loop, the learner."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlft.checkpoint import Checkpoint, committed
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
    assert all(0 < m["perf/publish_s"] < m["perf/update_s"] for m in train_lines)  # the weight sync, within the update
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [f"epoch_{e:04d}.png" for e in range(epochs + 1)]
    assert (run_dir / "reward_curve.png").stat().st_size > 1000
    assert (run_dir / "final" / "policy.safetensors").stat().st_size > 1000
    assert "algo:" in (run_dir / "config.yaml").read_text()
    return train_lines


# what Ray prints on the driver's terminal when the workers' logs are forwarded to it ("(TrainController pid=...)")
RAY_LOG_PREFIXES = ("(TrainController", "(RayTrainWorker", "(RolloutWorker", "(RewardServer", "(raylet)")


def assert_quiet(output: str) -> None:
    """A run's terminal output holds what rlft says, no traceback and no Ray worker log lines."""
    assert "Traceback" not in output, output[-4000:]
    leaked = [line for line in output.splitlines() if any(prefix in line for prefix in RAY_LOG_PREFIXES)]
    assert not leaked, leaked[:5]


@pytest.mark.slow
def test_run_through_real_ray_as_a_subprocess(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_rlft(f"env.base_model={tiny_model_dir}", f"logging.run_dir={run_dir}", "trainer.epochs=2",
                      "ray.num_cpus=4", *TINY)  # fmt: skip
    check_run_folder(run_dir, epochs=2)
    assert_quiet(result.stdout + result.stderr)  # the default run: a progress bar and rlft's own lines
    assert f"rlft: run folder {run_dir}" in result.stdout and f"rlft: done; results in {run_dir}" in result.stdout


RAY_ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}


def start_rlft(args: list[str], cwd: Path, output: Path) -> subprocess.Popen:
    """`python -m rlft.run ARGS` in `cwd`, in a process group of its own (as a terminal's job), output to a file."""
    with open(output, "w") as sink:
        return subprocess.Popen([sys.executable, "-m", "rlft.run", *args], cwd=cwd, env=RAY_ENV, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def wait_for(condition, process: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def trained_epochs(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [m["epoch"] for m in lines if "policy_version" in m]


@pytest.mark.slow
def test_a_ray_run_in_a_relative_folder_is_killed_and_resumed_from_the_same_working_directory(tiny_model_dir,
                                                                                              tmp_path):  # fmt: skip
    """logging.run_dir=runs/x means <working directory>/runs/x for every process of the run (Ray Train's learners
    run in Ray's session folder): the checkpoints land there, and resume=runs/x finds them."""
    epochs, args = 4, [f"env.base_model={tiny_model_dir}", *TINY, "ray.num_cpus=4", "logging.progress=false",
                       "trainer.checkpoint_every=1"]  # fmt: skip
    run_dir = tmp_path / "runs" / "x"
    process = start_rlft([*args, "logging.run_dir=runs/x", f"trainer.epochs={epochs}"], tmp_path, tmp_path / "1.txt")
    try:
        wait_for(lambda: committed(run_dir / "checkpoints"), process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, (tmp_path / "1.txt").read_text()[-3000:]
    stopped_at = Checkpoint.open(committed(run_dir / "checkpoints")[-1]).epoch
    assert 1 <= stopped_at < epochs and not (run_dir / "final").exists()

    resumed = start_rlft([*args, "resume=runs/x", f"trainer.epochs={epochs}"], tmp_path, tmp_path / "2.txt")
    assert resumed.wait(timeout=400) == 0, (tmp_path / "2.txt").read_text()[-3000:]
    output = (tmp_path / "2.txt").read_text()
    assert re.search(rf"rlft: resuming {re.escape(str(run_dir))} from epoch_\d+ \(epoch \d+\)", output), output
    assert_quiet(output)
    assert trained_epochs(run_dir) == list(range(1, epochs + 1))  # appended after the checkpoint, no repeats
    assert (run_dir / "final" / "policy.safetensors").stat().st_size > 1000
    checkpoints = {p.parent for p in tmp_path.rglob("epoch_0*") if p.is_dir()}
    assert checkpoints == {run_dir / "checkpoints"}  # nowhere else (not in Ray's session or Train's folders)


@pytest.mark.slow
def test_ctrl_c_stops_a_ray_run_after_its_epoch_with_a_checkpoint_and_one_line(tiny_model_dir, tmp_path):
    run_dir, output_file = tmp_path / "run", tmp_path / "output.txt"
    process = start_rlft([f"env.base_model={tiny_model_dir}", f"logging.run_dir={run_dir}", *TINY, "ray.num_cpus=4",
                          "trainer.epochs=30"], tmp_path, output_file)  # fmt: skip
    try:
        wait_for(lambda: trained_epochs(run_dir), process)
        assert process.poll() is None, output_file.read_text()[-3000:]
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal: SIGINT to the whole foreground process group
        code = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = output_file.read_text()
    assert code == 0, output[-4000:]  # a requested stop is a clean end: the run can be resumed
    assert_quiet(output)
    stopped = [line for line in output.splitlines() if "rlft: stopped" in line]
    assert len(stopped) == 1, output[-4000:]
    epoch = int(re.fullmatch(r"rlft: stopped after epoch (\d+), with a checkpoint; continue with `python -m rlft.run "
                             rf"resume={re.escape(str(run_dir))}`", stopped[0].strip()).group(1))  # fmt: skip
    assert 1 <= epoch < 30 and trained_epochs(run_dir)[-1] == epoch
    assert Checkpoint.open(committed(run_dir / "checkpoints")[-1]).epoch == epoch
    assert not (run_dir / "final").exists() and "rlft: done" not in output


@pytest.mark.parametrize("module", ["rlft.run", "rlft.tune", "rlft.pretrain", "rlft.evaluate"])
def test_every_command_has_help(module, tmp_path):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path, env=RAY_ENV)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"usage: python -m {module} "), result.stdout[:500]
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())  # it writes nothing


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
