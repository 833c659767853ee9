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

Classifier-free guidance (conditional models, e.g. Stable Diffusion; the null context is the env's negative-prompt
embedding, as in sampling): trajectories are sampled as the env samples them, guided with env.guidance_scale = w.
`guidance_in_adjoint_computation` uses the guided base model in the lean adjoint's VJPs,
`guidance_in_control_computation` forms u from guided fine-tuned and base means; otherwise both use w = 1 (the
conditional model). The seed's recommendation is the default: guided trajectories, unguided adjoint and control
(with both guided, full CFG, the adjoints of large w blow up). Girsanov weights compare the current model's sampling
(guided) transitions with the stored ones, so with an unguided control they cost one more network call per trained
step; they are computed only when something uses them (importance_weighting, refill_below_ess).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict

from rlft.algorithms import LearnerContext, mean_over_steps
from rlft.core.sampler import StepOutput
from rlft.core.spec import knob

REQUIRES_STOCHASTIC_SAMPLER = True  # the control is defined by the noise scale sigma_k > 0 (memoryless: eta = 1)
REQUIRES_DIFFERENTIABLE_REWARD = True  # the lean adjoint starts at -lambda grad r(x_0)
GRADIENT_CHECKPOINTING = False
ROLLOUT_KEYS = ("noise",)  # the Girsanov weights need the sampling noise of every step
PREPARE_ACROSS_REPLICAS = ()


