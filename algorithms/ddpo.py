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
from tensordict import TensorDict

from rlft.algorithms import LearnerContext, mean_over_steps
from rlft.core.sampler import transition_kl
from rlft.core.spec import knob

REQUIRES_STOCHASTIC_SAMPLER = True  # the importance ratio needs log-probabilities (eta > 0)
REQUIRES_DIFFERENTIABLE_REWARD = False
GRADIENT_CHECKPOINTING = False
ROLLOUT_KEYS = ()
# with several learners, `prepare` sees these entries of every learner's trajectories: advantages are standardised
# over the whole epoch, as DDPO's reference code gathers the rewards of all processes first
PREPARE_ACROSS_REPLICAS = ("reward", "context")


@dataclass
class Config:
    name: str = knob("ddpo", "algorithm module in algorithms/")
    # 40: on the digits default 0.88 judged 3s by epoch 20, 0.90 at 40 (benchmarks/README.md, reward hacking)
    epochs: int = knob(40, "trainer.epochs unless the command line sets it", ge=1)
    lr: float = knob(3e-4, "AdamW learning rate", gt=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = knob(1.0, "gradient clipping (global L2 norm) before each optimizer step", gt=0)
    clip_range: float = knob(1e-4, "PPO clip: ratios outside [1 - eps, 1 + eps] give no gradient", gt=0)
    adv_clip_max: float = knob(5.0, "advantages are clipped to [-adv_clip_max, adv_clip_max]", gt=0)
    inner_epochs: int = knob(1, "passes over each collected batch", ge=1)
    minibatch_size: int = knob(32, "trajectories per optimizer step on each learner (DDP: x num_learners in all)",
                               ge=1)  # fmt: skip
    timestep_fraction: float = knob(1.0, "fraction of each trajectory's timesteps trained on (random per sample)",
                                    gt=0, le=1)  # fmt: skip
    # a step's score grad log p is (x - mean) / std^2 times d mean: on a near-deterministic step it dwarfs every
    # other step's, gradient clipping then scales the rest to nothing, and one update moves that step's mean by
    # ~2 stds, past anything a stale or clipped ratio can estimate. Flow grids end with a step into t = 0.001 (std
    # 0.001), DDIM's digits grid with one of std 0.006. Published DDPO trains on every step (0); on the digits
    # default 0.01 reaches 3s by the judge 0.87 vs 0.27 at epoch 20 (benchmarks/README.md, asynchronous rollouts)
    min_step_std: float = knob(0.01, "train only on steps whose transition std is at least this (0 = every "
                               "stochastic step)", ge=0)  # fmt: skip
    # timesteps of each trajectory stacked into one network call (B * k samples): the same gradient from fewer,
    # larger calls, which a GPU runs nearer its peak; activation memory grows k-fold
    timesteps_per_forward: int = knob(1, "timesteps per trajectory stacked into one network call", ge=1)
    per_context_advantages: bool = knob(True, "standardise rewards per context; unconditional models use the batch")
    stat_window: int = knob(64, "per-context rolling window of recent rewards", ge=1)
    stat_min_count: int = knob(16, "below this many rewards for a context, fall back to batch statistics", ge=1)
    # 0.1: on the digits default, 0 lets the reward classifier be fooled (96% 3s by it, 57% by the judge at epoch 60)
    # and 1 holds the policy at the base model (benchmarks/README.md, reward hacking)
    kl_weight: float = knob(0.1, "beta of the exact per-step KL to the frozen base model added to the loss (0 = off)",
                            ge=0)  # fmt: skip


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


def compute_advantages(batch: TensorDict, cfg: Config, tracker: PerContextStatTracker) -> TensorDict:
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
    log_prob: torch.Tensor, log_prob_old: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    behaviour_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Clipped importance-sampled policy-gradient loss for one timestep of each trajectory ([B] each).

    loss = mean_i w_i max(-A_i r_i, -A_i clip(r_i, 1 - eps, 1 + eps)),  r_i = p_theta(a_i|s_i) / p_old(a_i|s_i)
    with w_i = 1 (PPO), or, for data sampled by an older policy, the decoupled objective: p_old the proximal policy
    and w_i = p_prox / p_behaviour (`behaviour_weight`, detached; `proximal_log_probs`)."""
    ratio = torch.exp(log_prob - log_prob_old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    loss = (per_sample if behaviour_weight is None else behaviour_weight * per_sample).mean()
    info = {
        "approx_kl": 0.5 * ((log_prob - log_prob_old) ** 2).mean().detach(),
        "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean().detach(),
        "ratio": ratio.mean().detach(),
    }
    return loss, info


def trained_steps(schedule, min_step_std: float) -> torch.Tensor:
    """[S] the step indices the ratio trains on: the stochastic ones (a deterministic step has no density) whose
    transition std is at least `min_step_std`."""
    steps = schedule.stochastic_steps.cpu()
    steps = steps[schedule.std.cpu()[steps] >= min_step_std]
    if len(steps) == 0:
        raise ValueError(f"no sampler step has a transition std >= algo.min_step_std={min_step_std:g} (the largest is "
                         f"{schedule.std.max().item():.3g}); lower algo.min_step_std or raise env.eta")
    return steps


# Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization", sec. 3; AReaL's correction for
# asynchronous rollouts): on data an older policy sampled, PPO's ratio against the behaviour policy is already far
# outside the clip range after one publish (with DDPO's eps = 1e-4, 99% of a stale batch was clipped: no gradient).
# The ratio is taken against the proximal policy, the weights at the start of this update, and the behaviour
# policy enters as the importance weight p_prox / p_behaviour, detached and capped here; on fresh data both policies
# are the same and the loss is PPO's.
BEHAVIOUR_WEIGHT_CAP = 5.0


@dataclass
class Proximal:
    """The proximal policy's log-probabilities of the buffer's trajectories, for the decoupled objective."""

    log_probs: torch.Tensor  # [N, T] row i: the trajectory at storage index i (what minibatches carry as "index")
    # [N] bool, or None: stale rows whose entries the update's first minibatch fills in from its own forward (the
    # weights have not moved yet there, so that forward is the proximal policy's), saving that share of the pass
    pending: torch.Tensor | None = None


def proximal_log_probs(ctx: LearnerContext, steps: torch.Tensor, first: TensorDict | None = None) -> Proximal | None:
    """Log-probabilities at `steps` of the buffer's trajectories under the current weights, on the learner's device,
    when some trajectory was sampled by an older policy version than the learner's; None when all are on-policy.
    Only the stale rows are recomputed (a fresh row's behaviour policy is the proximal one), and of those, not the
    rows of `first` (the minibatch the update trains on first, on every step in `steps`): `train_step` takes them
    from its own forward."""
    stored = ctx.buffer.contents()
    stale = stored["policy_version"] < ctx.policy_version  # [N]
    pending = torch.zeros_like(stale)
    if first is not None:
        pending[first["index"].cpu()] = True
        pending &= stale
    rows_to_compute = (stale & ~pending).nonzero().squeeze(1)
    chunks = list(rows_to_compute.split(ctx.buffer.minibatch_size)) if len(rows_to_compute) else []  # (an empty
    # tensor splits into one). FSDP: a replica with fewer chunks than another makes spare calls (results unused)
    calls = chunks + [torch.zeros(1, dtype=torch.long)] * ctx.spare_calls(len(chunks))
    any_pending = bool(pending.any())
    if not calls and not any_pending:
        return None
    log_probs = stored["log_prob"].to(ctx.device, copy=True)
    with torch.no_grad():
        for i, rows in enumerate(calls):
            chunk = stored[rows].to(ctx.device)
            latents = chunk["latents"]  # [b, T+1, ...]
            for k in steps.tolist():
                out = ctx.policy.step(latents[:, k], k, chunk["context"], prev_sample=latents[:, k + 1])
                if i < len(chunks):
                    log_probs[rows.to(ctx.device), k] = out.log_prob
    return Proximal(log_probs, pending.to(ctx.device) if any_pending else None)


def update_passes(ctx: LearnerContext, cfg, steps: torch.Tensor, prefix: str) -> list[dict[str, float]]:
    """`cfg.inner_epochs` reshuffled passes over the buffer, one `train_step` per minibatch on `steps`; on stale data
    the decoupled objective, against the weights at the start of this update (DDPO and GRPO)."""
    minibatches = ctx.minibatches()
    first = next(minibatches, None)
    if first is None:
        return []
    every_step = num_train_steps(cfg, steps) == len(steps)  # else `first` trains only some of its steps
    proximal = proximal_log_probs(ctx, steps, first if every_step else None)
    metrics = [train_step(ctx, first, cfg, steps, prefix, proximal)]
    if proximal is not None:
        proximal.pending = None  # filled in: the weights move on from here
    metrics += [train_step(ctx, minibatch, cfg, steps, prefix, proximal) for minibatch in minibatches]
    for _ in range(cfg.inner_epochs - 1):
        metrics += [train_step(ctx, minibatch, cfg, steps, prefix, proximal) for minibatch in ctx.minibatches()]
    return metrics


def num_train_steps(cfg, steps: torch.Tensor) -> int:
    """Steps of each trajectory trained on per optimizer step: `timestep_fraction` of `steps`, at least one."""
    return max(1, round(cfg.timestep_fraction * len(steps)))


def train_step(ctx: LearnerContext, batch: TensorDict, cfg: Config, steps: torch.Tensor | None = None,
               prefix: str = "ddpo", proximal: Proximal | None = None) -> dict[str, float]:  # fmt: skip
    """One optimizer step on a minibatch of whole trajectories, accumulating gradients over timesteps.

    Each network call's loss is backpropagated at once, so memory holds the graph of `timesteps_per_forward`
    timesteps, not the trajectory's. The loss is the mean over trained timesteps of `ddpo_loss` (plus kl_weight times
    the exact KL of each trained transition to the frozen base model's), however they are grouped into calls.
    `steps` are the step indices trained on (default: `trained_steps`; GRPO passes a window of them); the metrics
    are named `<prefix>/...`. `cfg` needs clip_range, kl_weight, timestep_fraction, timesteps_per_forward,
    min_step_std and max_grad_norm (GRPO's Config has them too). `proximal` (`proximal_log_probs`) switches to the
    decoupled objective for stale data.
    """
    policy = ctx.policy
    num_trajectories = batch.batch_size[0]
    if steps is None:
        steps = trained_steps(policy.schedule, cfg.min_step_std)
    trained_per_row = num_train_steps(cfg, steps)
    # an independent random order of timesteps per trajectory; the first trained_per_row are trained on
    order = torch.stack([steps[torch.randperm(len(steps), generator=ctx.generator)] for _ in range(num_trajectories)])
    order = order[:, :trained_per_row].to(batch.device)  # [B, trained_per_row]
    rows = torch.arange(num_trajectories, device=batch.device)
    ctx.optimizer.zero_grad(set_to_none=True)
    totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=batch.device))
    for columns in order.split(cfg.timesteps_per_forward, dim=1):  # [B, k]: k timesteps per trajectory
        k = columns.shape[1]
        step_index = columns.reshape(-1)  # [B * k], trajectory-major
        row = rows.repeat_interleave(k)  # [B * k]
        x_t, x_prev, context = batch["latents"][row, step_index], batch["latents"][row, step_index + 1], batch[
            "context"][row]  # fmt: skip
        out = policy.step(x_t, step_index, context, prev_sample=x_prev, network=ctx.network)
        log_prob_old, weight = batch["log_prob"][row, step_index], None
        if proximal is not None:
            behaviour, index = log_prob_old, batch["index"][row]
            log_prob_old = proximal.log_probs[index, step_index]
            if proximal.pending is not None:  # the update's first minibatch: its forward is the proximal policy's
                log_prob_old = torch.where(proximal.pending[index], out.log_prob.detach(), log_prob_old)
                proximal.log_probs[index, step_index] = log_prob_old  # for the later passes
            weight = torch.exp(log_prob_old - behaviour).clamp(max=BEHAVIOUR_WEIGHT_CAP)
        loss, info = ddpo_loss(out.log_prob, log_prob_old, batch["advantage"][row], cfg.clip_range, weight)
        if weight is not None:
            info["behaviour_weight"] = weight.mean().detach()
        if cfg.kl_weight > 0:
            with torch.no_grad():
                reference = policy.step(x_t, step_index, context, prev_sample=x_prev, reference=True)
            kl = transition_kl(out.mean, reference.mean, out.std).mean()
            loss = loss + cfg.kl_weight * kl
            info["kl_to_base"] = kl.detach()
        share = k / trained_per_row  # `loss` is the mean over k timesteps: weight it by their share of the total
        (loss * share).backward()
        totals["loss/policy"] += loss.detach() * share
        for key, value in info.items():
            totals[f"{prefix}/{key}"] += value * share
    metrics = {key: value.item() for key, value in totals.items()}  # one host sync per optimizer step
    return {**metrics, **ctx.optimizer_step(cfg.max_grad_norm)}


# ---- the learner-side interface (see rlft.algorithms.Algorithm) ----
def uses_rollouts(cfg: Config) -> bool:
    return True


def reference_roles(cfg: Config) -> tuple[str, ...]:
    return ("learner",) if cfg.kl_weight > 0 else ()


def validate(spec) -> list[str]:
    return []


def schedule_problems(spec, schedule) -> list[str]:
    """Checks on the env's sampler, once its model is found (rlft.config.validate): a step to train on at
    algo.min_step_std (DDPO and GRPO)."""
    try:
        trained_steps(schedule, spec.algo.min_step_std)
    except ValueError as error:
        return [str(error)]
    return []


def make_state(cfg: Config) -> PerContextStatTracker:
    return PerContextStatTracker(cfg.stat_window, cfg.stat_min_count)


def make_correction(cfg: Config, env) -> None:
    return None


def postprocess_rollout(worker, batch: TensorDict, cfg: Config) -> TensorDict:
    return batch


def prepare(batch: TensorDict, cfg: Config, state: PerContextStatTracker) -> tuple[TensorDict, dict]:
    return compute_advantages(batch, cfg, state), {}


def update(ctx: LearnerContext, cfg: Config, state: PerContextStatTracker) -> dict[str, float]:
    """`inner_epochs` reshuffled passes over the collected batch, one optimizer step per minibatch."""
    return mean_over_steps(update_passes(ctx, cfg, trained_steps(ctx.policy.schedule, cfg.min_step_std), "ddpo"))
