"""DRaFT, DRaFT-K and DRaFT-LV: backpropagate a differentiable reward through deterministic DDIM sampling.

Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards" (arXiv 2309.17400):
    DRaFT     maximise r(x_0) with x_0 = sampler(x_T) by gradient ascent through every sampling step (alg. 1)
    DRaFT-K   stop the gradient before the last K steps: x_K is treated as a constant (sec. 4.1; K = 1 works well)
    DRaFT-LV  K = 1 with lower variance: sample x_0 without gradient, re-noise it n times to the last sampling
              timestep, x^i = sqrt(a_1) sg(x_0) + sqrt(1 - a_1) eps_i, and take one differentiable step each (sec. 4.1)
The sampler is DDIM with eta = 0 (Song et al. 2021, eq. 12 with sigma = 0), built from the policy's own schedule
whatever `env.eta` is (rollout workers still use `env.eta` for evaluation). No rollouts and no buffer: the learner
samples for itself. Gradient checkpointing per network call (`policy.gradient_checkpointing`, on by default here)
keeps one call's activations at a time. An optional auxiliary denoising loss (the usual epsilon-prediction loss on
real images, as in the DRaFT + STED-FM implementation) holds the network near the data.

Batch schema (made inside `train_step`, B = trainer.rollout_batch_size, the env's batch):
    x_T      [B, C, H, W]   initial noise from `ctx.env.reset`
    context  [B, *ctx]      the contexts the env drew (empty for unconditional models)
    x_0      [B, C, H, W]   the sample, differentiable through the last K steps (or [n*B, ...] for LV)
    reward   [B] / [n*B]    r(x_0, c); non-finite rewards are counted and left out of the loss
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rlft.algorithms import LearnerContext, mean_over_steps
from rlft.envs.rewards import Reward, evaluate_reward
from rlft.envs.schedule import DDIMSchedule
from torch import nn

from rlft.policy import ddim_step

REQUIRES_STOCHASTIC_SAMPLER = False  # the sampler is deterministic DDIM (eta = 0) whatever env.eta is
REQUIRES_DIFFERENTIABLE_REWARD = True  # the loss is -r(x_0), differentiated through the reward model
USES_ROLLOUTS = False  # the learner samples for itself; rollout workers only evaluate
GRADIENT_CHECKPOINTING = True  # the default of policy.gradient_checkpointing for this algorithm
VARIANTS = ("full", "lv")


@dataclass
class DRaFTConfig:
    lr: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm) before each optimizer step
    steps_per_epoch: int = 1  # optimizer steps per epoch, each on a fresh batch of trainer.rollout_batch_size samples
    k: int | None = None  # backpropagate through the last k sampling steps (DRaFT-K); null or 0 = all steps (DRaFT)
    variant: str = "full"  # "full" (DRaFT / DRaFT-K) or "lv" (DRaFT-LV: re-noise x_0, one differentiable step)
    lv_samples: int = 2  # DRaFT-LV: re-noised copies n of each sample
    reward_scale: float = 1.0  # the loss is -reward_scale * mean reward
    aux_loss_weight: float = 0.0  # weight of the auxiliary denoising loss on real images (0 = off)
    aux_data: str = "builtin:digits"  # its images: "builtin:digits" (train split) or a safetensors file with "images"

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"algo.variant={self.variant} is not one of {', '.join(VARIANTS)}")
        if self.k is not None and self.k < 0:
            raise ValueError(f"algo.k={self.k} must be null/0 (all steps) or a positive number of steps")
        if self.variant == "lv" and self.k not in (None, 0, 1):
            raise ValueError(f"algo.variant=lv differentiates one step only; drop algo.k={self.k} (or set algo.k=1)")
        if self.lv_samples < 1 or self.steps_per_epoch < 1:
            raise ValueError(f"algo.lv_samples={self.lv_samples} and algo.steps_per_epoch={self.steps_per_epoch} "
                             "must be at least 1")  # fmt: skip
        if self.aux_loss_weight < 0:
            raise ValueError(f"algo.aux_loss_weight={self.aux_loss_weight} must be >= 0")


def deterministic(schedule: DDIMSchedule) -> DDIMSchedule:
    """The same timesteps with eta = 0: DDIM's deterministic sampler."""
    return dataclasses.replace(schedule, eta=0.0)


