"""The sampler step every algorithm, env and policy uses: DDIM with its transition density, written once.

    ddim_step        x_t -> x_{t-1} ~ N(mean, std^2 I) from a network output (Song et al. 2021, eq. 12; DDPO, Black
                     et al. 2023, sec. 4.2), with its log-probability; honours prediction_type and clip_sample
    guide            classifier-free guidance (Ho & Salimans 2022, eq. 6)
    add_noise        the forward (noising) process x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e
    transition_kl    KL between two Gaussian transitions with the same std (a penalty to a frozen reference)

All maths runs in fp32 whatever the network's dtype: importance ratios of bf16 log-probabilities are far from 1 even
on-policy. Nothing here knows about networks, envs or Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rlft.core.schedule import DDIMSchedule

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t-1}, [B, C, H, W]
    log_prob: torch.Tensor  # [B] float32: log N(prev_sample; mean, std^2) averaged over image dimensions
    mean: torch.Tensor  # [B, C, H, W] float32: the deterministic part of the step
    std: torch.Tensor  # [B, 1, 1, 1] float32: 0 on a deterministic step
    x0_hat: torch.Tensor  # [B, C, H, W] float32: the model's (clipped) estimate of x_0


def per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] value shaped to broadcast against `like` ([B or 1, 1, 1, 1] for images)."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def predict(schedule: DDIMSchedule, step_index: int | torch.Tensor, model_output: torch.Tensor,
            sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(eps, x0_hat) in fp32 from the network's output, as diffusers' DDIMScheduler.step reads it: an epsilon, a v
    (v = sqrt(a_t) eps - sqrt(1 - a_t) x_0) or the sample itself, then x0_hat clipped when the model's scheduler
    clips (clip_sample: google/ddpm-* do); eps is not recomputed from the clipped x0_hat, as diffusers does not."""
    output, x_t = model_output.float(), sample.float()
    a_t = per_sample(schedule.alpha_prod.to(x_t.device)[step_index], x_t)
    if schedule.prediction_type == "epsilon":
        eps = output
        x0_hat = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif schedule.prediction_type == "v_prediction":
        x0_hat = a_t.sqrt() * x_t - (1 - a_t).sqrt() * output
        eps = a_t.sqrt() * output + (1 - a_t).sqrt() * x_t
    else:  # "sample"
        x0_hat = output
        eps = (x_t - a_t.sqrt() * x0_hat) / (1 - a_t).sqrt()
    if schedule.clip_sample_range is not None:
        x0_hat = x0_hat.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    return eps, x0_hat


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[B] log N(x; mean, std^2) per dimension, averaged over the non-batch dimensions (not summed: DDPO's clip range
    of 1e-4 is a per-dimension scale). A deterministic transition (std = 0) has no density and gets 0; algorithms
    that need densities train on stochastic steps only (`DDIMSchedule.stochastic_steps`)."""
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = -((x.detach().float() - mean) ** 2) / (2 * safe_std**2) - safe_std.log() - LOG_SQRT_2PI
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return log_prob.mean(dim=tuple(range(1, x.dim())))


def ddim_step(
    schedule: DDIMSchedule,
    step_index: int | torch.Tensor,
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    eta: float | None = None,
) -> StepOutput:
    """Step k (an int, or [B] per sample) of `schedule`: x_t -> x_{t-1} ~ N(mean, std^2 I).

    Give `noise` to sample `prev_sample = mean + std * noise`, or `prev_sample` to score a given transition (DDPO's new
    log-probability of an old action). `eta` overrides the schedule's stochasticity (0: deterministic DDIM, DRaFT)."""
    if (noise is None) == (prev_sample is None):
        raise ValueError("ddim_step needs exactly one of `noise` (to sample) or `prev_sample` (to score)")
    eta = schedule.eta if eta is None else eta
    eps, x0_hat = predict(schedule, step_index, model_output, sample)
    a_t = per_sample(schedule.alpha_prod.to(eps.device)[step_index], eps)
    a_prev = per_sample(schedule.alpha_prod_prev.to(eps.device)[step_index], eps)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # the DDPM posterior variance
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0_hat + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        prev_sample = mean + std * noise.float()
    std = std.expand(prev_sample.shape[0], *std.shape[1:])
    return StepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std, x0_hat)


def guide(output_conditional: torch.Tensor, output_null: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: out(x, null) + w (out(x, c) - out(x, null)); w = 1 is the conditional model."""
    return output_null + guidance_scale * (output_conditional - output_null)


def add_noise(schedule: DDIMSchedule, step_index: int | torch.Tensor, x0: torch.Tensor,
              noise: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The forward process at step k's timestep: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e (Ho et al. 2020, eq. 4)."""
    a_t = per_sample(schedule.alpha_prod.to(x0.device)[step_index], x0)
    return a_t.sqrt() * x0.float() + (1 - a_t).sqrt() * noise.float()


def transition_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[B] KL(N(mean, std^2) || N(reference_mean, std^2)) = |mean - reference_mean|^2 / (2 std^2), averaged over
    dimensions like the log-probabilities; 0 on deterministic steps (std = 0), which have no density."""
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    kl = torch.where(stochastic, (mean - reference_mean).pow(2) / (2 * safe_std**2), torch.zeros_like(mean))
    return kl.mean(dim=tuple(range(1, mean.dim())))
