"""Many workers and their faults, through real Ray: DDP learners in sync, a learner and a rollout actor dying, a
rollout actor hanging."""

import os
import signal
import sys
import time
from collections import defaultdict

import pytest
import ray
import torch

from rlft.checkpoint import Checkpoint, committed
from rlft.learner import Learner
from rlft.pipeline import RayCall, fit_learners, init_ray, share_weights, start_rollout_actors
from rlft.rollout import RolloutGroup, RolloutWorker, derive_seed
from tests.helpers import TINY_OVERRIDES, read_jsonl, run_with_fault, tiny_cfg

pytestmark = pytest.mark.slow


def test_two_learners_stay_identical_consume_each_batch_once_and_survive_a_learner_death(tiny_model_dir, tmp_path):
    epochs, run_dir = 4, tmp_path / "run"
    command = [sys.executable, "-m", "rlft.run", f"env.base_model={tiny_model_dir}", f"logging.run_dir={run_dir}",
               "env.num_inference_steps=4", "trainer.rollout_batch_size=8", "trainer.samples_per_epoch=32",
               "algo.minibatch_size=8", "eval.num_samples=8", "eval.every=2", "ray.rollout_threads=1",
               "ray.learner_threads=1", "logging.wandb=disabled", "logging.progress=false", f"trainer.epochs={epochs}",
               "trainer.checkpoint_every=1", "ray.num_learners=2", "ray.num_rollout_workers=2", "ray.num_cpus=6",
               "ray.max_learner_failures=1"]  # fmt: skip
    killed: list[int] = []

    def kill_rank_1() -> bool:  # learner rank 1, once, after it finished epoch 2 (a checkpoint follows)
        ready = [r for r in read_jsonl(run_dir / "replicas.jsonl") if r["rank"] == 1 and r["epoch"] == 2]
        if ready:
            killed.append(ready[0]["pid"])
            os.kill(ready[0]["pid"], signal.SIGKILL)
        return bool(ready)

    run_with_fault(command, kill_rank_1, timeout_s=400)

    records = read_jsonl(run_dir / "replicas.jsonl")
    pids = {(r["rank"], r["pid"]) for r in records}
    assert len({pid for rank, pid in pids if rank == 1}) == 2, "learner rank 1 was not restarted"
    # DDP replicas hold the same weights after every epoch, and a re-run epoch reproduces them exactly
    by_epoch = defaultdict(set)
    for r in records:
        by_epoch[r["epoch"]].add(r["weights_sha256"])
    assert sorted(by_epoch) == list(range(1, epochs + 1))
    assert all(len(checksums) == 1 for checksums in by_epoch.values()), by_epoch
    # every batch went to exactly one learner, once: the final checkpoint's buffers saw each uid once
    final = Checkpoint.open(committed(run_dir / "checkpoints")[-1])
    assert final.epoch == epochs
    replicas = [final.replica(rank)["buffer"] for rank in (0, 1)]
    seen = [set(b["seen"]) for b in replicas]
    assert all(len(s) == epochs for s in seen) and not seen[0] & seen[1]
    assert all(b["stats"]["added"] == epochs * 16 and b["stats"]["duplicates"] == 0 for b in replicas)
    last_attempt = {(r["rank"], r["epoch"]): r["uids"] for r in records}  # later lines win: the surviving attempt
    for rank in (0, 1):
        assert {uid for (k, _), uids in last_attempt.items() if k == rank for uid in uids} == seen[rank]
    metrics = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "policy_version" in m]
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1))


def two_epochs(group: RolloutGroup, learner: Learner) -> tuple[list[dict], list[list]]:
    """Two epochs of publish, collect, ingest and update; the weights published and the batches collected."""
    published, collected = [], []
    for epoch in range(2):
        published.append(learner.policy.trainable_state_dict())
        group.publish(published[-1], learner.policy_version)
        batches = group.collect(learner.policy_version, derive_seed(7, epoch), 16)
        collected.append(batches)
        learner.ingest(batches)
        learner.update()
    return published, collected


def test_a_rollout_actor_killed_mid_collect_is_restarted_and_its_batch_made_once(tiny_model_dir, tmp_path):
    log, crashed = tmp_path / "collects.log", tmp_path / "crashed"

    class CrashingWorker(RolloutWorker):
        """Worker 1 dies (the process exits) half-way through its first collect at policy version 1."""

        def collect(self, policy_version, seed, n, published=None, postprocess=True, env=None):
            with open(log, "a") as f:
                f.write(f"{self.worker_index} {seed} start holding=v{self.policy_version}\n")
            if self.worker_index == 1 and policy_version == 1 and not crashed.exists():
                crashed.touch()
                self._rollout(seed, self.env)  # part of the work
                os._exit(1)
            batch = super().collect(policy_version, seed, n, published, postprocess, env)
            with open(log, "a") as f:
                f.write(f"{self.worker_index} {seed} done\n")
            return batch

    cfg = tiny_cfg(tiny_model_dir, "ray.num_rollout_workers=2", "ray.num_cpus=4")
    init_ray(cfg)
    try:
        actors = start_rollout_actors(cfg, CrashingWorker)
        group = RolloutGroup(actors, RayCall(), share_weights)
        learner = Learner(cfg, torch.device("cpu"))
        published, collected = two_epochs(group, learner)
    finally:
        ray.shutdown()
    seed = derive_seed(derive_seed(7, 1), 1)  # worker 1's seed at epoch 1
    lines = [line for line in log.read_text().splitlines() if line.startswith(f"1 {seed} ")]
    # the crash, then the restarted actor (back on the base weights) fetched v1 and made the batch once
    assert lines == [f"1 {seed} start holding=v1", f"1 {seed} start holding=v0", f"1 {seed} done"]
    assert learner.buffer.stats["added"] == 32 and learner.buffer.stats["duplicates"] == 0
    # oracle: the same collect in this process with the published v1 weights gives the same trajectories
    reference = RolloutWorker(cfg, 1)
    reference.set_weights(published[1], 1)
    uid, batch = collected[1][1]
    assert uid.startswith("v1-") and str(seed) in uid
    expected = reference.collect(1, seed, 8)
    assert torch.equal(batch["latents"], expected["latents"]) and torch.equal(batch["log_prob"], expected["log_prob"])


