"""The DDIM sampling schedule: which timesteps the MDP visits, their alpha-bars, and how to read the network.

Every sampling schedule (this one, and `rlft.core.flow.FlowSchedule` for flow-matching models) offers the same
members, so envs, policies and algorithms never ask which kind of model they drive:
    timesteps, num_steps, num_train_timesteps, eta   the grid, the network's timestep input, the stochasticity
    std, stochastic_steps                            [T] transition stds; the steps that have a density
    step(k, output, x_t, noise= | prev_sample=)      one sampler step with its Gaussian log-probability
    add_noise(k, x0, noise)                          the forward process at step k's time
    denoising_target(k, x0, noise)                   what the network should output at that noised sample
    with_eta(eta)                                    the same grid with another stochasticity (0: deterministic)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class DDIMSchedule:
    """`num_inference_steps` DDIM steps over a trained DDPM's noise schedule, with stochasticity `eta`.

    Step k (k = 0 .. T-1) goes from timestep `timesteps[k]` to `prev_timesteps[k]`; the alpha-bars of both
    ends are precomputed so the sampler step (rlft.core.sampler) is a pure function of tensors.
    """

    timesteps: torch.Tensor  # [T] int64, descending
    alpha_prod: torch.Tensor  # [T] float32: alpha-bar at timesteps[k]
    alpha_prod_prev: torch.Tensor  # [T] float32: alpha-bar at the next (less noisy) timestep
    eta: float
    num_train_timesteps: int
    prediction_type: str = "epsilon"  # what the network predicts: "epsilon", "v_prediction" or "sample"
    clip_sample_range: float | None = None  # x0_hat is clipped to [-range, range] (the scheduler's clip_sample)

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict, num_inference_steps: int, eta: float) -> DDIMSchedule:
        """Timesteps and alpha-bars exactly as `diffusers.DDIMScheduler.set_timesteps` makes them from the model's
        scheduler config, whose options the step honours (prediction_type, clip_sample) or refuses (thresholding)."""
        from diffusers import DDIMScheduler

        if "FlowMatch" in scheduler_config.get("_class_name", ""):
            raise ValueError(f"the model's scheduler is {scheduler_config['_class_name']}: it is a flow-matching "
                             "model, not a DDPM; use a flow env (env=digits_flow, or env=flow env.base_model=...)")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must lie in [0, 1] (0 = deterministic DDIM, 1 = memoryless), got {eta}")
        scheduler = DDIMScheduler.from_config(dict(scheduler_config))
        config = scheduler.config
        if config.thresholding:
            raise ValueError("the model's scheduler config sets thresholding=true (dynamic thresholding of x0), which "
                             "rlft's sampler does not implement; set it to false in the model's scheduler_config.json")
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"the model's scheduler config has prediction_type={config.prediction_type!r}; rlft's "
                             f"sampler reads {', '.join(PREDICTION_TYPES)}")  # fmt: skip
        scheduler.set_timesteps(num_inference_steps)
        timesteps = scheduler.timesteps.to(torch.int64)
        prev = timesteps - config.num_train_timesteps // num_inference_steps
        alphas = scheduler.alphas_cumprod.to(torch.float32)
        alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], scheduler.final_alpha_cumprod.float())
        clip = float(config.clip_sample_range) if config.clip_sample else None
        return cls(timesteps, alphas[timesteps], alpha_prev, float(eta), int(config.num_train_timesteps),
                   config.prediction_type, clip)  # fmt: skip

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
        return dataclasses.replace(self, timesteps=self.timesteps.to(device), alpha_prod=self.alpha_prod.to(device),
                                   alpha_prod_prev=self.alpha_prod_prev.to(device))  # fmt: skip

    def step(self, step_index: int | torch.Tensor, model_output: torch.Tensor, sample: torch.Tensor, *,
             noise: torch.Tensor | None = None, prev_sample: torch.Tensor | None = None,
             eta: float | None = None):  # fmt: skip
        """`rlft.core.sampler.ddim_step` on this schedule."""
        from rlft.core.sampler import ddim_step

        return ddim_step(self, step_index, model_output, sample, noise=noise, prev_sample=prev_sample, eta=eta)

    def add_noise(self, step_index: int | torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`rlft.core.sampler.add_noise`: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) e at step k's timestep."""
        from rlft.core.sampler import add_noise

        return add_noise(self, step_index, x0, noise)

    def denoising_target(self, step_index: int | torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The network's regression target at add_noise(k, x0, noise) for its prediction_type: e, v or x_0."""
        if self.prediction_type == "epsilon":
            return noise.float()
        if self.prediction_type == "sample":
            return x0.float()
        a_t = self.alpha_prod.to(x0.device)[step_index].float().reshape(-1, *([1] * (x0.dim() - 1)))
        return a_t.sqrt() * noise.float() - (1 - a_t).sqrt() * x0.float()  # v = sqrt(a) e - sqrt(1 - a) x_0

    def with_eta(self, eta: float) -> DDIMSchedule:
        """The same timesteps with another stochasticity (eta = 0: DDIM's deterministic sampler, for DRaFT)."""
        return dataclasses.replace(self, eta=float(eta))
