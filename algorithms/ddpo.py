"""DDPO: policy gradient on the denoising MDP with clipped per-timestep importance ratios.

Black et al. 2023, "Training Diffusion Models with Reinforcement Learning" (arXiv 2305.13301): the
importance-sampled estimator of sec. 4.3 (eq. 4) with the PPO clip of Schulman et al. 2017 (eq. 7), applied
to every denoising step, with advantages standardised per context.

Batch schema (made by `rlft.rollout`, shapes per trajectory batch of size B over T steps):
    latents      [B, T+1, C, H, W]  x_T, ..., x_0: step k goes latents[:, k] -> latents[:, k+1]
    log_prob     [B, T]             log p_old(x_{k+1} | x_k), fp32, mean over dimensions
    context      [B, *ctx]          the context c (empty for unconditional models)
    reward       [B]                r(x_0, c); only finite rewards reach the update
    advantage    [B]                added by `compute_advantages` before training
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from dataclasses import dataclass

import torch
from rlft.algorithms import LearnerContext, mean_over_steps
from tensordict import TensorDict

REQUIRES_STOCHASTIC_SAMPLER = True  # the importance ratio needs log-probabilities (eta > 0)
REQUIRES_DIFFERENTIABLE_REWARD = False
USES_ROLLOUTS = True
# with several learners, `prepare` sees these entries of every learner's trajectories: advantages are standardised
# over the whole epoch, as DDPO's reference code gathers the rewards of all processes first
PREPARE_ACROSS_REPLICAS = ("reward", "context")


@dataclass
class DDPOConfig:
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm) before each optimizer step
    clip_range: float = 1e-4  # PPO clip: ratios outside [1 - eps, 1 + eps] give no gradient
    adv_clip_max: float = 5.0  # advantages are clipped to [-adv_clip_max, adv_clip_max]
    inner_epochs: int = 1  # passes over each collected batch
    minibatch_size: int = 32  # trajectories per optimizer step on each learner (DDP: x num_learners in all)
    timestep_fraction: float = 1.0  # fraction of each trajectory's timesteps trained on (random per sample)
    # timesteps of each trajectory stacked into one network call (B * k samples): the same gradient from fewer,
    # larger calls, which a GPU runs nearer its peak; activation memory grows k-fold
    timesteps_per_forward: int = 1
    per_context_advantages: bool = True  # standardise rewards per context; unconditional models use the batch
    stat_window: int = 64  # per-context rolling window of recent rewards
    stat_min_count: int = 16  # below this many rewards for a context, fall back to batch statistics


class PerContextStatTracker:
    """Rolling reward statistics per context key, for advantage standardisation (DDPO sec. 5.1)."""

    def __init__(self, window: int, min_count: int):
        self.window, self.min_count = window, min_count
        self.history: dict[str, deque] = defaultdict(lambda: deque(maxlen=self.window))

    def standardise(self, rewards: torch.Tensor, keys: list[str]) -> torch.Tensor:
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        advantages = torch.empty_like(rewards)
        for key in set(keys):
            rows = torch.tensor([k == key for k in keys])
            self.history[key].extend(rewards[rows].tolist())
            seen = torch.tensor(list(self.history[key]))
            if len(seen) >= self.min_count:
                mean, std = seen.mean(), seen.std(unbiased=False)
            else:
                mean, std = batch_mean, batch_std
            advantages[rows] = (rewards[rows] - mean) / (std + 1e-6)
        return advantages

    def state_dict(self) -> dict:
        return {key: list(values) for key, values in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        for key, values in state.items():
            self.history[key].extend(values)


def context_keys(context: torch.Tensor) -> list[str]:
    """One hashable key per context row (a prompt embedding, a class label, or nothing)."""
    flat = context.reshape(context.shape[0], -1)
    if flat.shape[1] == 0:
        return [""] * context.shape[0]
    # a digest, not the bytes themselves: a prompt embedding (77 x 768 floats) would make a 470 kB key per sample
    return [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in flat.float().cpu()]


def compute_advantages(batch: TensorDict, cfg: DDPOConfig, tracker: PerContextStatTracker) -> TensorDict:
    """Add `advantage` [B] to a batch whose rewards are all finite (non-finite ones were dropped upstream)."""
    rewards = batch["reward"].float().cpu()
    keys = context_keys(batch["context"]) if cfg.per_context_advantages else [""] * len(rewards)
    if set(keys) == {""}:  # unconditional (or per-context switched off): plain batch standardisation
        advantages = (rewards - rewards.mean()) / (rewards.std(unbiased=False) + 1e-6)
    else:
        advantages = tracker.standardise(rewards, keys)
    batch["advantage"] = advantages.clamp(-cfg.adv_clip_max, cfg.adv_clip_max).to(batch.device)
    return batch


def ddpo_loss(
    log_prob: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped importance-sampled policy-gradient loss for one timestep of each trajectory ([B] each).

    loss = mean_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps)),  r_i = p_theta(a_i|s_i) / p_old(a_i|s_i)
    """
    ratio = torch.exp(log_prob - log_prob_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    info = {
        "approx_kl": 0.5 * ((log_prob - log_prob_old) ** 2).mean().detach(),
        "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
        "ratio": ratio.mean().detach(),
    }
    return loss, info


def train_step(ctx: LearnerContext, batch: TensorDict, cfg: DDPOConfig) -> dict[str, float]:
    """One optimizer step on a minibatch of whole trajectories, accumulating gradients over timesteps.

    Each network call's loss is backpropagated at once, so memory holds the graph of `timesteps_per_forward`
    timesteps, not the trajectory's. The loss is the mean over trained timesteps of `ddpo_loss`, however they
    are grouped into calls.
    """
    policy = ctx.policy
    num_trajectories = batch.batch_size[0]
    steps = policy.schedule.stochastic_steps.cpu()  # deterministic steps have no density and no gradient here
    num_train_steps = max(1, round(cfg.timestep_fraction * len(steps)))
    # an independent random order of timesteps per trajectory; the first num_train_steps are trained on
    order = torch.stack([steps[torch.randperm(len(steps), generator=ctx.generator)] for _ in range(num_trajectories)])
    order = order[:, :num_train_steps].to(batch.device)  # [B, num_train_steps]
    rows = torch.arange(num_trajectories, device=batch.device)
    ctx.optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=batch.device))
    for columns in order.split(cfg.timesteps_per_forward, dim=1):  # [B, k]: k timesteps per trajectory
        k = columns.shape[1]
        step_index = columns.reshape(-1)  # [B * k], trajectory-major
        row = rows.repeat_interleave(k)  # [B * k]
        out = policy.step(
            batch["latents"][row, step_index],
            step_index,
            batch["context"][row],
            prev_sample=batch["latents"][row, step_index + 1],
            network=ctx.network,
        )
        log_prob_old = batch["log_prob"][row, step_index]
        loss, info = ddpo_loss(out.log_prob, log_prob_old, batch["advantage"][row], cfg.clip_range)
        share = k / num_train_steps  # `loss` is the mean over k timesteps: weight it by their share of the total
        (loss * share).backward()
        totals["loss/policy"] += loss.detach() * share
        for key, value in info.items():
            totals[f"ddpo/{key}"] += value * share
    totals["train/grad_norm"] = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    ctx.optimizer.step()
    return {key: value.item() for key, value in totals.items()}  # one host sync per optimizer step


# ---- the learner-side interface (see algorithms/__init__.py) ----
Config = DDPOConfig


def validate(cfg) -> list[str]:
    """Config problems specific to DDPO (called by rlft.config.validate): a list of messages, empty when fine."""
    if cfg.algo.timesteps_per_forward < 1:
        return [f"algo.timesteps_per_forward={cfg.algo.timesteps_per_forward} must be at least 1 (1 = one timestep "
                "per network call)"]
    return []


def make_state(cfg: DDPOConfig) -> PerContextStatTracker:
    return PerContextStatTracker(cfg.stat_window, cfg.stat_min_count)


def prepare(batch: TensorDict, cfg: DDPOConfig, state: PerContextStatTracker) -> tuple[TensorDict, dict]:
    return compute_advantages(batch, cfg, state), {}


def update(ctx: LearnerContext, cfg: DDPOConfig, state: PerContextStatTracker) -> dict[str, float]:
    """`inner_epochs` reshuffled passes over the collected batch, one optimizer step per minibatch."""
    return mean_over_steps([train_step(ctx, mb, cfg) for _ in range(cfg.inner_epochs) for mb in ctx.minibatches()])