def test_a_hung_rollout_actor_is_replaced_and_its_batch_made_and_ingested_once(tiny_model_dir, tmp_path):
    log, hung, timeout_s = tmp_path / "collects.log", tmp_path / "hung", 10

    class HangingWorker(RolloutWorker):
        """Worker 1 never answers its first collect at policy version 1 (it sleeps far past the timeout)."""

        def collect(self, policy_version, seed, n, published=None, postprocess=True, env=None):
            with open(log, "a") as f:
                f.write(f"{self.worker_index} {seed} start holding=v{self.policy_version}\n")
            if self.worker_index == 1 and policy_version == 1 and not hung.exists():
                hung.touch()
                time.sleep(3600)
            batch = super().collect(policy_version, seed, n, published, postprocess, env)
            with open(log, "a") as f:
                f.write(f"{self.worker_index} {seed} done\n")
            return batch

    cfg = tiny_cfg(tiny_model_dir, "ray.num_rollout_workers=2", "ray.num_cpus=4", f"ray.collect_timeout_s={timeout_s}")
    init_ray(cfg)
    warnings = []
    try:
        actors = start_rollout_actors(cfg, HangingWorker)
        ray.get([actor.__ray_ready__.remote() for actor in actors])  # built: the timeout is about collects
        call = RayCall(cfg.ray.collect_timeout_s, cfg.ray.max_rollout_restarts, warn=warnings.append)
        group = RolloutGroup(actors, call, share_weights)
        learner = Learner(cfg, torch.device("cpu"))
        published, collected = two_epochs(group, learner)
    finally:
        ray.shutdown()
    assert warnings == [f"a rollout worker did not answer within ray.collect_timeout_s={timeout_s} s; replacing it "
                        "and retrying its call"]  # fmt: skip
    seed = derive_seed(derive_seed(7, 1), 1)  # worker 1's seed at epoch 1
    lines = [line for line in log.read_text().splitlines() if line.startswith(f"1 {seed} ")]
    # the hung call, then the replacement (back on the base weights) fetched v1 and made the batch once
    assert lines == [f"1 {seed} start holding=v1", f"1 {seed} start holding=v0", f"1 {seed} done"]
    uids = [uid for batches in collected for uid, _ in batches]
    assert len(set(uids)) == 4 and sorted(learner.buffer.state_dict()["seen"]) == sorted(uids)  # each ingested once
    assert learner.buffer.stats["added"] == 32 and learner.buffer.stats["duplicates"] == 0
    reference = RolloutWorker(cfg, 1)  # oracle: the same collect in this process with the published v1 weights
    reference.set_weights(published[1], 1)
    expected = reference.collect(1, seed, 8)
    uid, batch = collected[1][1]
    assert str(seed) in uid and torch.equal(batch["latents"], expected["latents"])


def test_learners_that_lost_the_race_for_their_port_start_again(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from ray.train import ControllerError
    from ray.train.torch import TorchTrainer

    from rlft.run import main

    # what Ray Train raises when torch cannot bind the rendezvous port it chose (another process took it)
    port_taken = ControllerError(torch.distributed.DistNetworkError(
        "The server socket has failed to listen on any local network address. port: 40623, useIpv6: false, "
        "code: -98, name: EADDRINUSE, message: address already in use"))  # fmt: skip
    real_fit, fits = TorchTrainer.fit, []

    def fit_after_losing_the_race_twice(trainer):
        fits.append(trainer)
        if len(fits) <= 2:
            raise port_taken
        return real_fit(trainer)

    monkeypatch.setattr(TorchTrainer, "fit", fit_after_losing_the_race_twice)
    monkeypatch.setenv("RAY_ADDRESS", "")
    try:
        run_dir = main([f"env.base_model={tiny_model_dir}", *TINY_OVERRIDES, f"logging.run_dir={tmp_path / 'run'}",
                        "trainer.epochs=1", "ray.num_cpus=4"])  # fmt: skip
    finally:
        ray.shutdown()
    assert len(fits) == 3 and len({id(t) for t in fits}) == 3  # a new trainer each time
    assert capsys.readouterr().out.count("starting the learners again") == 2
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in lines if "reward/mean" in m] == [1]

    other = ControllerError(RuntimeError("the controller failed for another reason"))
    with pytest.raises(ControllerError, match="another reason"):  # only the port race is retried, and only so often
        fit_learners(lambda: FailingTrainer(other))
    attempts = []
    with pytest.raises(ControllerError, match="EADDRINUSE"):
        fit_learners(lambda: attempts.append(1) or FailingTrainer(port_taken), retries=2)
    assert len(attempts) == 3


class FailingTrainer:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def fit(self) -> None:
        raise self.error
