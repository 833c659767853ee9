"""Update rules, one file each. `algo=<name>` selects the module `rlft.algorithms.<name>`, which defines every member
of the `Algorithm` protocol below (checked when it is loaded) and its loss as a pure function over tensors, with the
paper's equation cited. Nothing here imports Ray or the layer that does: the same `update` runs in a unit test, a
single process and a Ray Train worker.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from tensordict import TensorDict


class Algorithm(Protocol):
    """What an algorithm module defines. `cfg` is always its own `Config`; `spec` the whole run (rlft.spec.RunSpec)."""

    Config: type  # a dataclass of knobs (rlft.core.spec.knob) whose `name` is the module's and `epochs` its run length
    REQUIRES_STOCHASTIC_SAMPLER: bool  # the update needs transition log-probabilities (env.eta > 0)
    REQUIRES_DIFFERENTIABLE_REWARD: bool  # the update backpropagates through the reward
    GRADIENT_CHECKPOINTING: bool  # the default of policy.gradient_checkpointing
    ROLLOUT_KEYS: tuple[str, ...]  # per-step entries rollouts record beyond latents and log-probabilities: "noise";
    # "base_output" (the frozen base network's prediction)
    PREPARE_ACROSS_REPLICAS: tuple[str, ...]  # batch keys `prepare` sees from all learners (DDPO: rewards, contexts)

    def uses_rollouts(self, cfg) -> bool:
        """False when the learner samples for itself (no rollout collection, no buffer)."""

    def reference_roles(self, cfg) -> tuple[str, ...]:
        """Where a frozen copy of the base network is needed: "rollout" (AM's lean adjoints), "learner" (KL)."""

    def validate(self, spec) -> list[str]:
        """Config problems of this algorithm with the rest of the run, one message each (empty: fine)."""

    # optional: schedule_problems(spec, schedule) -> list[str], checks on the env's sampling schedule, run once the
    # base model is found (DDPO and GRPO: a step left to train on at algo.min_step_std)

    def make_state(self, cfg) -> Any:
        """The learner-side state (with state_dict / load_state_dict for checkpoints)."""

    def make_correction(self, cfg, env) -> torch.nn.Module | None:
        """A trainable module added to a frozen base network's prediction (DEFT's h-transform), or None."""

    def postprocess_rollout(self, worker, batch: TensorDict, cfg) -> TensorDict:
        """Rollout-worker side, on each collected chunk (AM's lean adjoints); `worker` has policy, env, device."""

    def prepare(self, batch: TensorDict, cfg, state) -> tuple[TensorDict, dict[str, float]]:
        """Learner side, when finite trajectories arrive (DDPO's advantages)."""

    def update(self, ctx: LearnerContext, cfg, state) -> dict[str, float]:
        """One epoch's update (its own passes over ctx.buffer); reports "perf/samples" when it sampled for itself."""


PROTOCOL_MEMBERS = ("Config", "REQUIRES_STOCHASTIC_SAMPLER", "REQUIRES_DIFFERENTIABLE_REWARD",
                    "GRADIENT_CHECKPOINTING", "ROLLOUT_KEYS", "PREPARE_ACROSS_REPLICAS", "uses_rollouts",
                    "reference_roles", "validate", "make_state", "make_correction", "postprocess_rollout", "prepare",
                    "update")  # fmt: skip


def algorithm_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_algorithm(name: str) -> Algorithm:
    """The module of `algo=<name>`, checked against the `Algorithm` protocol."""
    if name not in algorithm_names():
        raise KeyError(f"unknown algorithm {name!r}; algorithms: {', '.join(algorithm_names())}")
    module = importlib.import_module(f"{__name__}.{name}")
    missing = [member for member in PROTOCOL_MEMBERS if not hasattr(module, member)]
    if missing:
        raise TypeError(f"rlft.algorithms.{name} does not define {', '.join(missing)} (see the Algorithm protocol in "
                        "rlft.algorithms)")  # fmt: skip
    return module


@dataclass
class LearnerContext:
    """What an update needs from the learner replica it runs in."""

    policy: torch.nn.Module  # the DiffusionPolicy (unwrapped: parameters, schedule, trainable weights)
    network: torch.nn.Module  # what to call for the forward pass: the policy or its DDP wrapper (FSDP: the policy)
    optimizer: torch.optim.Optimizer
    env: Any  # a DenoisingEnv on the learner's device (reward, schedule, contexts) for in-learner sampling
    buffer: Any  # the learner's TrajectoryBuffer shard (None when the algorithm uses no rollouts)
    generator: torch.Generator  # the learner's own random stream (timestep orders, subsampling)
    device: torch.device
    world_size: int = 1
    policy_version: int = 0  # the weights' version at the start of this update (set by the learner)
    sharded: bool = False  # FSDP learners (rlft.fsdp): every network call, with or without gradients, is a collective

    def minibatch_count(self, size: int) -> int:
        """Minibatches of `size` in one pass over the buffer; with DDP, the fewest of any replica, so that every
        replica takes the same number of steps."""
        count = math.ceil(len(self.buffer) / size)
        if self.world_size > 1:
            import torch.distributed as dist

            synced = torch.tensor([count], device=self.device)
            dist.all_reduce(synced, op=dist.ReduceOp.MIN)
            count = int(synced)
        return count

    def minibatches(self) -> Iterator[TensorDict]:
        """One reshuffled pass over the buffer; with DDP, every replica takes the same number of steps."""
        count = self.minibatch_count(self.buffer.minibatch_size)
        for i, minibatch in enumerate(self.buffer.minibatches()):
            if i >= count:
                return
            yield minibatch.to(self.device)

    def spare_calls(self, count: int) -> int:
        """Network calls to make, results unused, beyond the `count` this replica's own data needs: with FSDP, where
        every call waits for all replicas to make it, the most any replica needs less `count` (else that replica
        would wait forever); 0 otherwise."""
        if not self.sharded:
            return 0
        import torch.distributed as dist

        most = torch.tensor([count], device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most) - count

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def optimizer_step(self, max_grad_norm: float) -> dict[str, float]:
        """Clip the gradients (global L2 norm) and step, unless a gradient is not finite: then the step is skipped and
        the gradients dropped, so a NaN never reaches the weights (with DDP every replica sees the same all-reduced
        gradients and skips alike)."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable(), max_grad_norm)
        if self.sharded:  # FSDP: the norm over every replica's shards, a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"train/grad_norm": grad_norm.item() if finite else 0.0, "train/skipped_steps": float(not finite)}


COUNTED = ("train/skipped_steps", "reward/nonfinite")  # per-step counts that an update reports summed, not averaged


def mean_over_steps(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    """One update's per-optimizer-step metrics, averaged over its steps (counts summed), plus
    `train/optimizer_steps`."""
    steps = len(step_metrics)
    keys = dict.fromkeys(key for metrics in step_metrics for key in metrics)
    summed = {key: sum(m[key] for m in step_metrics if key in m) for key in keys}
    means = {key: value if key in COUNTED else value / max(1, steps) for key, value in summed.items()}
    return {**means, "train/optimizer_steps": float(steps)}