def denoise_step(network: nn.Module, schedule: DDIMSchedule, step: int, x_t: torch.Tensor,
                 context: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """x_t -> x_{t-1} by deterministic DDIM step `step` (eta = 0, so the noise argument is never used)."""
    timestep = schedule.timesteps[step].expand(x_t.shape[0])
    eps = network(x_t, timestep, context)
    out = ddim_step(
        eps, x_t, schedule.alpha_prod[step], schedule.alpha_prod_prev[step], 0.0, noise=torch.zeros_like(x_t)
    )
    return out.prev_sample


def sample(network: nn.Module, schedule: DDIMSchedule, x_T: torch.Tensor, context: torch.Tensor,
           k: int | None) -> torch.Tensor:  # fmt: skip
    """x_0 from x_T by deterministic DDIM, differentiable through the last `k` steps only (None or 0: all)."""
    num_steps = schedule.num_steps
    first_differentiable = 0 if not k else max(0, num_steps - k)
    x = x_T
    for step in range(num_steps):
        if step == first_differentiable:
            x = x.detach()  # DRaFT-K: the gradient stops here
        with torch.set_grad_enabled(step >= first_differentiable and torch.is_grad_enabled()):
            x = denoise_step(network, schedule, step, x, context)
    return x


def renoise(x_0: torch.Tensor, schedule: DDIMSchedule, noise: torch.Tensor) -> torch.Tensor:
    """DRaFT-LV: x^i = sqrt(a_1) sg(x_0) + sqrt(1 - a_1) eps_i at the last sampling timestep. noise: [n, B, ...]."""
    a_last = schedule.alpha_prod[-1]
    x_0 = x_0.detach().unsqueeze(0)  # [1, B, C, H, W]
    return (a_last.sqrt() * x_0 + (1 - a_last).sqrt() * noise).flatten(0, 1)  # [n*B, C, H, W]


def lv_sample(network: nn.Module, schedule: DDIMSchedule, x_0: torch.Tensor, context: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """n re-noised copies of x_0 ([B, ...], no gradient) each denoised by one differentiable last step: [n*B, ...]."""
    n = noise.shape[0]
    x_1 = renoise(x_0, schedule, noise)
    return denoise_step(network, schedule, schedule.num_steps - 1, x_1, context.repeat(n, *([1] * (context.dim() - 1))))


def draft_loss(rewards: torch.Tensor, finite: torch.Tensor, reward_scale: float) -> torch.Tensor:
    """DRaFT's objective (alg. 1): loss = -reward_scale * mean_i r(x_0^i) over the finite rewards."""
    if not finite.any():
        return rewards.sum() * 0.0  # keeps the graph (DDP needs every replica to backpropagate) with no gradient
    return -reward_scale * rewards[finite].mean()


def denoising_loss(network: nn.Module, schedule: DDIMSchedule, images: torch.Tensor, context: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:  # fmt: skip
    """Epsilon-prediction loss (Ho et al. 2020, eq. 14) at random timesteps of the sampling schedule."""
    step = torch.randint(schedule.num_steps, (images.shape[0],), generator=generator).to(images.device)
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    a_t = schedule.alpha_prod[step].reshape(-1, *([1] * (images.dim() - 1)))
    x_t = a_t.sqrt() * images + (1 - a_t).sqrt() * noise
    return F.mse_loss(network(x_t, schedule.timesteps[step], context).float(), noise)


class DRaFTState:
    """Learner-side state: the auxiliary loss's images (loaded once), nothing that needs checkpointing."""

    def __init__(self, cfg: DRaFTConfig):
        self.aux_images = load_aux_images(cfg.aux_data) if cfg.aux_loss_weight > 0 else None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def load_aux_images(spec: str) -> torch.Tensor:
    """[N, C, H, W] images in [-1, 1] for the auxiliary denoising loss."""
    if spec == "builtin:digits":
        from rlft.envs.digits import load_digits

        return load_digits("train")[0]
    from safetensors.torch import load_file

    try:
        return load_file(spec)["images"].float()
    except (OSError, KeyError) as error:
        raise FileNotFoundError(
            f"algo.aux_data={spec!r}: give 'builtin:digits' or a safetensors file holding an 'images' tensor "
            "[N, C, H, W] in [-1, 1]"
        ) from error


def train_step(ctx: LearnerContext, cfg: DRaFTConfig, state: DRaFTState) -> dict[str, float]:
    """One optimizer step on a fresh batch: sample, score, backpropagate -reward (and the auxiliary loss)."""
    policy, env = ctx.policy, ctx.env
    schedule = deterministic(policy.schedule)
    reward: Reward = env.reward
    obs, _ = env.reset(seed=int(torch.randint(2**62, (1,), generator=ctx.generator)))
    x_T, context = obs["x_t"], obs["context"]  # [B, C, H, W], [B, *ctx]
    ctx.optimizer.zero_grad(set_to_none=True)
    if cfg.variant == "lv":
        with torch.no_grad():
            x_0 = sample(ctx.network, schedule, x_T, context, k=None)
        noise = torch.randn((cfg.lv_samples, *x_0.shape), generator=ctx.generator).to(x_0.device)  # [n, B, C, H, W]
        images = lv_sample(ctx.network, schedule, x_0, context, noise)  # [n*B, C, H, W]
        context = context.repeat(cfg.lv_samples, *([1] * (context.dim() - 1)))
    else:
        images = sample(ctx.network, schedule, x_T, context, cfg.k)  # [B, C, H, W]
    rewards, finite = evaluate_reward(reward, images, context)
    loss = draft_loss(rewards, finite, cfg.reward_scale)
    metrics = {"loss/policy": loss.item()}
    if state.aux_images is not None:
        rows = torch.randint(len(state.aux_images), (x_T.shape[0],), generator=ctx.generator)
        aux = denoising_loss(
            ctx.network, schedule, state.aux_images[rows].to(x_T.device), obs["context"], ctx.generator
        )
        loss = loss + cfg.aux_loss_weight * aux
        metrics["draft/aux_loss"] = aux.item()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], cfg.max_grad_norm)
    ctx.optimizer.step()
    kept = rewards.detach()[finite]
    metrics.update({
        "reward/mean": kept.mean().item() if len(kept) else float("nan"),
        "reward/std": kept.std(unbiased=False).item() if len(kept) else float("nan"),
        "reward/max": kept.max().item() if len(kept) else float("nan"),
        "reward/nonfinite": float((~finite).sum()),
        "train/grad_norm": grad_norm.item(),
    })  # fmt: skip
    return metrics


# ---- the learner-side interface (see algorithms/__init__.py) ----
Config = DRaFTConfig


def make_state(cfg: DRaFTConfig) -> DRaFTState:
    return DRaFTState(cfg)


def prepare(batch, cfg: DRaFTConfig, state: DRaFTState):
    raise RuntimeError("DRaFT uses no rollouts (USES_ROLLOUTS = False): trajectories should never reach it")


def update(ctx: LearnerContext, cfg: DRaFTConfig, state: DRaFTState) -> dict[str, float]:
    """`steps_per_epoch` optimizer steps, each on its own freshly sampled batch."""
    metrics = mean_over_steps([train_step(ctx, cfg, state) for _ in range(cfg.steps_per_epoch)])
    samples = cfg.steps_per_epoch * ctx.env.num_envs * (cfg.lv_samples if cfg.variant == "lv" else 1)
    return {**metrics, "perf/samples": float(samples)}  # the learner made them: its throughput counts these
