"""Flow-matching sampler maths: the time grid, the ODE and SDE steps with their log-probabilities, and the KL.

Rectified flow (Liu et al. 2023; Lipman et al. 2023): x_t = (1 - t) x_0 + t e with e ~ N(0, I), t = 1 noise and
t = 0 data. A velocity network v(x_t, t) ~ E[e - x_0 | x_t]; sampling integrates dx/dt = v from t = 1 down to t = 0
on a grid 1 = t_0 > t_1 > ... > t_K = 0, so every step has dt = t_next - t < 0.

    noised_sample     the forward process x_t = (1 - t) x_0 + t e
    predict           (E[x_0 | x_t], E[e | x_t]) from the velocity
    flow_step         x_t -> x_next ~ N(mean, std^2 I): the ODE's Euler step, or the marginal-preserving SDE of
                      Flow-GRPO (Liu et al. 2025) with noise scale a; a = sqrt(2) is Adjoint Matching's memoryless
                      schedule (Domingo-Enrich et al. 2025)
    transition_kl     KL between two Gaussian transitions with the same std (a penalty to a frozen reference)
    FlowSchedule      the grid of diffusers' FlowMatchEulerDiscreteScheduler (with its `shift`) and the noise choice

The conventions are those of the DDIM step (rlft.core.sampler / rlft.policy): `flow_step` takes exactly one of
`noise` (to sample) or `prev_sample` (to score), returns prev_sample, log_prob (the Gaussian log-density averaged over
the non-batch dimensions, 0 where std = 0), mean, std and x0_hat, and runs its maths in at least fp32 whatever the
network's dtype (bf16 in, fp32 out; fp64 stays fp64, for tests). Times t are a float or a [B] tensor (per sample).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
KINDS = ("ode", "sde", "memoryless")
INTEGRATORS = ("exponential", "euler_maruyama")
# Adjoint Matching's memoryless diffusion coefficient is sigma(s)^2 = 2 eta_s with eta_s = beta_s (alpha'_s / alpha_s
# beta_s - beta'_s) in their time s (s = 0 noise, s = 1 data; X_s = beta_s X_0 + alpha_s X_1). Rectified flow has
# alpha_s = s, beta_s = 1 - s, so eta_s = (1 - s) / s; with our t = 1 - s that is sigma_t^2 = 2 t / (1 - t): Flow-GRPO's
# sigma_t = a sqrt(t / (1 - t)) at a = sqrt(2).
MEMORYLESS_NOISE_SCALE = math.sqrt(2.0)


@dataclass
class FlowStepOutput:
    """The fields of the DDIM step's StepOutput (rlft.core.sampler), so code that reads one reads the other."""

    prev_sample: torch.Tensor  # x_{t_next}, [B, ...]
    log_prob: torch.Tensor  # [B]: log N(prev_sample; mean, std^2) averaged over the non-batch dimensions
    mean: torch.Tensor  # [B, ...]: the deterministic part of the step
    std: torch.Tensor  # [B, 1, ...]: 0 on a deterministic step
    x0_hat: torch.Tensor  # [B, ...]: the model's estimate E[x_0 | x_t] = x_t - t v


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """At least fp32: bf16 log-probabilities give importance ratios far from 1 even on-policy."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] time shaped to broadcast against `like` ([B or 1, 1, ..., 1]) in `like`'s dtype."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def noised_sample(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The rectified-flow forward process x_t = (1 - t) x_0 + t e (Liu et al. 2023, eq. 1); its velocity target is
    d x_t / dt = e - x_0."""
    dtype = _compute_dtype(x0, noise)
    x0, noise = x0.to(dtype), noise.to(dtype)
    t = _per_sample(t, x0)
    return (1 - t) * x0 + t * noise


