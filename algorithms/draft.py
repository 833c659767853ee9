"""DRaFT, DRaFT-K and DRaFT-LV: backpropagate a differentiable reward through deterministic DDIM sampling.

Clark et al. 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards" (arXiv 2309.17400):
    DRaFT     maximise r(x_0) with x_0 = sampler(x_T) by gradient ascent through every sampling step (alg. 1)
    DRaFT-K   stop the gradient before the last K steps: x_K is treated as a constant (sec. 4.1; K = 1 works well)
    DRaFT-LV  K = 1 with lower variance: sample x_0 without gradient, re-noise it n times to the last sampling
              timestep, x^i = sqrt(a_1) sg(x_0) + sqrt(1 - a_1) eps_i, and take one differentiable step each (sec. 4.1)
The sampler is DDIM with eta = 0 (Song et al. 2021, eq. 12 with sigma = 0) on the policy's own schedule, guided as
the env samples (classifier-free guidance for Stable Diffusion), whatever `env.eta` is (rollout workers still use
`env.eta` for evaluation). The reward sees decoded images: for latent models the VAE decode is inside the
differentiable path. No rollouts and no buffer: the learner samples for itself. Gradient checkpointing per network
call (`policy.gradient_checkpointing`, on by default here) keeps one call's activations at a time.

Two remedies against reward hacking: an auxiliary denoising loss on real images (as in the DRaFT + STED-FM
implementation) holds the network near the data, and `kl_weight` adds the KL between the fine-tuned and the frozen
base model's memoryless (eta = 1) transitions at the visited states of the differentiable steps, the path KL of the
SDE whose probability-flow ODE DRaFT samples.

Batch schema (made inside `train_step`, B = trainer.rollout_batch_size, the env's batch):
    x_T      [B, C, H, W]   initial noise from `ctx.env.reset`
    context  [B, *ctx]      the contexts the env drew (empty for unconditional models)
    x_0      [B, C, H, W]   the sample, differentiable through the last K steps (or [n*B, ...] for LV)
    reward   [B] / [n*B]    r(D(x_0), c); non-finite rewards are counted and left out of the loss and its gradient
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tensordict import TensorDict

from rlft.algorithms import LearnerContext, mean_over_steps
from rlft.core.sampler import transition_kl
from rlft.core.spec import knob
from rlft.envs.rewards import reward_statistics

REQUIRES_STOCHASTIC_SAMPLER = False  # the sampler is deterministic DDIM (eta = 0) whatever env.eta is
REQUIRES_DIFFERENTIABLE_REWARD = True  # the loss is -r(x_0), differentiated through the reward model
GRADIENT_CHECKPOINTING = True  # the default of policy.gradient_checkpointing for this algorithm
ROLLOUT_KEYS = ()
PREPARE_ACROSS_REPLICAS = ()


@dataclass
class Config:
    name: str = knob("draft", "algorithm module in algorithms/")
    epochs: int = knob(60, "trainer.epochs unless the command line sets it", ge=1)
    lr: float = knob(1e-4, "AdamW learning rate", gt=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = knob(1.0, "gradient clipping (global L2 norm) before each optimizer step", gt=0)
    steps_per_epoch: int = knob(1, "optimizer steps per epoch, each on a fresh batch of trainer.rollout_batch_size",
                                ge=1)  # fmt: skip
    k: int | None = knob(None, "backpropagate through the last k sampling steps (DRaFT-K); null or 0 = all steps",
                         ge=0)  # fmt: skip
    variant: str = knob("full", "full (DRaFT / DRaFT-K) or lv (DRaFT-LV: re-noise x_0, one differentiable step)",
                        choices=("full", "lv"))  # fmt: skip
    lv_samples: int = knob(2, "DRaFT-LV: re-noised copies n of each sample", ge=1)
    reward_scale: float = knob(1.0, "the loss is -reward_scale * mean reward", gt=0)
    aux_loss_weight: float = knob(0.0, "weight of the auxiliary denoising loss on real images (0 = off; env=digits "
                                  "sets its own default: rlft.envs.tasks.ALGO_DEFAULTS)", ge=0)  # fmt: skip
    aux_data: str = knob("builtin:digits", "its images: builtin:digits (train split) or a safetensors file with "
                         "\"images\"")  # fmt: skip
    kl_weight: float = knob(0.0, "beta of the KL to the frozen base model's memoryless transitions at the "
                            "differentiable steps (0 = off; env=digits sets its own default: ALGO_DEFAULTS)",
                            ge=0)  # fmt: skip

    def __post_init__(self) -> None:
        if self.variant == "lv" and self.k not in (None, 0, 1):
            raise ValueError(f"algo.variant=lv differentiates one step only; drop algo.k={self.k} (or set algo.k=1)")


def deterministic_step(ctx: LearnerContext, step: int, x_t: torch.Tensor, context: torch.Tensor,
                       kl: list[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """x_t -> x_{t-1} by deterministic DDIM step `step`; with `kl`, appends the step's KL (per sample) between the
    policy's and the frozen base model's memoryless transitions from x_t."""
    policy = ctx.policy
    schedule = policy.schedule
    timestep = schedule.timesteps[step].expand(x_t.shape[0])
    output = ctx.network(x_t, timestep, context)
    out = schedule.step(step, output, x_t, noise=torch.zeros_like(x_t), eta=0.0)
    if kl is not None and torch.is_grad_enabled():
        memoryless = schedule.step(step, output, x_t, noise=torch.zeros_like(x_t), eta=1.0)
        with torch.no_grad():
            reference = schedule.step(step, policy.reference_forward(x_t, timestep, context), x_t,
                                      noise=torch.zeros_like(x_t), eta=1.0)  # fmt: skip
        kl.append(transition_kl(memoryless.mean, reference.mean, memoryless.std))
    return out.prev_sample


def sample(ctx: LearnerContext, x_T: torch.Tensor, context: torch.Tensor, k: int | None,
           kl: list[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """x_0 from x_T by deterministic DDIM, differentiable through the last `k` steps only (None or 0: all)."""
    num_steps = ctx.policy.schedule.num_steps
    first_differentiable = 0 if not k else max(0, num_steps - k)
    x = x_T
    for step in range(num_steps):
        if step == first_differentiable:
            x = x.detach()  # DRaFT-K: the gradient stops here
        with torch.set_grad_enabled(step >= first_differentiable and torch.is_grad_enabled()):
            x = deterministic_step(ctx, step, x, context, kl)
    return x


def renoise(ctx: LearnerContext, x_0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DRaFT-LV: x^i = sqrt(a_1) sg(x_0) + sqrt(1 - a_1) eps_i at the last sampling timestep. noise: [n, B, ...]."""
    last = ctx.policy.schedule.num_steps - 1
    copies = x_0.detach().unsqueeze(0).expand_as(noise)  # [n, B, C, H, W]
    return ctx.policy.schedule.add_noise(last, copies.flatten(0, 1), noise.flatten(0, 1))  # [n*B, C, H, W]


