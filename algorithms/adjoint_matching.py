"""Adjoint Matching (AM), buffered: regress the control onto the lean adjoint of the frozen base model.

Domingo-Enrich et al. 2025, "Adjoint Matching: Fine-tuning Flow and Diffusion Generative Models with
Memoryless Stochastic Optimal Control" (arXiv 2409.08861). With the memoryless schedule (DDIM, eta = 1) the
fine-tuned sampler that minimises E[sum_k 1/2 |u_k|^2 dt - lambda r(x_0)] draws from p_base(x) exp(lambda r(x)).

- Lean adjoint (AM eq. 25): a(x_0) = -lambda grad r(x_0); backwards over the steps k -> k+1,
  a_k = a_{k+1} + grad_x <x_{k+1}^{base,det}(x) - x, a_{k+1}> at x = x_k = J_k^T a_{k+1}: one vector-Jacobian
  product through the deterministic base step (the transition mean) per timestep. It depends on the base model
  and the trajectory only, so rollout workers compute it once and the learner may reuse it (buffered AM).
- Loss (AM eq. 26, discretised): sum over a few stratified steps k of |u_k sqrt(dt) + sigma_k a_{k+1}|^2 with
  u_k sqrt(dt) = (x_{k+1}^{fine,det} - x_{k+1}^{base,det}) / sigma_k, sigma_k the step's noise scale.
  Each step pairs with the adjoint of the state it leads to: at the last stochastic step the optimal tilt of
  N(base_det, sigma^2) by exp(lambda r) moves the mean by sigma^2 lambda grad r = -sigma^2 a_{k+1}.
- Per-sample losses are clipped at an EMA of their 0.9 quantile (scaled down to it, gradient direction kept).
- Buffered AM: one epoch = one buffer fill; `update` makes `passes_per_buffer` reshuffled passes over it, so
  trainer.max_staleness = 0 is right (the next epoch refills). On-policy AM: `passes_per_buffer: 1`.
- Step-wise Girsanov log-weights of a stored trajectory under the current model, relative to the model that
  sampled it: sum_k <d_k, xi_k> - 1/2 |d_k|^2, d_k = (mean_now - mean_then) / sigma_k, xi_k the recorded noise.
  Their effective sample size is logged; optionally it weights the loss or ends the passes early (refill).

Batch schema (rollout workers, `postprocess_rollout`; B trajectories, T steps, x of shape [C, H, W]):
    latents      [B, T+1, C, H, W]  x at steps 0..T (noise first): step k goes latents[:, k] -> latents[:, k+1]
    noise        [B, T, C, H, W]    xi_k: latents[:, k+1] = mean_k + sigma_k xi_k under the sampling model
    base_mean    [B, T, C, H, W]    x_{k+1}^{base,det}(latents[:, k]), guided as the control computation is
    adjoint      [B, T, C, H, W]    a_{k+1}: the lean adjoint at latents[:, k+1]
    context      [B, *ctx]          the condition (empty for unconditional models)
    reward       [B]                r(x_0, c)

Classifier-free guidance (conditional models; the null context is zeros shaped like the context):
eps = eps(x, null) + w (eps(x, c) - eps(x, null)) with w = `guidance_scale`. `guidance_in_adjoint_computation`
uses the guided base in the lean adjoint's VJPs; `guidance_in_control_computation` forms u from guided fine-tuned
and base means. Without either, training is conditional only (w = 1) and guidance is a sampling-time choice;
with both (full CFG) the adjoints of large w blow up. Rollouts sample without guidance, so the Girsanov weights
are exact only when the control is computed without it.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass

import torch
from rlft.algorithms import LearnerContext, mean_over_steps
from tensordict import TensorDict

from rlft.policy import DiffusionPolicy, StepOutput, ddim_step

REQUIRES_STOCHASTIC_SAMPLER = True  # the control is defined by the noise scale sigma_k > 0 (memoryless: eta = 1)
REQUIRES_DIFFERENTIABLE_REWARD = True  # the lean adjoint starts at -lambda grad r(x_0)
USES_ROLLOUTS = True
ROLLOUT_KEYS = ("noise",)  # the Girsanov weights need the sampling noise of every step


@dataclass
class AdjointMatchingConfig:
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm) before each optimizer step
    minibatch_size: int = 32  # trajectories per optimizer step
    reward_multiplier: float = 10.0  # lambda: the fine-tuned model targets p_base(x) exp(lambda r(x))
    num_train_timesteps: int = 4  # steps per trajectory in the loss, one from each of this many strata
    passes_per_buffer: int = 10  # reshuffled passes over each buffer fill (1 = on-policy AM)
    clip_quantile: float = 0.9  # per-sample losses are clipped at an EMA of this quantile of a minibatch's losses
    clip_ema_decay: float = 0.9  # decay of that EMA
    clip_losses: bool = True  # false trains on unclipped per-sample losses
    importance_weighting: bool = False  # weight per-sample losses by self-normalised Girsanov weights
    refill_below_ess: float = 0.0  # end the passes early (next epoch refills) once a pass's ESS fraction is below
    guidance_scale: float = 1.0  # classifier-free guidance weight w (1 = conditional only; conditional models)
    guidance_in_adjoint_computation: bool = False  # the lean adjoint's base steps use the guided base model
    guidance_in_control_computation: bool = False  # the control u is formed from guided fine-tuned and base means


# ---- the sampler step of the control problem (memoryless DDIM) ----


def guided_step(
    network: torch.nn.Module,
    schedule,
    x: torch.Tensor,
    step_index: int | torch.Tensor,
    context: torch.Tensor,
    guidance_scale: float = 1.0,
) -> StepOutput:
    """The DDIM transition of step k from x with classifier-free guidance w; its `mean` is x_{k+1}^{det}, `std`
    is sigma_k. `network` is a DiffusionPolicy (or its DDP wrapper): network(x_t, timestep, context) -> eps."""
    step_index = torch.as_tensor(step_index, device=x.device).expand(x.shape[0])
    timestep = schedule.timesteps.to(x.device)[step_index]  # [B]
    if guidance_scale == 1.0:
        eps = network(x, timestep, context)
    else:  # one batched call for the conditional and the null context
        null = torch.zeros_like(context)
        eps_cond, eps_null = network(torch.cat([x, x]), torch.cat([timestep, timestep]),
                                     torch.cat([context, null])).chunk(2)  # fmt: skip
        eps = eps_null + guidance_scale * (eps_cond - eps_null)
    a_t = schedule.alpha_prod.to(x.device)[step_index]
    a_prev = schedule.alpha_prod_prev.to(x.device)[step_index]
    return ddim_step(eps, x, a_t, a_prev, schedule.eta, noise=torch.zeros_like(x))


def control(fine_mean: torch.Tensor, base_mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """u_k sqrt(dt) = (x_{k+1}^{fine,det} - x_{k+1}^{base,det}) / sigma_k."""
    return (fine_mean - base_mean) / sigma


# ---- rollout side: the lean adjoint through the frozen base model ----


def lean_adjoint(
    base: DiffusionPolicy,
    latents: torch.Tensor,
    context: torch.Tensor,
    reward_fn,
    reward_multiplier: float,
    guidance_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(adjoint [B, T, ...], base_mean [B, T, ...]): a_{k+1} at latents[:, k+1] and the base step's mean from
    latents[:, k], for k = 0..T-1 (AM eq. 25, one VJP per step); `reward_fn(images, context) -> [B]`."""
    num_steps = latents.shape[1] - 1
    with torch.enable_grad():
        x_final = latents[:, -1].detach().float().requires_grad_(True)
        (grad_reward,) = torch.autograd.grad(reward_fn(x_final, context).sum(), x_final)
        adjoint = -reward_multiplier * grad_reward  # a(x_0) = -lambda grad r
        adjoints, base_means = [None] * num_steps, [None] * num_steps
        for k in reversed(range(num_steps)):
            adjoints[k] = adjoint
            x = latents[:, k].detach().float().requires_grad_(True)
            mean = guided_step(base, base.schedule, x, k, context, guidance_scale).mean
            (adjoint,) = torch.autograd.grad(mean, x, grad_outputs=adjoint)  # J_k^T a_{k+1}
            base_means[k] = mean.detach()
    return torch.stack(adjoints, dim=1), torch.stack(base_means, dim=1)


