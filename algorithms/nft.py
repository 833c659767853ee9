"""DiffusionNFT: policy optimisation on the forward (noising) process of the samples' clean images.

Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process" (arXiv 2509.16117). No
likelihoods and no trajectories: each final sample x_0 is noised afresh, x_t = (1 - t) x_0 + t e, and the velocity
network is regressed onto it as in pretraining, but through two implicit policies built from the current network
v_theta and the old one v_old (the network that sampled the data, frozen for the update):
    v+ = (1 - beta) v_old + beta v_theta        (the implicit positive policy, eq. 8)
    v- = (1 + beta) v_old - beta v_theta        (the implicit negative policy: v+ and v- average to v_old)
    L  = E[ r ||v+(x_t) - v||^2 + (1 - r) ||v-(x_t) - v||^2 ] / beta,   v = e - x_0      (eq. 9)
with r in [0, 1] the sample's optimality probability: its group-standardised reward clipped to
[-adv_clip_max, adv_clip_max] and mapped linearly onto [0, 1] (r = 1/2 + A / (2 adv_clip_max)). Minimising L moves
v_theta toward the velocity of the well-rewarded samples and away from that of the badly rewarded ones; its optimum
is v_old + (2 r - 1)-weighted, a policy improvement whose size beta sets (the paper's Theorem 3.2). The regression is
written on the data prediction x0_hat = x_t - t v, each term divided by the stop-gradient of its own mean absolute
error (the paper's adaptive weighting), which is the same objective up to a per-sample, per-t weight.

Being a forward-process objective it is solver-agnostic: rollouts may sample with the ODE (env.eta = 0) or any SDE,
and the loss never sees the sampler's steps or classifier-free guidance (conditional networks are called
unguided). It runs on flow-matching envs (any FlowSchedule grid).

Batch schema (rollout workers; only the final samples are used):
    latents      [B, T+1, C, H, W]  the trajectory; latents[:, -1] is x_0
    context      [B, *ctx]          the context c; rows with equal context form a group
    reward       [B]                r(x_0, c), finite
    optimality   [B]                r in [0, 1], added by `prepare`
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tensordict import TensorDict

from rlft.algorithms import LearnerContext, mean_over_steps
from rlft.algorithms.ddpo import context_keys
from rlft.algorithms.grpo import group_advantages, group_size_problems
from rlft.core.spec import knob

REQUIRES_STOCHASTIC_SAMPLER = False  # the loss never sees the sampler: any solver, even the ODE, will do
REQUIRES_DIFFERENTIABLE_REWARD = False
GRADIENT_CHECKPOINTING = False
ROLLOUT_KEYS = ()
PREPARE_ACROSS_REPLICAS = ("reward", "context")  # groups span learners


@dataclass
class Config:
    name: str = knob("nft", "algorithm module in algorithms/")
    # on digits_flow (benchmarks/flow_rl.py, 256 evaluation samples) 20 epochs with kl_weight 0.5 end at 93% judged
    # 3s (80% by epoch 5), judge confidence 0.97 (base 0.95), within-class diversity 0.80 of the base's; kl_weight
    # 0.3 reaches 97% at diversity 0.69, 1.0 stays near 75-80%, 0 narrows to half the diversity by epoch 20
    epochs: int = knob(20, "trainer.epochs unless the command line sets it", ge=1)
    lr: float = knob(3e-4, "AdamW learning rate", gt=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = knob(1.0, "gradient clipping (global L2 norm) before each optimizer step", gt=0)
    beta: float = knob(1.0, "the implicit policies' guidance strength: v+ = (1 - beta) v_old + beta v_theta", gt=0)
    group_size: int = knob(8, "G: samples of each context per env batch (must divide trainer.rollout_batch_size)",
                           ge=1)  # fmt: skip
    global_std: bool = knob(False, "divide advantages by the batch's reward std instead of each group's")
    adv_clip_max: float = knob(2.0, "advantages are clipped to [-adv_clip_max, adv_clip_max], then mapped onto "
                               "r in [0, 1]", gt=0)  # fmt: skip
    noise_draws: int = knob(2, "fresh (t, e) draws of each sample per pass (t uniform over the sampling grid)",
                            ge=1)  # fmt: skip
    inner_epochs: int = knob(1, "passes over each collected batch", ge=1)
    minibatch_size: int = knob(32, "samples per optimizer step on each learner", ge=1)
    adaptive_weighting: bool = knob(True, "divide each term by the stop-gradient of its mean absolute x_0 error")
    kl_weight: float = knob(0.5, "weight of |v_theta - v_base|^2 / 2 at the noised samples, a pull toward the frozen "
                            "base model (0 = off)", ge=0)  # fmt: skip


def optimality(rewards: torch.Tensor, keys: list[str], cfg: Config) -> torch.Tensor:
    """[B] r in [0, 1]: the group-standardised reward, clipped to +-adv_clip_max and mapped linearly onto [0, 1]."""
    advantages = group_advantages(rewards, keys, cfg.global_std).clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
    return 0.5 + advantages / (2 * cfg.adv_clip_max)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
             r: torch.Tensor, beta: float, adaptive_weighting: bool) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """The DiffusionNFT loss (eq. 9) of one batch of noised samples, written on x0_hat = x_t - t v.

    v_theta [B, ...] the current network's velocity (with grad), v_old [B, ...] the old network's (no grad), x_t the
    noised samples, x0 their clean images, t [B, 1, ...] their times, r [B] the optimality probabilities."""
    positive = (1 - beta) * v_old + beta * v_theta
    negative = (1 + beta) * v_old - beta * v_theta
    dims = tuple(range(1, x0.dim()))

    def regression(velocity: torch.Tensor) -> torch.Tensor:  # [B]
        error = (x_t - t * velocity) - x0
        per_sample = error.pow(2).mean(dim=dims)
        if adaptive_weighting:
            per_sample = per_sample / error.detach().abs().mean(dim=dims).clamp(min=1e-5)
        return per_sample

    positive_loss, negative_loss = regression(positive), regression(negative)
    loss = ((r * positive_loss + (1 - r) * negative_loss) / beta).mean()
    info = {"nft/positive_loss": positive_loss.mean().detach(), "nft/negative_loss": negative_loss.mean().detach()}
    return loss, info


def noised_batches(ctx: LearnerContext, x0: torch.Tensor, cfg: Config) -> list[tuple[torch.Tensor, ...]]:
    """`noise_draws` fresh (step index, x_t) pairs per sample: t drawn uniformly from the sampling grid's
    noisy times (never t = 0, where the loss is zero), x_t the forward process there."""
    schedule = ctx.policy.schedule
    draws = []
    for _ in range(cfg.noise_draws):
        step = torch.randint(schedule.num_steps, (x0.shape[0],), generator=ctx.generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=ctx.generator).to(x0.device)
        draws.append((step, schedule.add_noise(step, x0, noise)))
    return draws


def sample_times(ctx: LearnerContext, step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B, 1, ...] the times t of step indices, for x0_hat = x_t - t v (the flow grid's sigmas)."""
    return ctx.policy.schedule.sigmas.to(like.device)[step].reshape(-1, *([1] * (like.dim() - 1)))


