"""The policy: a diffusers network plus the DDIM transition with its log-probability.

`ddim_step` is the pure sampler step every algorithm relies on (Song et al. 2021, eq. 12; DDPO, Black et al.
2023, sec. 4.2). It takes the network output and returns `(prev_sample, log_prob, mean, std)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from rlft.envs.schedule import DDIMSchedule

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t-1}, [B, C, H, W]
    log_prob: torch.Tensor  # [B] float32: log N(prev_sample; mean, std^2) averaged over image dimensions
    mean: torch.Tensor  # [B, C, H, W] float32
    std: torch.Tensor  # [B, 1, 1, 1] float32


def _per_sample(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.reshape(-1, *([1] * (like.dim() - 1)))  # [B or 1, 1, 1, 1]


def ddim_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod: torch.Tensor | float,
    alpha_prod_prev: torch.Tensor | float,
    eta: float,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """One DDIM transition x_t -> x_{t-1} ~ N(mean, std^2 I) with an epsilon-prediction network.

    Give `noise` to sample `prev_sample = mean + std * noise`, or `prev_sample` to score a given transition
    (DDPO's new log-probability of an old action). The maths runs in fp32 whatever the network's dtype, since
    importance ratios of bf16 log-probabilities are far from 1 even on-policy.
    """
    if (noise is None) == (prev_sample is None):
        raise ValueError("ddim_step needs exactly one of `noise` (to sample) or `prev_sample` (to score)")
    eps = model_output.float()
    x_t = sample.float()
    a_t, a_prev = _per_sample(alpha_prod, x_t), _per_sample(alpha_prod_prev, x_t)
    x0_hat = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)  # the DDPM posterior variance
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0_hat + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        prev_sample = mean + std * noise.float()
    x_prev = prev_sample.float()
    # Gaussian log-density per dimension, then the mean over dimensions (not the sum: see DDPO's clip range).
    # A deterministic step (std = 0: eta = 0, or the last step onto alpha-bar = 1) has no density; it gets
    # log_prob 0, and algorithms that need densities train only on stochastic steps (`stochastic_steps`).
    std = std.expand(x_prev.shape[0], *std.shape[1:])
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = -((x_prev.detach() - mean) ** 2) / (2 * safe_std**2) - safe_std.log() - LOG_SQRT_2PI
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    log_prob = log_prob.mean(dim=tuple(range(1, x_prev.dim())))
    return StepOutput(prev_sample, log_prob, mean, std)


class DiffusionPolicy(nn.Module):
    """A noise-prediction network (diffusers UNet2DModel or UNet2DConditionModel) and the DDIM schedule.

    `forward` is the network call only, so DDP can wrap the policy; `step` is forward + `ddim_step`.
    """

    def __init__(
        self, unet: nn.Module, schedule: DDIMSchedule, autocast_dtype: torch.dtype | None = None,
        correction: nn.Module | None = None,
    ):  # fmt: skip
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype  # bf16 autocast for the network; the step maths stays fp32
        self.memory_format = torch.contiguous_format
        self.conditional = hasattr(unet.config, "cross_attention_dim") and unet.config.cross_attention_dim
        self.gradient_checkpointing = False  # set by rlft.lora.configure_policy from the `policy:` config
        self.backward_layout_pass = None  # compile_network's NHWCConvolutionBackward, when the network is NHWC
        self.fused_norm_silu_count = 0  # group norms compile_network routed through rlft's Triton kernels
        # `correction(x_t, timestep, context, base_output)` is added to the noise prediction of a frozen base
        # network (DEFT's h-transform); then only its weights train and travel to the rollout workers
        self.correction = correction
        if correction is not None:
            self.unet.requires_grad_(False)

    def use_channels_last(self) -> None:
        """NHWC layout for the network and its inputs: cuDNN's fast convolution layout for bf16 tensor cores.
        Call it after any module surgery (LoRA), so new layers are converted too."""
        self.memory_format = torch.channels_last
        self.unet.to(memory_format=torch.channels_last)

    def compile_network(
        self, probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor], check_gradients: bool,
        inductor_options: dict | None = None, fused_norm_silu: bool = False,
    ) -> None:  # fmt: skip
        """torch.compile the network in place (parameter names unchanged, so weights still publish as before), then
        check the compiled network against eager on `probe` = (x_t, timestep, context): its output and, with
        `check_gradients`, the gradients of the trainable parameters. `inductor_options` go to inductor as they are
        (torch._inductor.config names, e.g. {"coordinate_descent_tuning": True}). `fused_norm_silu` first routes
        each group norm + SiLU through rlft's Triton kernels (rlft/group_norm_silu.py), so the check covers them too.

        Why check: a miscompiled backward trains silently wrong. With torch 2.13's inductor on CPU, the digits UNet's
        compiled backward dropped the gradient through its lowest-resolution upsampler, so every weight at 4x4 got
        a zero gradient while the output still matched eager. The check costs one eager and one compiled call."""
        reference = self._probe(probe, check_gradients)
        if fused_norm_silu:
            from rlft.group_norm_silu import fuse_norm_silu  # imports triton: only when asked for

            self.fused_norm_silu_count = fuse_norm_silu(self.unet)
        options = dict(inductor_options or {})
        if self.memory_format == torch.channels_last:
            from rlft.inductor_passes import NHWCConvolutionBackward  # imports inductor: only when compiling

            self.backward_layout_pass = NHWCConvolutionBackward()
            # force: the layout decision counts forward convolutions, and a backward graph has none
            options.update(force_layout_optimization=True, post_grad_custom_post_pass=self.backward_layout_pass)
        self.unet.compile(dynamic=False, options=options or None)
        compiled = self._probe(probe, check_gradients)
        # loose, to catch miscompiles and not rounding: fusion reorders sums, and bf16 rounds more (on the digits
        # UNet, eager bf16 autocast against fp32 gave gradient errors of 0.3% median and 1.3% at worst)
        tolerance = 0.01 if self.autocast_dtype is None else 0.1
        # errors relative to each tensor, floored at 1e-3 of all gradients' norm: some gradients are zero in exact
        # arithmetic (an attention key's bias) and differ only by rounding
        gradient_norms = [g.norm() for name, g in reference.items() if name != "output"]
        scale = torch.stack(gradient_norms).norm() if gradient_norms else torch.zeros(())
        errors = {}
        for name, expected in reference.items():
            floor = expected.norm() if name == "output" else torch.maximum(expected.norm(), 1e-3 * scale)
            errors[name] = ((compiled[name] - expected).norm() / floor).nan_to_num(torch.inf).item()
        wrong = sorted((name for name, error in errors.items() if error > tolerance), key=errors.get, reverse=True)
        if wrong:
            worst = ", ".join(f"{name} (relative error {errors[name]:.2g})" for name in wrong[:4])
            raise RuntimeError(
                f"torch.compile (torch {torch.__version__}, {self.device.type}) changed the network's results beyond "
                f"{tolerance:g} relative error, checked against eager on one batch: {len(wrong)} of {len(reference)} "
                f"tensors differ, worst {worst}. Training on it would be silently wrong; run with policy.compile=false "
                "(eager)" + (" or policy.fused_norm_silu=false" if fused_norm_silu else "") + ", or try another torch "
                "version."
            )

    def _probe(self, probe: tuple[torch.Tensor, ...], gradients: bool) -> dict[str, torch.Tensor]:
        """The network's output on `probe` and, with `gradients`, d(mean squared output)/d(trainable parameter)."""
        trainable = {name: p for name, p in self.named_parameters() if p.requires_grad} if gradients else {}
        with torch.set_grad_enabled(bool(trainable)):
            output = self.base_forward(*probe).float()
            result = {"output": output.detach()}
            if trainable:
                grads = torch.autograd.grad(output.square().mean(), list(trainable.values()), allow_unused=True)
                result.update({name: (torch.zeros_like(p) if g is None else g).float()
                               for (name, p), g in zip(trainable.items(), grads, strict=True)})  # fmt: skip
        return result

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def forward(
        self, x_t: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, base_output: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The noise prediction; `base_output` is the base network's, when the caller has it already (DEFT)."""
        if base_output is None:
            base_output = self.base_forward(x_t, timestep, context)
        if self.correction is None:
            return base_output
        return base_output.float() + self.correction(x_t, timestep, context, base_output)

    def base_forward(self, x_t: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # keep only this call's inputs; its activations are recomputed in the backward pass
            return torch.utils.checkpoint.checkpoint(self._network, x_t, timestep, context, use_reentrant=False)
        return self._network(x_t, timestep, context)

    def _network(self, x_t: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x_t = x_t.contiguous(memory_format=self.memory_format)
        with torch.autocast(x_t.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if self.conditional:
                return self.unet(x_t, timestep, encoder_hidden_states=context).sample
            return self.unet(x_t, timestep).sample

    def step(
        self,
        x_t: torch.Tensor,
        step_index: int,
        context: torch.Tensor,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
        network: nn.Module | None = None,
        base_output: torch.Tensor | None = None,
    ) -> StepOutput:
        """Sampler step k of the schedule; `network` is this policy or its DDP wrapper (defaults to self)."""
        s = self.schedule
        timestep = s.timesteps[step_index].expand(x_t.shape[0])
        eps = (network or self)(x_t, timestep, context, base_output)
        return ddim_step(
            eps, x_t, s.alpha_prod[step_index], s.alpha_prod_prev[step_index], s.eta, noise, prev_sample
        )

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights an update changes (all of them, or LoRA adapters only), detached on CPU."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in trainable}

    def load_trainable_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        missing = set(weights) - set(self.state_dict())
        if missing:
            raise KeyError(f"weights for parameters this policy does not have: {sorted(missing)[:5]}")
        self.load_state_dict(weights, strict=False)


def load_base_model(spec: str) -> tuple[nn.Module, dict]:
    """Load a base DDPM as (UNet2DModel, scheduler config) from "builtin:digits", a folder or a hub id.

    Stable Diffusion bases (env.model_type=stable_diffusion) load by component in `rlft.stable_diffusion`.
    """
    from rlft.envs.models import load_ddpm

    if spec == "builtin:digits":
        from rlft.envs.digits import BASE_MODEL_DIR

        path = BASE_MODEL_DIR
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the shipped digits DDPM is missing from {path}; train it with `python -m rlft.pretrain env=digits`"
            )
        spec = str(path)
    return load_ddpm(spec)
