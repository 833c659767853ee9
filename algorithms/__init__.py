"""Update rules, one file each. A module `algorithms/<name>.py` is selected with `algo=<name>` and defines:

    Config                          a dataclass; its fields are the keys of rlft/conf/algo/<name>.yaml
    REQUIRES_STOCHASTIC_SAMPLER     True when the update needs transition log-probabilities (env.eta > 0)
    REQUIRES_DIFFERENTIABLE_REWARD  True when the update backpropagates through the reward
    USES_ROLLOUTS                   False when the learner makes its own samples (no rollout workers, no buffer);
                                    an algorithm whose variants differ defines `uses_rollouts(cfg)` instead
    GRADIENT_CHECKPOINTING          optional: the default of policy.gradient_checkpointing (False when absent)
    ROLLOUT_KEYS                    optional per-step entries rollout workers record beyond the latents
                                    and log-probabilities ("noise"; "base_output": the frozen base network's prediction)
    make_state(cfg)                 the algorithm's own learner-side state (state_dict / load_state_dict)
    prepare(batch, cfg, state)      learner side, when trajectories arrive: -> (batch, metrics)
    PREPARE_ACROSS_REPLICAS         optional batch keys: with several learners, `prepare` runs on these entries of
                                    all learners' new trajectories (rank order) and each keeps its own rows
    update(ctx, cfg, state)         one epoch's update (its own passes over ctx.buffer): -> metrics; an update that
                                    samples for itself reports how many trajectories as "perf/samples"
    make_correction(cfg, env, scheduler_config)   optional: a trainable module added to the noise prediction of
                                    the frozen base network (DEFT's h-transform); only its weights train and publish

and a loss as a pure function over a TensorDict batch, with the paper's equation cited. Nothing here imports Ray:
the same `update` runs in a unit test, a single process and a Ray Train worker.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

import torch
from tensordict import TensorDict


@dataclass
class LearnerContext:
    """What an update needs from the learner replica it runs in."""

    policy: torch.nn.Module  # the DiffusionPolicy (unwrapped: parameters, schedule, trainable weights)
    network: torch.nn.Module  # what to call for the forward pass: the policy or its DDP wrapper
    optimizer: torch.optim.Optimizer
    env: object  # a DenoisingEnv on the learner's device (reward, schedule, contexts) for in-learner sampling
    buffer: object | None  # the learner's TrajectoryBuffer shard (None when the algorithm uses no rollouts)
    generator: torch.Generator  # the learner's own random stream (timestep orders, subsampling)
    device: torch.device
    world_size: int = 1

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


def mean_over_steps(step_metrics: list[dict[str, float]]) -> dict[str, float]:
    """One update's per-optimizer-step metrics, averaged over its steps, plus `train/optimizer_steps`."""
    steps = len(step_metrics)
    keys = dict.fromkeys(key for metrics in step_metrics for key in metrics)
    means = {key: sum(m[key] for m in step_metrics if key in m) / max(1, steps) for key in keys}
    return {**means, "train/optimizer_steps": float(steps)}


def load_algorithm(name: str) -> ModuleType:
    return importlib.import_module(f"rlft.algorithms.{name}")


def uses_rollouts(module: ModuleType, cfg) -> bool:
    return module.uses_rollouts(cfg) if hasattr(module, "uses_rollouts") else module.USES_ROLLOUTS


RUN_KEYS = ("name", "epochs")  # keys of an `algo:` config that choose the module and the run length, not Config


def make_config(module: ModuleType, algo_cfg: dict):
    return module.Config(**{k: v for k, v in algo_cfg.items() if k not in RUN_KEYS})