_BASE_POLICIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # rollout worker -> its frozen base


def frozen_base(worker) -> DiffusionPolicy:
    """The rollout worker's own copy of the pretrained model, loaded once, never updated."""
    if worker not in _BASE_POLICIES:
        from rlft.policy import load_base_model

        unet, _ = load_base_model(worker.cfg["env"]["base_model"])
        base = DiffusionPolicy(unet.to(worker.device), worker.env.schedule, worker.policy.autocast_dtype)
        _BASE_POLICIES[worker] = base.eval().requires_grad_(False)
    return _BASE_POLICIES[worker]


def add_lean_adjoints(batch: TensorDict, base: DiffusionPolicy, reward_fn, cfg: AdjointMatchingConfig) -> TensorDict:
    """Add `adjoint` and `base_mean` ([B, T, ...] each) to sampled trajectories."""
    adjoint_scale = cfg.guidance_scale if cfg.guidance_in_adjoint_computation else 1.0
    control_scale = cfg.guidance_scale if cfg.guidance_in_control_computation else 1.0
    latents, context = batch["latents"], batch["context"]
    adjoint, base_mean = lean_adjoint(base, latents, context, reward_fn, cfg.reward_multiplier, adjoint_scale)
    if control_scale != adjoint_scale:  # the control needs the base means under the other guidance
        with torch.no_grad():
            flat = latents[:, :-1].flatten(0, 1)  # [B*T, ...]
            steps = torch.arange(latents.shape[1] - 1, device=latents.device).repeat(latents.shape[0])
            contexts = context.repeat_interleave(latents.shape[1] - 1, dim=0)
            base_mean = guided_step(base, base.schedule, flat, steps, contexts, control_scale).mean
            base_mean = base_mean.reshape(adjoint.shape)
    batch["adjoint"] = adjoint  # [B, T, C, H, W]
    batch["base_mean"] = base_mean  # [B, T, C, H, W]
    return batch