def draft_loss(rewards: torch.Tensor, finite: torch.Tensor, reward_scale: float) -> torch.Tensor:
    """DRaFT's objective (alg. 1): loss = -reward_scale * mean_i r(x_0^i) over the finite rewards."""
    if not finite.any():
        return rewards.nan_to_num(0.0).sum() * 0.0  # keeps the graph (DDP needs every replica to backpropagate)
    return -reward_scale * rewards[finite].mean()


def denoising_loss(ctx: LearnerContext, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The pretraining loss at random timesteps of the sampling schedule: epsilon prediction (Ho et al. 2020, eq. 14)
    for a DDPM (or its v / x_0 target), velocity prediction for a flow model."""
    schedule = ctx.policy.schedule
    step = torch.randint(schedule.num_steps, (images.shape[0],), generator=ctx.generator).to(images.device)
    noise = torch.randn(images.shape, generator=ctx.generator).to(images.device)
    x_t = schedule.add_noise(step, images, noise)
    target = schedule.denoising_target(step, images, noise)
    return F.mse_loss(ctx.network(x_t, schedule.timesteps[step], context).float(), target)


class DRaFTState:
    """Learner-side state: the auxiliary loss's images (loaded once), nothing that needs checkpointing."""

    def __init__(self, cfg: Config):
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


def train_step(ctx: LearnerContext, cfg: Config, state: DRaFTState) -> dict[str, float]:
    """One optimizer step on a fresh batch: sample, score, backpropagate -reward (and the regularisers)."""
    env = ctx.env
    obs, _ = env.reset(seed=int(torch.randint(2**62, (1,), generator=ctx.generator)))
    x_T, context = obs["x_t"], obs["context"]  # [B, C, H, W], [B, *ctx]
    kl = [] if cfg.kl_weight > 0 else None
    ctx.optimizer.zero_grad(set_to_none=True)
    if cfg.variant == "lv":
        with torch.no_grad():
            x_0 = sample(ctx, x_T, context, k=None)
        noise = torch.randn((cfg.lv_samples, *x_0.shape), generator=ctx.generator).to(x_0.device)  # [n, B, C, H, W]
        context = context.repeat(cfg.lv_samples, *([1] * (context.dim() - 1)))
        x_0 = deterministic_step(ctx, ctx.policy.schedule.num_steps - 1, renoise(ctx, x_0, noise), context, kl)
    else:
        x_0 = sample(ctx, x_T, context, cfg.k, kl)  # [B, C, H, W]
    rewards, finite = env.score(x_0, context)
    loss = draft_loss(rewards, finite, cfg.reward_scale)
    metrics = {"loss/policy": loss.item()}
    if kl:
        path_kl = torch.stack(kl, dim=1).sum(dim=1)  # [B] summed over the differentiable steps
        path_kl = path_kl[finite].mean() if finite.any() else path_kl.sum() * 0.0
        loss = loss + cfg.kl_weight * path_kl
        metrics["draft/kl_to_base"] = path_kl.item()
    if state.aux_images is not None:
        rows = torch.randint(len(state.aux_images), (x_T.shape[0],), generator=ctx.generator)
        aux = denoising_loss(ctx, state.aux_images[rows].to(x_T.device), obs["context"])
        loss = loss + cfg.aux_loss_weight * aux
        metrics["draft/aux_loss"] = aux.item()
    loss.backward()
    return {**metrics, **reward_statistics(rewards, finite), **ctx.optimizer_step(cfg.max_grad_norm)}


# ---- the learner-side interface (see rlft.algorithms.Algorithm) ----
def uses_rollouts(cfg: Config) -> bool:
    return False  # the learner samples for itself; rollout workers only evaluate


def reference_roles(cfg: Config) -> tuple[str, ...]:
    return ("learner",) if cfg.kl_weight > 0 else ()


def validate(spec) -> list[str]:
    problems = []
    if spec.algo.aux_loss_weight > 0 and spec.env.LATENT:
        problems.append(f"algo.aux_loss_weight > 0 trains on pixel images, and env={spec.env.name} samples latents: "
                        "the auxiliary denoising loss is for pixel-space envs; set algo.aux_loss_weight=0")  # fmt: skip
    return problems


def make_state(cfg: Config) -> DRaFTState:
    return DRaFTState(cfg)


def make_correction(cfg: Config, env) -> None:
    return None


def postprocess_rollout(worker, batch: TensorDict, cfg: Config) -> TensorDict:
    return batch


def prepare(batch: TensorDict, cfg: Config, state: DRaFTState) -> tuple[TensorDict, dict]:
    raise RuntimeError("DRaFT uses no rollouts (uses_rollouts is False): trajectories should never reach it")


def update(ctx: LearnerContext, cfg: Config, state: DRaFTState) -> dict[str, float]:
    """`steps_per_epoch` optimizer steps, each on its own freshly sampled batch."""
    metrics = mean_over_steps([train_step(ctx, cfg, state) for _ in range(cfg.steps_per_epoch)])
    samples = cfg.steps_per_epoch * ctx.env.num_envs * (cfg.lv_samples if cfg.variant == "lv" else 1)
    return {**metrics, "perf/samples": float(samples)}  # the learner made them: its throughput counts these