@dataclass
class Config:
    name: str = knob("adjoint_matching", "algorithm module in algorithms/")
    epochs: int = knob(20, "trainer.epochs unless the command line sets it (95% target digits by epoch 10 on digits)",
                       ge=1)  # fmt: skip
    lr: float = knob(3e-4, "AdamW learning rate", gt=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = knob(1.0, "gradient clipping (global L2 norm) before each optimizer step", gt=0)
    minibatch_size: int = knob(32, "trajectories per optimizer step", ge=1)
    reward_multiplier: float = knob(10.0, "lambda: the fine-tuned model targets p_base(x) exp(lambda r(x)); the KL "
                                    "to the base model weighs 1 / lambda", gt=0)  # fmt: skip
    num_train_timesteps: int = knob(4, "steps per trajectory in the loss, one from each of this many strata", ge=1)
    passes_per_buffer: int = knob(10, "reshuffled passes over each buffer fill (1 = on-policy AM)", ge=1)
    clip_quantile: float = knob(0.9, "per-sample losses are clipped at an EMA of this quantile of a minibatch's",
                                gt=0, le=1)  # fmt: skip
    clip_ema_decay: float = knob(0.9, "decay of that EMA", ge=0, lt=1)
    clip_losses: bool = knob(True, "false trains on unclipped per-sample losses")
    importance_weighting: bool = knob(False, "weight per-sample losses by self-normalised step-wise Girsanov weights")
    refill_below_ess: float = knob(0.0, "end the passes early (the next epoch refills) once a pass's mean ESS "
                                   "fraction is below this (0 = never)", ge=0, lt=1)  # fmt: skip
    guidance_in_adjoint_computation: bool = knob(False, "the lean adjoint's base steps use the guided base model "
                                                 "(env.guidance_scale)")  # fmt: skip
    guidance_in_control_computation: bool = knob(False, "the control u is formed from guided fine-tuned and base "
                                                 "means (env.guidance_scale)")  # fmt: skip


def sampling_guidance(policy) -> float:
    return policy.guidance_scale if policy.conditional else 1.0


def adjoint_guidance(policy, cfg: Config) -> float:
    return sampling_guidance(policy) if cfg.guidance_in_adjoint_computation else 1.0


def control_guidance(policy, cfg: Config) -> float:
    return sampling_guidance(policy) if cfg.guidance_in_control_computation else 1.0


def deterministic_mean(policy, x: torch.Tensor, step_index: int | torch.Tensor, context: torch.Tensor,
                       guidance_scale: float, network=None, reference: bool = False) -> StepOutput:  # fmt: skip
    """The DDIM transition of step k from x: its `mean` is x_{k+1}^{det}, its `std` sigma_k (the step's noise)."""
    return policy.step(x, step_index, context, noise=torch.zeros_like(x), network=network,
                       guidance_scale=guidance_scale, reference=reference)  # fmt: skip


def control(fine_mean: torch.Tensor, base_mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """u_k sqrt(dt) = (x_{k+1}^{fine,det} - x_{k+1}^{base,det}) / sigma_k."""
    return (fine_mean - base_mean) / sigma


# ---- rollout side: the lean adjoint through the frozen base model ----


def lean_adjoint(policy, latents: torch.Tensor, context: torch.Tensor, score, reward_multiplier: float,
                 guidance_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(adjoint [B, T, ...], base_mean [B, T, ...]): a_{k+1} at latents[:, k+1] and the frozen base step's mean from
    latents[:, k], for k = 0..T-1 (AM eq. 25, one VJP per step). `score(x_0, context) -> (rewards [B], finite [B])`
    is the env's, so latent models differentiate through the decoder."""
    num_steps = latents.shape[1] - 1
    with torch.enable_grad():
        x_final = latents[:, -1].detach().float().requires_grad_(True)
        rewards, _ = score(x_final, context)
        (grad_reward,) = torch.autograd.grad(rewards.sum(), x_final)
        adjoint = -reward_multiplier * grad_reward  # a(x_0) = -lambda grad r
        adjoints, base_means = [None] * num_steps, [None] * num_steps
        for k in reversed(range(num_steps)):
            adjoints[k] = adjoint
            x = latents[:, k].detach().float().requires_grad_(True)
            mean = deterministic_mean(policy, x, k, context, guidance_scale, reference=True).mean
            (adjoint,) = torch.autograd.grad(mean, x, grad_outputs=adjoint)  # J_k^T a_{k+1}
            base_means[k] = mean.detach()
    return torch.stack(adjoints, dim=1), torch.stack(base_means, dim=1)


def add_lean_adjoints(batch: TensorDict, policy, score, cfg: Config) -> TensorDict:
    """Add `adjoint` and `base_mean` ([B, T, ...] each) to sampled trajectories."""
    adjoint_scale, control_scale = adjoint_guidance(policy, cfg), control_guidance(policy, cfg)
    latents, context = batch["latents"], batch["context"]
    adjoint, base_mean = lean_adjoint(policy, latents, context, score, cfg.reward_multiplier, adjoint_scale)
    if control_scale != adjoint_scale:  # the control needs the base means under the other guidance
        with torch.no_grad():
            flat = latents[:, :-1].flatten(0, 1)  # [B*T, ...]
            steps = torch.arange(latents.shape[1] - 1, device=latents.device).repeat(latents.shape[0])
            contexts = context.repeat_interleave(latents.shape[1] - 1, dim=0)
            base_mean = deterministic_mean(policy, flat, steps, contexts, control_scale, reference=True).mean
            base_mean = base_mean.reshape(adjoint.shape)
    batch["adjoint"] = adjoint  # [B, T, C, H, W]
    batch["base_mean"] = base_mean  # [B, T, C, H, W]
    return batch


def postprocess_rollout(worker, batch: TensorDict, cfg: Config) -> TensorDict:
    """Rollout-worker hook (rlft.rollout): lean adjoints and base means from the worker's frozen base model."""
    finite = batch["reward_finite"]  # non-finite rewards have no gradient; the learner drops those rows
    shape = (len(batch), batch["latents"].shape[1] - 1, *batch["latents"].shape[2:])
    adjoint = torch.zeros(shape, device=batch.device)  # [B, T, C, H, W]
    base_mean = torch.zeros(shape, device=batch.device)  # [B, T, C, H, W]
    if finite.any():
        rows = batch[finite].to(worker.device)
        done = add_lean_adjoints(rows, worker.policy, worker.env.score, cfg).to(batch.device)
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

    def update(self, losses: torch.Tensor, cfg: Config) -> float:
        quantile = torch.quantile(losses.detach().float(), cfg.clip_quantile).item()
        decay = cfg.clip_ema_decay
        self.threshold = quantile if self.threshold is None else decay * self.threshold + (1 - decay) * quantile
        return self.threshold

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "train_network_evals": self.train_network_evals}

    def load_state_dict(self, state: dict) -> None:
        self.threshold, self.train_network_evals = state["threshold"], state["train_network_evals"]


def train_step(ctx: LearnerContext, batch: TensorDict, cfg: Config, state: ClipState) -> dict:
    """One optimizer step on a minibatch: the AM loss over `num_train_timesteps` stratified steps."""
    policy = ctx.policy
    schedule = policy.schedule
    control_scale, sampling_scale = control_guidance(policy, cfg), sampling_guidance(policy)
    weights_needed = cfg.importance_weighting or cfg.refill_below_ess > 0 or control_scale == sampling_scale
    num_trajectories = batch.batch_size[0]
    stochastic = schedule.stochastic_steps.cpu()
    steps = stratified_steps(stochastic, num_trajectories, cfg.num_train_timesteps, ctx.generator).to(batch.device)
    rows = torch.arange(num_trajectories, device=batch.device)
    per_sample = torch.zeros(num_trajectories, device=batch.device)
    log_weights = torch.zeros(num_trajectories, device=batch.device)
    context = batch["context"]
    for j in range(steps.shape[1]):
        k = steps[:, j]  # [B]
        x = batch["latents"][rows, k]
        out = deterministic_mean(policy, x, k, context, control_scale, network=ctx.network)
        sigma = out.std  # [B, 1, 1, 1]
        per_sample = per_sample + adjoint_matching_loss(out.mean, batch["base_mean"][rows, k], sigma,
                                                        batch["adjoint"][rows, k])  # fmt: skip
        if weights_needed:  # the current model's sampling transition against the one that made the trajectory
            if control_scale == sampling_scale:
                sampling_mean = out.mean.detach()
            else:
                with torch.no_grad():
                    sampling_mean = deterministic_mean(policy, x, k, context, sampling_scale).mean
            log_weights += girsanov_log_weight_step(sampling_mean, batch["latents"][rows, k + 1],
                                                    batch["noise"][rows, k], sigma)  # fmt: skip
    log_weights *= len(stochastic) / steps.shape[1]  # the trained steps estimate the sum over all steps
    losses = per_sample
    metrics = {"am/loss_unclipped": per_sample.mean().item()}
    if weights_needed:
        metrics["am/ess_fraction"] = effective_sample_fraction(log_weights).item()
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
    calls = 2 if (policy.conditional and control_scale != 1.0) else 1  # a guided call is two network passes
    state.train_network_evals += num_trajectories * steps.shape[1] * calls
    return {**metrics, "loss/adjoint_matching": loss.item(), **ctx.optimizer_step(cfg.max_grad_norm)}


# ---- the learner-side interface (see rlft.algorithms.Algorithm) ----
def uses_rollouts(cfg: Config) -> bool:
    return True


def reference_roles(cfg: Config) -> tuple[str, ...]:
    return ("rollout",)  # the lean adjoints and base means come from the frozen base model in the rollout workers


def validate(spec) -> list[str]:
    problems = []
    if spec.env.eta != 1.0:
        problems.append(f"algo=adjoint_matching needs the memoryless schedule, but env.eta={spec.env.eta}; use "
                        "env.eta=1.0 (with another eta the fine-tuned model does not sample p_base exp(lambda r))")
    if spec.ray.remote_reward:
        problems.append("algo=adjoint_matching differentiates the reward in the rollout workers, which a remote "
                        "reward actor cannot do; set ray.remote_reward=false")  # fmt: skip
    return problems


def make_state(cfg: Config) -> ClipState:
    return ClipState()


def make_correction(cfg: Config, env) -> None:
    return None


def prepare(batch: TensorDict, cfg: Config, state: ClipState) -> tuple[TensorDict, dict]:
    missing = {"adjoint", "base_mean", "noise"} - set(batch.keys())
    if missing:
        raise KeyError(f"trajectories lack {sorted(missing)}: the rollout workers must run "
                       "rlft.algorithms.adjoint_matching.postprocess_rollout (rlft.rollout calls it)")  # fmt: skip
    num_steps = batch["latents"].shape[1] - 1
    adjoint_norm = batch["adjoint"][:, -1].flatten(1).norm(dim=1).mean().item()
    # per trajectory: T fine-tuned steps to sample, T base steps (+ their VJPs) for the adjoint; a guided call
    # counts once here
    rollout_evals = len(batch) * num_steps * 2
    return batch, {"am/final_adjoint_norm": adjoint_norm, "am/rollout_network_evals": float(rollout_evals)}


def update(ctx: LearnerContext, cfg: Config, state: ClipState) -> dict[str, float]:
    """`passes_per_buffer` reshuffled passes over this epoch's buffer fill, one optimizer step per minibatch;
    with `refill_below_ess`, the passes stop once a pass's mean ESS fraction drops below it."""
    step_metrics, passes, last_ess = [], 0, None
    for _ in range(cfg.passes_per_buffer):
        pass_metrics = [train_step(ctx, minibatch, cfg, state) for minibatch in ctx.minibatches()]
        step_metrics += pass_metrics
        passes += 1
        if pass_metrics and "am/ess_fraction" in pass_metrics[0]:
            last_ess = sum(m["am/ess_fraction"] for m in pass_metrics) / len(pass_metrics)
        if cfg.refill_below_ess > 0 and last_ess is not None and last_ess < cfg.refill_below_ess:
            break
    metrics = {**mean_over_steps(step_metrics), "am/passes": float(passes),
               "am/train_network_evals_total": state.train_network_evals}  # fmt: skip
    if last_ess is not None:
        metrics["am/ess_fraction_last_pass"] = last_ess
    return metrics
