"""GRPO for diffusion and flow models: group-relative advantages, the clipped per-step ratio, a KL to the base model.

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470) and DanceGRPO (Xue et al. 2025, arXiv 2505.07818) carry GRPO (Shao et
al. 2024, arXiv 2402.03300, eq. 3) over to the denoising MDP: G samples of each context (prompt or class) form a
group, each sample's advantage is its reward standardised within its group,
    A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-6)     (Flow-GRPO eq. 6; `global_std`: the batch's std),
and every trained step of every trajectory gets the PPO-clipped ratio of its Gaussian transition (eq. 7), plus
beta times the exact per-step KL of the fine-tuned transition to the frozen reference's (the same std, so
|mean - mean_ref|^2 / 2 std^2). On flow models the transitions are those of the marginal-preserving SDE
(rlft.core.flow, env.eta = a / sqrt(2)); on DDPMs those of DDIM with eta > 0. The per-step loss is DDPO's
(algorithms/ddpo.py: the same estimator), which this module calls. What GRPO changes is where advantages come from
(the current group, no reward history) and which steps train:
    timestep_fraction     a random subset of each trajectory's steps (Flow-GRPO-Fast trains on a few)
    window_size / stride  MixGRPO's sliding window (Li et al. 2025, arXiv 2507.21802): only the W consecutive steps
                          of the window train this epoch, and the window moves `window_stride` steps per epoch from
                          the noisy end toward the clean one, then wraps

Groups: the rollout workers draw trainer.rollout_batch_size / group_size contexts per env batch and G = group_size
samples of each (rlft.envs.denoising: reset option group_size). An unconditional model has one context, so its
group is every sample of the epoch (standardised as one batch).

Batch schema (made by `rlft.rollout`; B trajectories over T steps): DDPO's
    latents      [B, T+1, C, H, W]  x at steps 0..T (noise first)
    log_prob     [B, T]             log p_old(x_{k+1} | x_k), fp32, mean over dimensions
    context      [B, *ctx]          the context c; rows with equal context form a group
    reward       [B]                r(x_0, c), finite
    advantage    [B]                added by `prepare`
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict

from rlft.algorithms import LearnerContext, ddpo, mean_over_steps
from rlft.algorithms.ddpo import context_keys
from rlft.core.spec import knob

REQUIRES_STOCHASTIC_SAMPLER = True  # the ratio needs transition log-probabilities (env.eta > 0)
REQUIRES_DIFFERENTIABLE_REWARD = False
GRADIENT_CHECKPOINTING = False
ROLLOUT_KEYS = ()
# the groups span learners: advantages come from the whole epoch's rewards of each context
PREPARE_ACROSS_REPLICAS = ("reward", "context")


@dataclass
class Config:
    name: str = knob("grpo", "algorithm module in algorithms/")
    epochs: int = knob(60, "trainer.epochs unless the command line sets it", ge=1)
    lr: float = knob(3e-4, "AdamW learning rate", gt=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = knob(1.0, "gradient clipping (global L2 norm) before each optimizer step", gt=0)
    group_size: int = knob(8, "G: samples of each context per env batch (must divide trainer.rollout_batch_size)",
                           ge=1)  # fmt: skip
    global_std: bool = knob(False, "divide advantages by the batch's reward std instead of each group's")
    clip_range: float = knob(1e-4, "PPO clip: ratios outside [1 - eps, 1 + eps] give no gradient", gt=0)
    adv_clip_max: float = knob(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]", gt=0)
    kl_weight: float = knob(0.1, "beta of the exact per-step KL to the frozen reference (0 = off)", ge=0)
    inner_epochs: int = knob(1, "passes over each collected batch", ge=1)
    minibatch_size: int = knob(32, "trajectories per optimizer step on each learner", ge=1)
    timestep_fraction: float = knob(1.0, "fraction of the (window's) steps trained on, random per trajectory",
                                    gt=0, le=1)  # fmt: skip
    # 0.01: on digits_flow the last stochastic step (into t = 0.001, std 0.001) otherwise swamps the gradient and
    # nothing is learned in 60 epochs (benchmarks/README.md, flow models); with it, 80% judged 3s by epoch ~25
    min_step_std: float = knob(0.01, "train only on steps whose transition std is at least this (0 = every "
                               "stochastic step)", ge=0)  # fmt: skip
    window_size: int = knob(0, "MixGRPO: consecutive stochastic steps trained per epoch (0 = all of them)", ge=0)
    window_stride: int = knob(1, "steps the window moves per epoch, from the noisy end toward the clean one", ge=1)
    timesteps_per_forward: int = knob(1, "timesteps per trajectory stacked into one network call", ge=1)


def group_advantages(rewards: torch.Tensor, keys: list[str], global_std: bool) -> torch.Tensor:
    """[B] advantages: each reward standardised by its group's mean and std (rows with the same key are a group;
    Flow-GRPO eq. 6), or by the group's mean and the whole batch's std with `global_std`. A group of one sample, or
    of equal rewards, gets advantage 0: it says nothing about which sample was better."""
    advantages = torch.zeros_like(rewards)
    batch_std = rewards.std(unbiased=False)
    for key in dict.fromkeys(keys):
        rows = torch.tensor([k == key for k in keys])
        group = rewards[rows]
        std = batch_std if global_std else group.std(unbiased=False)
        advantages[rows] = (group - group.mean()) / (std + 1e-6)
    return advantages


class GRPOState:
    """The learner's epoch counter, which places the sliding window (checkpointed)."""

    def __init__(self) -> None:
        self.epoch = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])


