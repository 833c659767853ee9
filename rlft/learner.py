"""The learner: policy, optimizer, replay buffer and the epoch loop, the same in one process or in Ray Train.

`Learner` is one replica (DDP or FSDP across replicas when torch.distributed is initialised); `train` runs the loop
of DESIGN.md: collect from the rollout group, add to the buffer, run the algorithm's update, publish the new
weights with a new policy version, evaluate on fixed seeds every few epochs, checkpoint, and report.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from tensordict import TensorDict

from rlft.algorithms import LearnerContext, load_algorithm
from rlft.buffer import TrajectoryBuffer
from rlft.checkpoint import Checkpointer, due
from rlft.envs.rewards import reward_statistics
from rlft.evaluate import evaluation_baseline, hacking_metrics
from rlft.fsdp import shard_policy
from rlft.rollout import RolloutGroup, build_policy, derive_seed, set_torch_threads

# (kind, payload): "metrics", "eval", "checkpoint" (committed), "weights", "replica", "start", "stopped" or "warning"
Report = Callable[[str, dict], None]


def lr_factor(trainer, epoch: int) -> float:
    """The learning rate's multiple at `epoch`: linear warm-up, then constant or a cosine decay to 10%."""
    warmup = trainer.lr_warmup_epochs
    if epoch < warmup:
        return (epoch + 1) / warmup
    if trainer.lr_schedule == "cosine":
        progress = (epoch - warmup) / max(1, trainer.epochs - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def any_replica(flag: bool, device: torch.device) -> bool:
    """True when `flag` holds on any learner replica (every replica must take the same branch)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class Learner:
    """One learner replica: the policy being trained, its optimizer, its buffer shard and the algorithm."""

    def __init__(self, spec, device: torch.device, rank: int = 0, world_size: int = 1):
        set_torch_threads(spec, "learner")
        self.spec, self.device, self.rank, self.world_size = spec, device, rank, world_size
        self.algorithm = load_algorithm(spec.algo.name)
        self.algo = spec.algo
        torch.manual_seed(derive_seed(spec.seed, 1, rank))  # minibatch shuffling in the buffer's sampler
        self.policy, env, _ = build_policy(spec, device, "learner")
        self.policy.train()
        network = self.policy
        # FSDP: the network's blocks hold shards; their hooks gather the full parameters at every call of the policy
        sharded = world_size > 1 and spec.ray.learner_parallelism == "fsdp"
        if sharded:
            shard_policy(self.policy, device)
        elif world_size > 1:
            network = torch.nn.parallel.DistributedDataParallel(
                self.policy, device_ids=[device.index] if device.type == "cuda" else None
            )
        trainable = [p for p in self.policy.parameters() if p.requires_grad]  # after sharding: its DTensors
        optimizer = torch.optim.AdamW(trainable, lr=self.algo.lr, weight_decay=self.algo.weight_decay)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(spec.trainer, e))
        buffer = None
        if self.algorithm.uses_rollouts(self.algo):
            trainer = spec.trainer
            buffer = TrajectoryBuffer(capacity=trainer.buffer_capacity or trainer.samples_per_epoch // world_size,
                                      minibatch_size=self.algo.minibatch_size, max_staleness=trainer.max_staleness)
        generator = torch.Generator().manual_seed(derive_seed(spec.seed, 2, rank))
        self.ctx = LearnerContext(self.policy, network, optimizer, env, buffer, generator, device, world_size,
                                  sharded=sharded)  # fmt: skip
        self.state = self.algorithm.make_state(self.algo)
        self.policy_version = 0
        self.eval_baseline: dict | None = None  # rank 0: the base model evaluation (evaluate.evaluation_baseline)

    @property
    def buffer(self) -> TrajectoryBuffer | None:
        return self.ctx.buffer

    def ingest(self, batches: list[tuple[str, TensorDict]]) -> dict[str, float]:
        """Add one epoch's trajectories: drop non-finite rewards (counted), let the algorithm prepare them, store."""
        fresh = [(uid, batch) for uid, batch in batches if not self.buffer.seen(uid)]
        metrics = {"buffer/duplicates": float(len(batches) - len(fresh))}
        batch, kept = None, None
        if fresh:
            batch = torch.cat([b for _, b in fresh])
            finite = batch["reward_finite"]
            metrics.update(reward_statistics(batch["reward"], finite))
            kept = batch[finite] if finite.any() else None
        gather_keys = self.algorithm.PREPARE_ACROSS_REPLICAS
        prepared_metrics = {}
        if self.world_size > 1 and gather_keys:  # every replica joins, even one with nothing new
            kept, prepared_metrics = self.prepare_across_replicas(kept, gather_keys)
        elif kept is not None:
            kept, prepared_metrics = self.algorithm.prepare(kept, self.algo, self.state)
        if kept is None:
            return metrics
        metrics.update(prepared_metrics)
        for key in kept.keys() - batch.keys():  # entries the algorithm added (advantages...), zero where dropped
            batch[key] = torch.zeros((len(batch), *kept[key].shape[1:]), dtype=kept[key].dtype)
            batch[key][finite] = kept[key]
        # stored per uid (finite rows only), so a replay of any one rollout batch is recognised
        for (uid, _), part in zip(fresh, batch.split([b.batch_size[0] for _, b in fresh]), strict=True):
            self.buffer.add(uid, part[part["reward_finite"]])
        return metrics

    def prepare_across_replicas(self, kept: TensorDict | None, keys: tuple[str, ...]) -> tuple[TensorDict | None, dict]:
        """The algorithm's `prepare` on the `keys` of every replica's new trajectories (DDPO: advantages from the
        whole epoch's rewards, not one shard's), in rank order, so every replica's state stays the same; this
        replica keeps the entries `prepare` added for its own rows."""
        shards: list[TensorDict | None] = [None] * self.world_size
        dist.all_gather_object(shards, None if kept is None else kept.select(*keys).cpu())
        present = [shard for shard in shards if shard is not None]
        if not present:
            return None, {}
        prepared, metrics = self.algorithm.prepare(torch.cat(present), self.algo, self.state)
        if kept is None:
            return None, metrics
        offset = sum(len(shard) for shard in shards[: self.rank] if shard is not None)
        own_rows = prepared[offset : offset + len(kept)]
        for key in prepared.keys() - kept.keys():
            kept[key] = own_rows[key].to(kept.device)
        return kept, metrics

    def update(self) -> dict[str, float]:
        """The algorithm's update for this epoch, then the next policy version. An epoch that left some replica's
        buffer empty (every reward non-finite) is skipped on every replica, with `train/skipped_epochs`."""
        evicted = self.buffer.evict_stale(self.policy_version) if self.buffer is not None else 0
        preempted = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
        if self.buffer is not None and any_replica(len(self.buffer) == 0, self.device):
            metrics = {"train/skipped_epochs": 1.0, "train/optimizer_steps": 0.0}
        else:
            self.ctx.policy_version = self.policy_version
            metrics = {"train/skipped_epochs": 0.0, **self.algorithm.update(self.ctx, self.algo, self.state)}
        # involuntary context switches of this process during the update: other work on the machine stalls a
        # multi-threaded CPU learner at every barrier (on 2 cores, Ray's housekeeping made 35x the plain loop's)
        metrics["perf/update_preemptions"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - preempted)
        self.lr_scheduler.step()
        self.policy_version += 1
        metrics["train/lr"] = self.ctx.optimizer.param_groups[0]["lr"]
        if self.buffer is not None:
            metrics.update({"buffer/evicted_stale": float(evicted), "buffer/size": float(len(self.buffer))})
        return metrics


def replica_summary(learner: Learner, epoch: int, batches: list[tuple[str, TensorDict]]) -> dict:
    """What each replica consumed and holds, for checking DDP replicas against each other (replicas.jsonl)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(learner.policy.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    return {
        "epoch": epoch, "rank": learner.rank, "pid": os.getpid(), "policy_version": learner.policy_version,
        "weights_sha256": digest.hexdigest(), "uids": [uid for uid, _ in batches],
        "buffer": dict(learner.buffer.stats) if learner.buffer is not None else {},
    }  # fmt: skip


def mean_over_replicas(metrics: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / dist.get_world_size()).tolist(), strict=True))


def train(spec, rollouts: RolloutGroup, report: Report, device: torch.device, rank: int = 0, world_size: int = 1,
          checkpointer: Checkpointer | None = None, stop_requested: Callable[[], bool] = lambda: False) -> None:
    """The whole run for one learner replica; only rank 0 evaluates and reports (besides each replica's summary).

    With a `checkpointer`, the loop starts from the run's newest valid checkpoint (a resumed run, or Ray Train
    restarting failed learners) and writes one every `trainer.checkpoint_every` epochs and after the last. When
    `stop_requested()` turns true (Ctrl-C, SIGTERM), the loop ends after the epoch in progress, with a checkpoint.
    """
    learner = Learner(spec, device, rank, world_size)
    trainer, evaluation = spec.trainer, spec.eval
    samples = trainer.samples_per_epoch // world_size
    warn = (lambda message: report("warning", {"message": message})) if rank == 0 else (lambda message: None)
    start_epoch = checkpointer.restore(learner, warn) if checkpointer else 0
    if checkpointer and rank == 0:  # also after Ray Train restarted failed learners: drop what came after it
        report("start", {"epoch": start_epoch, "policy_version": learner.policy_version})
    rollouts.publish(learner.policy.trainable_state_dict(), learner.policy_version)

    def evaluate(epoch: int) -> bool:
        """Rank 0 evaluates; True when the hacking gap says to stop early (eval.stop_on_hacking_gap)."""
        if rank != 0:
            return False
        result = rollouts.evaluate(learner.policy_version, evaluation.seed, evaluation.num_samples)
        if learner.eval_baseline is None:  # the run's first evaluation is the base model's
            learner.eval_baseline = evaluation_baseline(result)
        result["metrics"].update(hacking_metrics(learner.eval_baseline, result))
        report("eval", {"epoch": epoch, **result})
        gap, limit = result["metrics"].get("eval/hacking_gap"), evaluation.stop_on_hacking_gap
        if limit is not None and gap is not None and gap > limit:
            report("warning", {"message": f"stopping early at epoch {epoch}: eval/hacking_gap {gap:.2f} exceeds "
                                          f"eval.stop_on_hacking_gap={limit:g} (the reward rises, the judge does not)"})
            return True
        return False

    def start_collect(epoch: int):
        return rollouts.start_collect(learner.policy_version, derive_seed(spec.seed, 3, epoch, rank), samples)

    if start_epoch == 0:
        evaluate(0)
    # trainer.async_rollouts: the collection for the next epoch is in flight while this one trains (a resumed run
    # starts with a fresh one, sampled by the restored weights)
    pending = None
    for epoch in range(start_epoch, trainer.epochs):
        start = time.perf_counter()
        metrics, batches = {}, []
        if learner.algorithm.uses_rollouts(learner.algo):
            collection = pending or start_collect(epoch)
            batches = rollouts.receive(collection)
            pending = start_collect(epoch + 1) if trainer.async_rollouts and epoch + 1 < trainer.epochs else None
            staleness = learner.policy_version - collection.policy_version
            metrics = {**learner.ingest(batches), "buffer/staleness": float(staleness)}
        collected = time.perf_counter()
        metrics.update(learner.update())
        updated = time.perf_counter()
        rollouts.publish(learner.policy.trainable_state_dict(), learner.policy_version)
        end = time.perf_counter()
        metrics.update({
            "perf/collect_s": collected - start,
            "perf/update_s": end - collected,  # the update and the weight sync
            "perf/publish_s": end - updated,  # the weight sync to the rollout actors alone
            "perf/epoch_s": end - start,
            "perf/samples_per_s": metrics.get("perf/samples", samples) * world_size / (end - start),
        })  # fmt: skip
        metrics = mean_over_replicas(metrics, device)
        if rank == 0:
            report("metrics", {"epoch": epoch + 1, "policy_version": learner.policy_version, **metrics})
        report("replica", replica_summary(learner, epoch + 1, batches))
        hacking = due(epoch + 1, evaluation.every, trainer.epochs) and evaluate(epoch + 1)
        last = epoch + 1 == trainer.epochs or any_replica(hacking, device)
        stopping = not last and any_replica(stop_requested(), device)
        if checkpointer and (checkpointer.due(epoch + 1, trainer.epochs) or stopping or last):
            path = checkpointer.save(learner, epoch + 1)
            if rank == 0:
                report("checkpoint", {"epoch": epoch + 1, "path": str(path)})
        if stopping:
            if rank == 0:
                report("stopped", {"epoch": epoch + 1})
            return
        if last:
            break
    weights = learner.policy.trainable_state_dict()  # on every replica: with FSDP gathering them is a collective
    if rank == 0:
        report("weights", {"weights": weights, "policy_version": learner.policy_version})
