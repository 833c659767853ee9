"""The DDIM sampling schedule the env owns: which timesteps the MDP visits and their alpha-bars."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DDIMSchedule:
    """`num_inference_steps` DDIM steps over a trained DDPM's noise schedule, with stochasticity `eta`.

    Step k (k = 0 .. T-1) goes from timestep `timesteps[k]` to `prev_timesteps[k]`; the alpha-bars of both
    ends are precomputed so the sampler step is a pure function of tensors.
    """

    timesteps: torch.Tensor  # [T] int64, descending
    alpha_prod: torch.Tensor  # [T] float32: alpha-bar at timesteps[k]
    alpha_prod_prev: torch.Tensor  # [T] float32: alpha-bar at the next (less noisy) timestep
    eta: float
    num_train_timesteps: int

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict, num_inference_steps: int, eta: float) -> DDIMSchedule:
        """Timesteps and alpha-bars exactly as `diffusers.DDIMScheduler.set_timesteps` would make them."""
        from diffusers import DDIMScheduler

        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = memoryless), got {eta}")
        scheduler = DDIMScheduler.from_config(dict(scheduler_config))
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps.to(torch.int64)
        prev = timesteps - scheduler.config.num_train_timesteps // num_inference_steps
        alphas = scheduler.alphas_cumprod.to(torch.float32)
        alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod.float())
        return cls(timesteps, alphas[timesteps], alpha_prev, float(eta), int(scheduler.config.num_train_timesteps))

    @property
    def std(self) -> torch.Tensor:
        """[T] the transition noise scale of each step (eta times the DDPM posterior standard deviation)."""
        a_t, a_prev = self.alpha_prod, self.alpha_prod_prev
        return self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()

    @property
    def stochastic_steps(self) -> torch.Tensor:
        """Indices of the steps with a density (std > 0): the last step onto alpha-bar = 1 is deterministic."""
        return torch.nonzero(self.std > 0).flatten()

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def to(self, device: torch.device | str) -> DDIMSchedule:
        return DDIMSchedule(
            self.timesteps.to(device), self.alpha_prod.to(device), self.alpha_prod_prev.to(device),
            self.eta, self.num_train_timesteps,
        )  # fmt: skip