def window_steps(steps: torch.Tensor, epoch: int, cfg: Config) -> torch.Tensor:
    """The step indices trained this epoch: all trainable `steps`, or MixGRPO's window of `window_size` of them,
    starting `window_stride * epoch` steps in (wrapping round to the noisy end)."""
    count = len(steps)
    if cfg.window_size == 0 or cfg.window_size >= count:
        return steps
    start = (cfg.window_stride * epoch) % (count - cfg.window_size + 1)
    return steps[start : start + cfg.window_size]


# ---- the learner-side interface (see rlft.algorithms.Algorithm) ----
def uses_rollouts(cfg: Config) -> bool:
    return True


def reference_roles(cfg: Config) -> tuple[str, ...]:
    return ("learner",) if cfg.kl_weight > 0 else ()


def group_size_problems(spec) -> list[str]:
    """Each env batch must hold whole groups (GRPO and NFT)."""
    batch, group = spec.trainer.rollout_batch_size, spec.algo.group_size
    if batch % group:
        return [f"algo.group_size={group} must divide trainer.rollout_batch_size={batch}: each env batch holds whole "
                f"groups; try algo.group_size={max(d for d in range(1, group + 1) if batch % d == 0)}"]
    return []


def validate(spec) -> list[str]:
    return group_size_problems(spec)


schedule_problems = ddpo.schedule_problems  # the same steps train


def make_state(cfg: Config) -> GRPOState:
    return GRPOState()


def make_correction(cfg: Config, env) -> None:
    return None


def postprocess_rollout(worker, batch: TensorDict, cfg: Config) -> TensorDict:
    return batch


def prepare(batch: TensorDict, cfg: Config, state: GRPOState) -> tuple[TensorDict, dict]:
    """Advantages of this epoch's finite trajectories, group by group."""
    rewards = batch["reward"].float().cpu()
    keys = context_keys(batch["context"])
    advantages = group_advantages(rewards, keys, cfg.global_std)
    batch["advantage"] = advantages.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(batch.device)
    sizes = torch.tensor([keys.count(key) for key in dict.fromkeys(keys)], dtype=torch.float32)
    return batch, {"grpo/groups": float(len(sizes)), "grpo/group_size_mean": sizes.mean().item()}


def update(ctx: LearnerContext, cfg: Config, state: GRPOState) -> dict[str, float]:
    """`inner_epochs` reshuffled passes over the epoch's groups, one optimizer step per minibatch, on this epoch's
    window of steps."""
    steps = window_steps(ddpo.trained_steps(ctx.policy.schedule, cfg.min_step_std), state.epoch, cfg)
    step_metrics = ddpo.update_passes(ctx, cfg, steps, "grpo")  # stale data: the decoupled objective (DDPO's)
    state.epoch += 1
    return {**mean_over_steps(step_metrics), "grpo/window_start": float(steps[0])}