def postprocess_rollout(worker, batch: TensorDict, cfg: dict) -> TensorDict:
    """Rollout-worker hook (rlft.rollout): lean adjoints and base means from the worker's frozen base model."""
    from rlft.algorithms import make_config

    algo = make_config(sys.modules[__name__], cfg["algo"])
    base = frozen_base(worker)
    finite = batch["reward_finite"]  # non-finite rewards have no gradient; the learner drops those rows
    shape = (len(batch), batch["latents"].shape[1] - 1, *batch["latents"].shape[2:])
    adjoint = torch.zeros(shape, device=batch.device)  # [B, T, C, H, W]
    base_mean = torch.zeros(shape, device=batch.device)  # [B, T, C, H, W]
    if finite.any():
        done = add_lean_adjoints(batch[finite].to(worker.device), base, worker.env.reward.fn, algo).to(batch.device)
        adjoint[finite], base_mean[finite] = done["adjoint"], done["base_mean"]
    batch["adjoint"], batch["base_mean"] = adjoint, base_mean
    return batch


# ---- learner side: the loss ----


def stratified_steps(stochastic_steps: torch.Tensor, batch_size: int, count: int, generator) -> torch.Tensor:
    """[B, count] step indices: the stochastic steps split into `count` contiguous strata, one uniform draw
    from each stratum per trajectory (AM trains on a few timesteps of each trajectory)."""
    count = min(count, len(stochastic_steps))
    strata = torch.tensor_split(stochastic_steps.cpu(), count)
    picks = [s[torch.randint(len(s), (batch_size,), generator=generator)] for s in strata]
    return torch.stack(picks, dim=1)