def velocity(ctx: LearnerContext, x_t: torch.Tensor, step: torch.Tensor, context: torch.Tensor,
             network=None, reference: bool = False) -> torch.Tensor:  # fmt: skip
    """The unguided velocity at (x_t, t_step, c): of the policy through `network` (its DDP wrapper, when training),
    or of the frozen base model (`reference`)."""
    timestep = ctx.policy.schedule.timesteps.to(x_t.device)[step]
    if reference:
        return ctx.policy.reference_forward(x_t, timestep, context, guidance_scale=1.0).float()
    return (network or ctx.policy)(x_t, timestep, context, None, 1.0).float()


# ---- the learner-side interface (see rlft.algorithms.Algorithm) ----
def uses_rollouts(cfg: Config) -> bool:
    return True


def reference_roles(cfg: Config) -> tuple[str, ...]:
    return ("learner",) if cfg.kl_weight > 0 else ()


def validate(spec) -> list[str]:
    problems = []
    if not spec.env.FLOW:
        problems.append(f"algo=nft regresses velocities on the rectified-flow path, and env={spec.env.name} is a "
                        f"{spec.env.kind} model: use a flow env (env=digits_flow), or algo=grpo / ddpo on this one")
    return problems + group_size_problems(spec)


def make_state(cfg: Config) -> dict:
    return {}