def predict(velocity: torch.Tensor, sample: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, e_hat) = (E[x_0 | x_t], E[e | x_t]) = (x_t - t v, x_t + (1 - t) v).

    Taking E[. | x_t] of x_t = (1 - t) x_0 + t e and of v = E[e - x_0 | x_t] gives two linear equations,
    x_t = (1 - t) x0_hat + t e_hat and v = e_hat - x0_hat, whose solution this is. By Tweedie's formula the score of
    the marginal is then grad log p_t(x_t) = -E[e | x_t] / t = -(x_t + (1 - t) v) / t."""
    dtype = _compute_dtype(velocity, sample)
    v, x_t = velocity.to(dtype), sample.to(dtype)
    t = _per_sample(t, x_t)
    return x_t - t * v, x_t + (1 - t) * v


def _check_integrator(integrator: str) -> None:
    if integrator not in INTEGRATORS:
        raise ValueError(f"integrator must be one of {INTEGRATORS}, got {integrator!r}")


def transition_std(t: torch.Tensor, t_next: torch.Tensor, noise_scale: float, integrator: str) -> torch.Tensor:
    """The std of one step t -> t_next (it depends on the times only); see `flow_step` for the equations."""
    _check_integrator(integrator)
    if noise_scale == 0:
        return torch.zeros_like(t)
    if integrator == "exponential":
        rho_sq = (t_next * (1 - t) / (t * (1 - t_next))) ** (noise_scale**2)
        return t_next * (1 - rho_sq).clamp(min=0).sqrt()
    # Euler-Maruyama: sigma_t sqrt(-dt) with sigma_t^2 = a^2 t / (1 - t), where t = 1 reads 1 - t as 1 - t_next
    one_minus_t = torch.where(t < 1, 1 - t, t - t_next)
    return noise_scale * (t / one_minus_t * (t - t_next)).sqrt()


def flow_step(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    noise_scale: float = 0.0,
    *,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
    integrator: str = "exponential",
) -> FlowStepOutput:
    """One step x_t -> x_{t_next} ~ N(mean, std^2 I), t_next < t, of the rectified flow's sampler.

    noise_scale = 0: the ODE's Euler step x_next = x_t + v dt, dt = t_next - t < 0, std = 0.

    noise_scale = a > 0: the reverse-time SDE of Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, the ODE-to-SDE
    conversion). For any sigma_t, dx = [v + (sigma_t^2 / 2) grad log p_t] dt + sigma_t dw has the ODE's marginals p_t
    (the extra drift and the diffusion cancel in the Fokker-Planck equation); run from t = 1 to 0 (dt < 0) it is
        dx = [v - (sigma_t^2 / 2) grad log p_t] dt + sigma_t dw,   grad log p_t = -(x + (1 - t) v) / t  (`predict`)
           = [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt + sigma_t dw,   sigma_t = a sqrt(t / (1 - t)),
    Flow-GRPO's SDE; a = sqrt(2) is the memoryless schedule of Adjoint Matching (MEMORYLESS_NOISE_SCALE).

    integrator="euler_maruyama": the paper's update, mean = x + [v + sigma_t^2 / (2 t) (x + (1 - t) v)] dt,
    std = sigma_t sqrt(-dt). At t = 1 sigma_t is infinite; the first step reads 1 - t as 1 - t_next (the step's
    length), which keeps it finite (mean = (1 - a^2 / 2) x + v dt, std = a). The last step onto t = 0
    keeps its noise (std = sigma sqrt(t_{K-1}) > 0). Its drift is stiff near t = 1 (a rate a^2 / (2 (1 - t)) against
    steps of the same order), and there it misses the marginals by O(1) whatever K: for Gaussian data the variance
    after two memoryless steps is twice the marginal's, and about 10% too large for a = 0.7.

    integrator="exponential" (default): the same SDE integrated exactly over the step with the data prediction
    x0_hat = x_t - t v held fixed (DDIM's construction, Song et al. 2021, applied to this SDE). Then the noise part
    y = x - (1 - t) x0_hat = t e_hat is a linear SDE, dy = (1 / t + a^2 / (2 t (1 - t))) y dt + sigma_t dw, solved by
        x_next = (1 - t_next) x0_hat + t_next rho e_hat + t_next sqrt(1 - rho^2) xi,
        rho = (r_next / r)^(a^2 / 2),   r = t / (1 - t)  (the odds of noise),
    i.e. DDIM's form (mean (1 - t_next) x0_hat + sqrt(t_next^2 - std^2) e_hat) with std = t_next sqrt(1 - rho^2). It
    agrees with the Euler-Maruyama update to first order in dt, keeps the marginals on any grid up to the usual O(dt)
    error, and needs no special case at either end: t = 1 has r = inf, so rho = 0 and x_next = (1 - t_next) x0_hat +
    t_next xi (the SDE forgets x_1 there, as the exact one does for every a > 0: its drift's rate a^2 / (2 (1 - t)) is
    not integrable at t = 1); t_next = 0 has rho = 0 and std = 0, a deterministic last step onto x0_hat (log_prob 0,
    as DDIM's last step). With a = 0 it is exactly the Euler step.

    Give `noise` to sample `prev_sample = mean + std * noise`, or `prev_sample` to score a given transition.
    """
    _check_integrator(integrator)
    if (noise is None) == (prev_sample is None):
        raise ValueError("flow_step needs exactly one of `noise` (to sample) or `prev_sample` (to score)")
    if noise_scale < 0:
        raise ValueError(f"noise_scale must be >= 0, got {noise_scale}")
    dtype = _compute_dtype(velocity, sample)
    v, x_t = velocity.to(dtype), sample.to(dtype)
    t, t_next = _per_sample(t, x_t), _per_sample(t_next, x_t)
    x0_hat, e_hat = predict(v, x_t, t)
    std = transition_std(t, t_next, noise_scale, integrator)
    if noise_scale == 0:
        mean = x_t + v * (t_next - t)
    elif integrator == "exponential":
        rho = (t_next * (1 - t) / (t * (1 - t_next))) ** (noise_scale**2 / 2)  # (r_next / r)^(a^2 / 2), 0 at t = 1
        mean = (1 - t_next) * x0_hat + t_next * rho * e_hat
    else:
        sigma_sq = noise_scale**2 * t / torch.where(t < 1, 1 - t, t - t_next)  # the same reading of 1 - t at t = 1
        mean = x_t + (v + sigma_sq / (2 * t) * e_hat) * (t_next - t)
    if prev_sample is None:
        prev_sample = mean + std * noise.to(dtype)
    std = std.expand(prev_sample.shape[0], *std.shape[1:])
    return FlowStepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std, x0_hat)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[B] log N(x; mean, std^2) per dimension, averaged over the non-batch dimensions (not summed: DDPO's clip range
    is a per-dimension scale). x is the action, a constant: gradients reach the policy through mean only. A
    deterministic step (std = 0) has no density and gets 0; density-based algorithms train on stochastic steps only."""
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = -((x.detach().to(mean.dtype) - mean) ** 2) / (2 * safe_std**2) - safe_std.log() - LOG_SQRT_2PI
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return log_prob.mean(dim=tuple(range(1, x.dim())))


def transition_kl(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[B] KL(N(mean, std^2 I) || N(reference_mean, std^2 I)) per dimension = |mean - reference_mean|^2 / (2 std^2),
    averaged over the non-batch dimensions like the log-probabilities (the per-step KL to a frozen reference, as in
    Flow-GRPO's KL penalty); 0 on deterministic steps (std = 0), which have no density."""
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    kl = torch.where(stochastic, (mean - reference_mean) ** 2 / (2 * safe_std**2), torch.zeros_like(mean))
    return kl.mean(dim=tuple(range(1, mean.dim())))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift sigma' = shift sigma / (1 + (shift - 1) sigma) (Esser et al. 2024, sec. 5.3.2): shift > 1
    spends more of the grid at high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass(frozen=True)
class FlowSchedule:
    """The time grid `sigmas` ([K + 1] float32, 1 = t_0 > ... > t_K = 0) and the sampler run on it.

    kind: "ode" (Euler, deterministic), "sde" (Flow-GRPO's SDE with noise scale `noise_level` = a) or "memoryless"
    (Adjoint Matching's schedule, a = sqrt(2); `noise_level` is not used). Step k goes from sigmas[k] to sigmas[k + 1].
    """

    sigmas: torch.Tensor  # [K + 1] float32, descending from 1 to 0
    kind: str = "ode"
    noise_level: float = 0.0  # Flow-GRPO's a, for kind="sde"
    integrator: str = "exponential"  # see flow_step
    num_train_timesteps: int = 1000  # the network reads timestep = sigma * num_train_timesteps (diffusers)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        _check_integrator(self.integrator)
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")

    @classmethod
    def from_num_steps(cls, num_steps: int, shift: float = 1.0, kind: str = "ode", noise_level: float = 0.0,
                       integrator: str = "exponential", num_train_timesteps: int = 1000) -> FlowSchedule:  # fmt: skip
        """The grid of diffusers' FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(num_steps) (static
        shift, no Karras/exponential/beta sigmas): evenly spaced from 1 to sigma_min, shifted, then 0 appended.
        sigma_min is the scheduler's smallest training sigma, shift(1 / num_train_timesteps), so diffusers shifts it
        twice; we follow it, so the grid is the one SD3's pipelines sample on."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        sigma_min = shift_sigmas(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64), shift)
        grid = shift_sigmas(torch.linspace(1.0, float(sigma_min), num_steps, dtype=torch.float64), shift)
        sigmas = torch.cat([grid, torch.zeros(1, dtype=torch.float64)]).to(torch.float32)
        return cls(sigmas, kind, float(noise_level), integrator, int(num_train_timesteps))

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict, num_inference_steps: int, eta: float) -> FlowSchedule:
        """The sampling grid of a flow model's FlowMatchEulerDiscreteScheduler config (its static `shift`) with the
        noise of `eta` in [0, 1], the DDIM env's knob: 0 the ODE, 1 the memoryless SDE (a = sqrt(2), Adjoint
        Matching's, as eta = 1 is DDIM's memoryless choice), between them Flow-GRPO's SDE with a = eta sqrt(2)
        (Flow-GRPO's a = 0.7 is eta = 0.5)."""
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1] (0 = the flow's ODE, 1 = memoryless), got {eta}")
        name = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"the model's scheduler is {name}; a flow-matching env needs a "
                             "FlowMatchEulerDiscreteScheduler (velocity prediction on x_t = (1 - t) x_0 + t e)")
        unsupported = [key for key in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas",
                                       "use_beta_sigmas", "invert_sigmas") if scheduler_config.get(key)]  # fmt: skip
        if unsupported:
            raise ValueError(f"the model's scheduler config sets {', '.join(unsupported)}, which rlft's flow sampler "
                             "does not implement (it samples on the static-shift grid); set them to false in its "
                             "scheduler_config.json")  # fmt: skip
        kind, noise_level = FlowSchedule.kind_of_eta(eta)
        return cls.from_num_steps(num_inference_steps, float(scheduler_config.get("shift", 1.0)), kind, noise_level,
                                  num_train_timesteps=int(scheduler_config.get("num_train_timesteps", 1000)))

    @staticmethod
    def kind_of_eta(eta: float) -> tuple[str, float]:
        """(kind, noise_level) of the stochasticity eta in [0, 1]: see `from_scheduler_config`."""
        if eta == 0:
            return "ode", 0.0
        if eta == 1:
            return "memoryless", 0.0
        return "sde", float(eta) * MEMORYLESS_NOISE_SCALE

    @property
    def eta(self) -> float:
        """The noise scale as a fraction of the memoryless one: a / sqrt(2) (the env's `eta`)."""
        return self.noise_scale / MEMORYLESS_NOISE_SCALE

    def with_eta(self, eta: float) -> FlowSchedule:
        """The same grid with the noise of `eta` (0: the ODE, DRaFT's deterministic sampler; 1: memoryless)."""
        kind, noise_level = FlowSchedule.kind_of_eta(eta)
        return dataclasses.replace(self, kind=kind, noise_level=noise_level)

    def add_noise(self, step_index: int | torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process at step k's time: x_t = (1 - t_k) x_0 + t_k e (`noised_sample`)."""
        return noised_sample(x0, noise, self.sigmas.to(x0.device)[step_index])

    def denoising_target(self, step_index: int | torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity target e - x_0 of add_noise(k, x0, noise) (the same at every t)."""
        dtype = _compute_dtype(x0, noise)
        return noise.to(dtype) - x0.to(dtype)

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def timesteps(self) -> torch.Tensor:
        """[K] the network's timestep input at each step, sigma * num_train_timesteps (diffusers' convention)."""
        return self.sigmas[:-1] * self.num_train_timesteps

    @property
    def noise_scale(self) -> float:
        """a in sigma_t = a sqrt(t / (1 - t)): 0 for the ODE, `noise_level` for Flow-GRPO's SDE, sqrt(2) memoryless."""
        return {"ode": 0.0, "sde": self.noise_level, "memoryless": MEMORYLESS_NOISE_SCALE}[self.kind]

    @property
    def std(self) -> torch.Tensor:
        """[K] the transition std of each step (it depends on the grid only)."""
        return transition_std(self.sigmas[:-1], self.sigmas[1:], self.noise_scale, self.integrator)

    @property
    def stochastic_steps(self) -> torch.Tensor:
        """Indices of the steps with a density (std > 0); the exponential integrator's last step is deterministic."""
        return torch.nonzero(self.std > 0).flatten()

    def to(self, device: torch.device | str) -> FlowSchedule:
        return dataclasses.replace(self, sigmas=self.sigmas.to(device))

    def step(self, step_index: int | torch.Tensor, velocity: torch.Tensor, sample: torch.Tensor, *,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
             eta: float | None = None) -> FlowStepOutput:  # fmt: skip
        """Step k (an int, or [B] per sample) from sigmas[k] to sigmas[k + 1]: `flow_step` with this schedule's
        noise scale (or that of `eta`, as `with_eta`) and integrator."""
        schedule = self if eta is None else self.with_eta(eta)
        sigmas = self.sigmas.to(sample.device)
        index = torch.as_tensor(step_index, device=sample.device)
        return flow_step(velocity, sample, sigmas[index], sigmas[index + 1], schedule.noise_scale, noise=noise,
                         prev_sample=prev_sample, integrator=self.integrator)  # fmt: skip