def adjoint_matching_loss(
    fine_mean: torch.Tensor, base_mean: torch.Tensor, sigma: torch.Tensor, adjoint: torch.Tensor
) -> torch.Tensor:
    """Per-sample AM loss of one step ([B]): |u_k sqrt(dt) + sigma_k a_{k+1}|^2 summed over dimensions (AM eq. 26)."""
    residual = control(fine_mean, base_mean, sigma) + sigma * adjoint
    return residual.pow(2).flatten(1).sum(1)


def girsanov_log_weight_step(
    fine_mean: torch.Tensor, next_state: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """[B] log dP_now/dP_then of one step: <d, xi> - 1/2 |d|^2, d = (mean_now - mean_then) / sigma, where the
    sampling model's mean was mean_then = x_{k+1} - sigma xi."""
    drift = (fine_mean - (next_state - sigma * noise)) / sigma
    return (drift * noise - 0.5 * drift**2).flatten(1).sum(1)


def effective_sample_fraction(log_weights: torch.Tensor) -> torch.Tensor:
    """(sum w)^2 / (n sum w^2) in (0, 1]: 1 when all weights are equal."""
    return torch.exp(2 * torch.logsumexp(log_weights, 0) - torch.logsumexp(2 * log_weights, 0)) / len(log_weights)


class ClipState:
    """The EMA of the per-sample loss quantile that losses are clipped at."""

    def __init__(self):
        self.threshold: float | None = None
        self.train_network_evals = 0.0  # per-sample network forward passes in the learner, cumulative

    def update(self, losses: torch.Tensor, cfg: AdjointMatchingConfig) -> float:
        quantile = torch.quantile(losses.detach().float(), cfg.clip_quantile).item()
        decay = cfg.clip_ema_decay
        self.threshold = quantile if self.threshold is None else decay * self.threshold + (1 - decay) * quantile
        return self.threshold

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "train_network_evals": self.train_network_evals}

    def load_state_dict(self, state: dict) -> None:
        self.threshold, self.train_network_evals = state["threshold"], state["train_network_evals"]


def train_step(ctx: LearnerContext, batch: TensorDict, cfg: AdjointMatchingConfig, state: ClipState) -> dict:
    """One optimizer step on a minibatch: the AM loss over `num_train_timesteps` stratified steps."""
    policy = ctx.policy
    schedule = policy.schedule
    control_scale = cfg.guidance_scale if cfg.guidance_in_control_computation else 1.0
    num_trajectories = batch.batch_size[0]
    stochastic = schedule.stochastic_steps.cpu()
    steps = stratified_steps(stochastic, num_trajectories, cfg.num_train_timesteps, ctx.generator).to(batch.device)
    rows = torch.arange(num_trajectories, device=batch.device)
    per_sample = torch.zeros(num_trajectories, device=batch.device)
    log_weights = torch.zeros(num_trajectories, device=batch.device)
    for j in range(steps.shape[1]):
        k = steps[:, j]  # [B]
        out = guided_step(ctx.network, schedule, batch["latents"][rows, k], k, batch["context"], control_scale)
        sigma = out.std  # [B, 1, 1, 1]
        per_sample = per_sample + adjoint_matching_loss(
            out.mean, batch["base_mean"][rows, k], sigma, batch["adjoint"][rows, k]
        )
        log_weights += girsanov_log_weight_step(out.mean.detach(), batch["latents"][rows, k + 1],
                                                batch["noise"][rows, k], sigma)  # fmt: skip
    log_weights *= len(stochastic) / steps.shape[1]  # the trained steps estimate the sum over all steps
    ess = effective_sample_fraction(log_weights)
    losses = per_sample
    metrics = {"am/loss_unclipped": per_sample.mean().item()}
    if cfg.clip_losses:
        threshold = state.update(per_sample, cfg)
        scale = torch.clamp(threshold / per_sample.detach().clamp(min=1e-12), max=1.0)  # values at most threshold
        losses = per_sample * scale
        metrics.update({"am/clip_threshold": threshold, "am/clip_fraction": (scale < 1).float().mean().item()})
    if cfg.importance_weighting:
        losses = losses * torch.softmax(log_weights, 0) * num_trajectories
    loss = losses.mean()
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    ctx.optimizer.step()
    passes = 2 if control_scale != 1.0 else 1
    state.train_network_evals += num_trajectories * steps.shape[1] * passes
    return {**metrics, "loss/adjoint_matching": loss.item(), "am/ess_fraction": ess.item(),
            "train/grad_norm": grad_norm.item()}  # fmt: skip


