"""The policy: a diffusers network behind the sampler step of its schedule (rlft.core.sampler, rlft.core.flow).

`DiffusionPolicy.step` is the network call (guided for conditional models) plus its schedule's step (DDIM, or the
flow sampler), which returns `(prev_sample, log_prob, mean, std, x0_hat)`. `reference_forward` is the frozen base
network's prediction: adapters switched off (LoRA), the base network under a correction (DEFT), or a frozen copy
kept for the purpose (full fine-tuning with a KL penalty or Adjoint Matching's lean adjoints).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.utils.checkpoint
from torch import nn

from rlft.core.flow import FlowSchedule
from rlft.core.sampler import StepOutput, guide
from rlft.core.schedule import DDIMSchedule
from rlft.envs.stable_diffusion import unpack_sd3_context
from rlft.fsdp import full, shard_like


class DiffusionPolicy(nn.Module):
    """A diffusers network (UNet2DModel, UNet2DConditionModel or SD3Transformer2DModel) and its sampling schedule: a
    DDIMSchedule for a noise (or v, or x_0) predicting DDPM, a FlowSchedule for a velocity-predicting flow model.

    `forward` is the network call only, so DDP can wrap the policy; `step` is forward + the schedule's step. Conditional
    models are guided (classifier-free guidance with `null_context`, the env's negative-prompt embedding) with
    `guidance_scale` unless a call gives its own.
    """

    def __init__(
        self, unet: nn.Module, schedule: DDIMSchedule | FlowSchedule, autocast_dtype: torch.dtype | None = None,
        correction: nn.Module | None = None, null_context: torch.Tensor | None = None, guidance_scale: float = 1.0,
    ):  # fmt: skip
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype  # bf16 autocast for the network; the step maths stays fp32
        self.memory_format = torch.contiguous_format
        # SD3's MMDiT takes its prompt as token embeddings and a pooled embedding, packed into one context tensor by
        # the env (rlft.envs.stable_diffusion.pack_sd3_context); UNets take the tokens as cross-attention states
        self.pooled_dim = getattr(unet.config, "pooled_projection_dim", None)
        self.conditional = bool(getattr(unet.config, "cross_attention_dim", None) or self.pooled_dim)
        if self.conditional and null_context is None and guidance_scale != 1.0:
            raise ValueError("classifier-free guidance needs the null context (the negative prompt's embedding)")
        self.register_buffer("null_context", null_context, persistent=False)  # [1, *ctx] or None
        self.guidance_scale = float(guidance_scale)  # of sampling; calls may give another (Adjoint Matching)
        self.gradient_checkpointing = False  # set by rlft.lora.configure_policy from the `policy:` config
        self.backward_layout_pass = None  # compile_network's NHWCConvolutionBackward, when the network is NHWC
        self.fused_norm_silu_count = 0  # group norms compile_network routed through rlft's Triton kernels
        # `correction(x_t, timestep, context, base_output)` is added to the noise prediction of a frozen base
        # network (DEFT's h-transform); then only its weights train and travel to the rollout workers
        self.correction = correction
        if correction is not None:
            self.unet.requires_grad_(False)
        self.reference_unet: nn.Module | None = None  # a frozen copy, made by keep_reference when it is needed

    def keep_reference(self) -> None:
        """Make `reference_forward` available. A frozen copy of the network is kept only when nothing cheaper gives
        the base model's prediction: with LoRA adapters they are switched off, under a correction the base network is
        frozen anyway. Call it after LoRA adapters are added and before compiling."""
        if self.correction is None and self.reference_unet is None and not has_adapters(self.unet):
            self.reference_unet = copy.deepcopy(self.unet).eval().requires_grad_(False)

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
        each group norm + SiLU through rlft's Triton kernels (rlft/kernels/group_norm_silu.py), so the check covers
        them too.

        Why check: a miscompiled backward trains silently wrong. With torch 2.13's inductor on CPU, the digits UNet's
        compiled backward dropped the gradient through its lowest-resolution upsampler, so every weight at 4x4 got
        a zero gradient while the output still matched eager. The check costs one eager and one compiled call."""
        reference = self._probe(probe, check_gradients)
        if fused_norm_silu:
            from rlft.kernels.group_norm_silu import fuse_norm_silu  # imports triton: only when asked for

            self.fused_norm_silu_count = fuse_norm_silu(self.unet)
        options = dict(inductor_options or {})
        if self.memory_format == torch.channels_last:
            from rlft.kernels.inductor_passes import NHWCConvolutionBackward  # imports inductor: only when compiling

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
        self, x_t: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, base_output: torch.Tensor | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """The network's prediction (guided); `base_output` is the base network's, when the caller has it (DEFT)."""
        if base_output is None:
            base_output = self.base_forward(x_t, timestep, context, guidance_scale)
        if self.correction is None:
            return base_output
        return base_output.float() + self.correction(x_t, timestep, context, base_output)

    def base_forward(self, x_t: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                     guidance_scale: float | None = None, network: nn.Module | None = None) -> torch.Tensor:
        """The network alone (no correction), guided with `guidance_scale` (default: the policy's) for conditional
        models: one batched call on the context and the null context."""
        network = self.unet if network is None else network
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        if not self.conditional or w == 1.0:
            return self._checkpointed(network, x_t, timestep, context)
        null = self.null_context.to(context.dtype).expand(len(context), *context.shape[1:])
        both = self._checkpointed(network, torch.cat([x_t, x_t]), torch.cat([timestep, timestep]),
                                  torch.cat([context, null]))  # fmt: skip
        conditional, unconditional = both.chunk(2)
        return guide(conditional, unconditional, w)

    def reference_forward(self, x_t: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                          guidance_scale: float | None = None) -> torch.Tensor:  # fmt: skip
        """The frozen base model's prediction at (x_t, t, c): what a KL penalty or AM's lean adjoint compares with.
        Differentiable in x_t (AM takes vector-Jacobian products through it); no parameter gets a gradient."""
        if self.correction is not None:
            return self.base_forward(x_t, timestep, context, guidance_scale)
        if has_adapters(self.unet):
            with adapters_disabled(self.unet):
                return self.base_forward(x_t, timestep, context, guidance_scale)
        if self.reference_unet is None:
            raise RuntimeError("this policy keeps no reference network; build it with keep_reference()")
        return self.base_forward(x_t, timestep, context, guidance_scale, network=self.reference_unet)

    def _checkpointed(self, network: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor,
                      context: torch.Tensor) -> torch.Tensor:  # fmt: skip
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # keep only this call's inputs; its activations are recomputed in the backward pass
            return torch.utils.checkpoint.checkpoint(self._network, network, x_t, timestep, context,
                                                     use_reentrant=False)  # fmt: skip
        return self._network(network, x_t, timestep, context)

    def _network(self, network: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor,
                 context: torch.Tensor) -> torch.Tensor:  # fmt: skip
        x_t = x_t.contiguous(memory_format=self.memory_format)
        with torch.autocast(x_t.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            if self.pooled_dim:
                tokens, pooled = unpack_sd3_context(context, self.pooled_dim)
                return network(hidden_states=x_t, timestep=timestep, encoder_hidden_states=tokens,
                               pooled_projections=pooled).sample  # fmt: skip
            if self.conditional:
                return network(x_t, timestep, encoder_hidden_states=context).sample
            return network(x_t, timestep).sample

    def step(
        self,
        x_t: torch.Tensor,
        step_index: int | torch.Tensor,
        context: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
        network: nn.Module | None = None,
        base_output: torch.Tensor | None = None,
        guidance_scale: float | None = None,
        eta: float | None = None,
        reference: bool = False,
    ) -> StepOutput:
        """Sampler step k (an int, or [B] per sample) of the schedule. `network` is this policy or its DDP wrapper
        (default: self); `reference` steps the frozen base model instead; `eta` overrides the schedule's."""
        s = self.schedule
        step_index = step_index if isinstance(step_index, int) else step_index.to(s.timesteps.device)
        timestep = s.timesteps[step_index].expand(x_t.shape[0])
        if reference:
            output = self.reference_forward(x_t, timestep, context, guidance_scale)
        else:
            output = (network or self)(x_t, timestep, context, base_output, guidance_scale)
        return s.step(step_index, output, x_t, noise=noise, prev_sample=prev_sample, eta=eta)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights an update changes (all of them, or LoRA adapters only), detached on CPU; full tensors also when
        the network is sharded (FSDP learners: then every replica must call it at once, rlft.fsdp)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: full(v).detach().cpu().clone() for k, v in self.state_dict().items() if k in trainable}

    def load_trainable_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Load full tensors (a publish, a checkpoint); a sharded network keeps this replica's shard of each."""
        current = self.state_dict()
        missing = set(weights) - set(current)
        if missing:
            raise KeyError(f"weights for parameters this policy does not have: {sorted(missing)[:5]}")
        self.load_state_dict({k: shard_like(v, current[k]) for k, v in weights.items()}, strict=False)


def has_adapters(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


@contextlib.contextmanager
def adapters_disabled(module: nn.Module):
    """The network without its LoRA adapters (the base model) inside the block; which parameters train is kept."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    trains = {p: p.requires_grad for layer in layers for p in layer.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, requires_grad in trains.items():  # peft's enable_adapters(True) makes adapters trainable
            parameter.requires_grad_(requires_grad)