def make_correction(cfg: Config, env) -> None:
    return None


def postprocess_rollout(worker, batch: TensorDict, cfg: Config) -> TensorDict:
    return batch


def prepare(batch: TensorDict, cfg: Config, state: dict) -> tuple[TensorDict, dict]:
    r = optimality(batch["reward"].float().cpu(), context_keys(batch["context"]), cfg)
    batch["optimality"] = r.to(batch.device)
    return batch, {"nft/optimality_mean": r.mean().item(), "nft/optimality_std": r.std(unbiased=False).item()}


def update(ctx: LearnerContext, cfg: Config, state: dict) -> dict[str, float]:
    """`inner_epochs` passes over the epoch's samples. The old network's velocities at every noised sample of every
    pass are computed first, before any optimizer step, so v_old is the network that sampled the data throughout."""
    stored = ctx.buffer.contents().to(ctx.device)
    x0, context, r = stored["latents"][:, -1].float(), stored["context"], stored["optimality"]
    count = ctx.minibatch_count(cfg.minibatch_size)
    spare = ctx.spare_calls(math.ceil(len(x0) / 64))  # FSDP: as many calls as the replica with the most samples
    passes = []
    with torch.no_grad():
        for _ in range(cfg.inner_epochs):
            draws = []
            for step, x_t in noised_batches(ctx, x0, cfg):
                chunks = list(zip(x_t.split(64), step.split(64), context.split(64), strict=True))
                v_old = torch.cat([velocity(ctx, x, s, c) for x, s, c in chunks])
                for _ in range(spare):
                    velocity(ctx, *chunks[0])
                draws.append((step, x_t, v_old))
            passes.append(draws)
    step_metrics = []
    for draws in passes:
        order = torch.randperm(len(x0), generator=ctx.generator).to(ctx.device)
        for rows in order.tensor_split(count) if count else []:
            ctx.optimizer.zero_grad(set_to_none=True)
            totals: dict[str, torch.Tensor] = {}
            for step, x_t, v_old in draws:
                s, x = step[rows], x_t[rows]
                v_theta = velocity(ctx, x, s, context[rows], network=ctx.network)
                loss, info = nft_loss(v_theta, v_old[rows], x, x0[rows], sample_times(ctx, s, x), r[rows], cfg.beta,
                                      cfg.adaptive_weighting)  # fmt: skip
                if cfg.kl_weight > 0:
                    with torch.no_grad():
                        v_base = velocity(ctx, x, s, context[rows], reference=True)
                    kl = 0.5 * (v_theta - v_base).pow(2).mean()
                    loss = loss + cfg.kl_weight * kl
                    info["nft/velocity_kl_to_base"] = kl.detach()
                (loss / len(draws)).backward()
                info["loss/policy"] = loss.detach()
                for key, value in info.items():
                    totals[key] = totals.get(key, 0.0) + value / len(draws)
            step_metrics.append({**{k: v.item() for k, v in totals.items()}, **ctx.optimizer_step(cfg.max_grad_norm)})
    return mean_over_steps(step_metrics)