# ---- the learner-side interface (see algorithms/__init__.py) ----
Config = AdjointMatchingConfig


def validate(cfg) -> list[str]:
    """Config problems specific to AM (called by rlft.config.validate): a list of messages, empty when fine."""
    problems = []
    if cfg.env.eta != 1.0:
        problems.append(f"algo=adjoint_matching needs the memoryless schedule, but env.eta={cfg.env.eta}; use "
                        "env.eta=1.0 (with another eta the fine-tuned model does not sample p_base exp(lambda r))")
    if cfg.algo.passes_per_buffer < 1:
        problems.append(f"algo.passes_per_buffer={cfg.algo.passes_per_buffer} must be at least 1 (1 = on-policy AM)")
    if cfg.algo.num_train_timesteps < 1:
        problems.append(f"algo.num_train_timesteps={cfg.algo.num_train_timesteps} must be at least 1")
    if not 0.0 <= cfg.algo.refill_below_ess < 1.0:
        problems.append(f"algo.refill_below_ess={cfg.algo.refill_below_ess} must lie in [0, 1) (0 = never early)")
    return problems


def make_state(cfg: AdjointMatchingConfig) -> ClipState:
    return ClipState()


def prepare(batch: TensorDict, cfg: AdjointMatchingConfig, state: ClipState) -> tuple[TensorDict, dict]:
    missing = {"adjoint", "base_mean", "noise"} - set(batch.keys())
    if missing:
        raise KeyError(f"trajectories lack {sorted(missing)}: the rollout workers must run "
                       "rlft.algorithms.adjoint_matching.postprocess_rollout (rlft.rollout calls it)")  # fmt: skip
    num_steps = batch["latents"].shape[1] - 1
    adjoint_norm = batch["adjoint"][:, -1].flatten(1).norm(dim=1).mean().item()
    # per trajectory: T fine-tuned steps to sample, T base steps (+ their VJPs) for the adjoint
    rollout_evals = len(batch) * num_steps * (2 + (cfg.guidance_scale != 1.0))
    return batch, {"am/final_adjoint_norm": adjoint_norm, "am/rollout_network_evals": float(rollout_evals)}


def update(ctx: LearnerContext, cfg: AdjointMatchingConfig, state: ClipState) -> dict[str, float]:
    """`passes_per_buffer` reshuffled passes over this epoch's buffer fill, one optimizer step per minibatch;
    with `refill_below_ess`, the passes stop once a pass's mean ESS fraction drops below it."""
    step_metrics, passes = [], 0
    for _ in range(cfg.passes_per_buffer):
        pass_metrics = [train_step(ctx, minibatch, cfg, state) for minibatch in ctx.minibatches()]
        step_metrics += pass_metrics
        passes += 1
        last_ess = sum(m["am/ess_fraction"] for m in pass_metrics) / max(1, len(pass_metrics))
        if cfg.refill_below_ess > 0 and last_ess < cfg.refill_below_ess:
            break
    return {**mean_over_steps(step_metrics), "am/ess_fraction_last_pass": last_ess, "am/passes": float(passes),
            "am/train_network_evals_total": state.train_network_evals}

