"""Group norm followed by SiLU on NHWC activations: Triton kernels, with the exact backward.

Why: in the compiled DDPO training call on the celebahq-256 UNet (H100, benchmarks/gpu_ddpo_epoch.py), inductor's
fused kernels (group norm, SiLU, their backward, the casts and adds fused into them) take 47% of the GPU time, 2.87 ms
per trained sample-step; moving the group norms' tensors once (10 bytes per element: the forward reads x and writes
y, the backward reads x and dy and writes dx) at the card's 3.35 TB/s takes 0.5 ms. In NHWC memory a pixel's
channels are contiguous, so these kernels read whole pixel rows (every channel) per tile, keep per-channel sums in
registers, and fold channels into groups only at the end (a traversal group by group would use 8 bytes of every
256-byte pixel row: 4 of 128 channels in bf16).

Passes over the activation (N x C x H x W, P = H*W pixels), each a kernel over (sample, block of pixels):
    forward:  group statistics (read x)        -> scale/shift + SiLU (read x, write y)
    backward: per-channel sums (read x, dy)    -> input gradient (read x, dy, write dx)
The statistics run in fp32 whatever the activation's dtype (bf16 under autocast), as eager group norm's do.
`benchmarks/gpu_group_norm_silu.py` times these kernels and inductor's against that floor on the UNet's shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

# Tiles are [pixels, channels] blocks of whole pixel rows. Sizes keep 16 elements per thread: compiled for sm_90,
# each kernel then needs at most 115 registers and spills none (ptxas -v, 128 to 1024 channels), so several programs
# share an SM to hide memory latency. (Twice these tiles needed up to 217 registers.)
POINTWISE_TILE = 2048  # elements a pointwise program (4 warps) holds
REDUCTION_TILE = 4096  # elements per tile of a reduction program (8 warps), which keeps 2 fp32 accumulators of it
REDUCTION_WARPS = 8
TILES_PER_REDUCTION = 8  # tiles a reduction program sums, so its partial sums are few


@triton.jit
def _channel_moments_kernel(
    x_ptr, sum_ptr, square_ptr, P, C, CPG, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
):  # fmt: skip
    """Per channel and block of pixels, the sums of d and d^2, d = x - (the first element of the channel's group):
    [N, blocks, C]."""
    n, block = tl.program_id(0), tl.program_id(1)
    channels = tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    first = block * BLOCK_P * TILES
    base = x_ptr + n.to(tl.int64) * P * C
    # the shift makes sums of squares keep the variance when a group's mean is large against its spread (plain
    # E[x^2] - E[x]^2 cancels); all blocks and channels of a group share it, so their sums simply add up
    shift = tl.load(base + (channels // CPG) * CPG, mask=channel_ok, other=0.0).to(tl.float32)
    sums = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    squares = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for tile in range(TILES):
        pixels = first + tile * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (pixels < P)[:, None] & channel_ok[None, :]
        x = tl.load(base + pixels[:, None] * C + channels[None, :], mask=ok, other=0.0).to(tl.float32)
        d = tl.where(ok, x - shift[None, :], 0.0)
        sums += d
        squares += d * d
    out = (n * tl.num_programs(1) + block) * C + channels
    tl.store(sum_ptr + out, tl.sum(sums, axis=0), mask=channel_ok)
    tl.store(square_ptr + out, tl.sum(squares, axis=0), mask=channel_ok)


@triton.jit
def _scale_shift_silu_kernel(x_ptr, scale_ptr, shift_ptr, y_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = silu(x * scale + shift), scale and shift per (sample, channel)."""
    n, block = tl.program_id(0), tl.program_id(1)
    channels = tl.arange(0, BLOCK_C)
    pixels = block * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = (pixels < P)[:, None] & (channels < C)[None, :]
    offsets = n.to(tl.int64) * P * C + pixels[:, None] * C + channels[None, :]
    scale = tl.load(scale_ptr + n * C + channels, mask=channels < C, other=0.0)
    shift = tl.load(shift_ptr + n * C + channels, mask=channels < C, other=0.0)
    z = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32) * scale[None, :] + shift[None, :]
    tl.store(y_ptr + offsets, (z * tl.sigmoid(z)).to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _silu_grad(x, dy, scale, shift):
    """d loss / d z at z = x * scale + shift, given d loss / d silu(z) = dy."""
    z = x * scale[None, :] + shift[None, :]
    s = tl.sigmoid(z)
    return dy * s * (1.0 + z * (1.0 - s))


@triton.jit
def _channel_sums_kernel(
    x_ptr, dy_ptr, scale_ptr, shift_ptr, mean_ptr, rstd_ptr, dz_sum_ptr, dz_xhat_sum_ptr, P, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, TILES: tl.constexpr,
):  # fmt: skip
    """Per channel and block of pixels, the sums of dz and dz * x_hat (z = gamma * x_hat + beta): [N, blocks, C]."""
    n, block = tl.program_id(0), tl.program_id(1)
    channels = tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    per_channel = n * C + channels
    scale = tl.load(scale_ptr + per_channel, mask=channel_ok, other=0.0)
    shift = tl.load(shift_ptr + per_channel, mask=channel_ok, other=0.0)
    mean = tl.load(mean_ptr + per_channel, mask=channel_ok, other=0.0)
    rstd = tl.load(rstd_ptr + per_channel, mask=channel_ok, other=0.0)
    first = block * BLOCK_P * TILES
    base = n.to(tl.int64) * P * C
    dz_sum = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    dz_xhat_sum = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for tile in range(TILES):
        pixels = first + tile * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (pixels < P)[:, None] & channel_ok[None, :]
        offsets = base + pixels[:, None] * C + channels[None, :]
        x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
        dz = _silu_grad(x, tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32), scale, shift)
        dz = tl.where(ok, dz, 0.0)
        dz_sum += dz
        dz_xhat_sum += dz * (x - mean[None, :]) * rstd[None, :]
    out = (n * tl.num_programs(1) + block) * C + channels
    tl.store(dz_sum_ptr + out, tl.sum(dz_sum, axis=0), mask=channel_ok)
    tl.store(dz_xhat_sum_ptr + out, tl.sum(dz_xhat_sum, axis=0), mask=channel_ok)


@triton.jit
def _input_grad_kernel(
    x_ptr, dy_ptr, scale_ptr, shift_ptr, x_coef_ptr, bias_ptr, dx_ptr, P, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """dx = scale * dz + x_coef * x + bias, the coefficients per (sample, channel); scale = rstd * gamma."""
    n, block = tl.program_id(0), tl.program_id(1)
    channels = tl.arange(0, BLOCK_C)
    channel_ok = channels < C
    per_channel = n * C + channels
    pixels = block * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = (pixels < P)[:, None] & channel_ok[None, :]
    offsets = n.to(tl.int64) * P * C + pixels[:, None] * C + channels[None, :]
    scale = tl.load(scale_ptr + per_channel, mask=channel_ok, other=0.0)
    shift = tl.load(shift_ptr + per_channel, mask=channel_ok, other=0.0)
    x = tl.load(x_ptr + offsets, mask=ok, other=0.0).to(tl.float32)
    dz = _silu_grad(x, tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(tl.float32), scale, shift)
    x_coef = tl.load(x_coef_ptr + per_channel, mask=channel_ok, other=0.0)
    bias = tl.load(bias_ptr + per_channel, mask=channel_ok, other=0.0)
    dx = scale[None, :] * dz + x_coef[None, :] * x + bias[None, :]
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _pointwise_tiling(pixels: int, channels: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of a pointwise kernel over a [pixels, channels] activation."""
    block_c = triton.next_power_of_2(channels)
    return max(1, POINTWISE_TILE // block_c), block_c


def _reduction_tiling(pixels: int, channels: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_C, tiles per program) of a reduction kernel over a [pixels, channels] activation."""
    block_c = triton.next_power_of_2(channels)
    block_p = max(1, REDUCTION_TILE // block_c)
    return block_p, block_c, min(TILES_PER_REDUCTION, triton.cdiv(pixels, block_p))


def _check_input(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor) -> None:
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(
            f"group_norm_silu takes a 4-D NHWC activation (channels_last memory); got shape {tuple(x.shape)} with "
            f"strides {x.stride()}: convert it with x.contiguous(memory_format=torch.channels_last)"
        )
    channels = x.shape[1]
    if channels % num_groups:
        raise ValueError(f"group_norm_silu: {channels} channels do not split into {num_groups} equal groups")
    if weight.shape != (channels,) or bias.shape != (channels,):
        raise ValueError(f"group_norm_silu: weight and bias must have shape ({channels},), got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")  # fmt: skip
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"group_norm_silu runs Triton kernels on a CUDA GPU; x is on {x.device}. To check the kernels on CPU "
            "(slowly), set TRITON_INTERPRET=1 before anything imports triton."
        )


def _group_moments(x: torch.Tensor, num_groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (sample, group)'s mean and 1 / sqrt(variance + eps), fp32 [N, G] (biased variance, as group norm)."""
    n, c, h, w = x.shape
    pixels, per_group = h * w, c // num_groups
    block_p, block_c, tiles = _reduction_tiling(pixels, c)
    blocks = triton.cdiv(pixels, block_p * tiles)
    block_sums = x.new_empty(n, blocks, c, dtype=torch.float32)
    block_squares = torch.empty_like(block_sums)
    _channel_moments_kernel[(n, blocks)](x, block_sums, block_squares, pixels, c, per_group, BLOCK_P=block_p,
                                         BLOCK_C=block_c, TILES=tiles, num_warps=REDUCTION_WARPS)  # fmt: skip
    elements = pixels * per_group
    shifted_mean = block_sums.view(n, blocks, num_groups, per_group).sum((1, 3)) / elements  # [N, G], of d
    shifted_square = block_squares.view(n, blocks, num_groups, per_group).sum((1, 3)) / elements
    variance = (shifted_square - shifted_mean**2).clamp(min=0)
    shift = x[:, ::per_group, 0, 0].float()  # each group's first element, as the kernel took it
    return shift + shifted_mean, torch.rsqrt(variance + eps)


def _per_channel(values: torch.Tensor, channels: int) -> torch.Tensor:
    """[N, G] -> [N, C], each group's value repeated over its channels."""
    return values.repeat_interleave(channels // values.shape[1], dim=1)


def _scale_shift(mean_c: torch.Tensor, rstd_c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """Per (sample, channel) [N, C]: z = x * scale + shift = gamma * x_hat + beta."""
    scale = rstd_c * weight.float()
    return scale, bias.float() - mean_c * scale


@torch.library.custom_op("rlft::group_norm_silu", mutates_args=())
def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, num_groups: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    mean, rstd = _group_moments(x, num_groups, eps)
    scale, shift = _scale_shift(_per_channel(mean, c), _per_channel(rstd, c), weight, bias)
    y = torch.empty_like(x)  # channels_last, as x
    block_p, block_c = _pointwise_tiling(h * w, c)
    _scale_shift_silu_kernel[(n, triton.cdiv(h * w, block_p))](x, scale, shift, y, h * w, c, BLOCK_P=block_p,
                                                               BLOCK_C=block_c)  # fmt: skip
    return y, mean, rstd


@_forward.register_fake
def _(x, weight, bias, num_groups, eps):
    statistics = x.new_empty(x.shape[0], num_groups, dtype=torch.float32)
    return torch.empty_like(x), statistics, torch.empty_like(statistics)


@torch.library.custom_op("rlft::group_norm_silu_backward", mutates_args=())
def _backward(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    n, c, h, w = x.shape
    pixels, num_groups = h * w, mean.shape[1]
    grad_y = grad_y.contiguous(memory_format=torch.channels_last)
    gamma = weight.float()
    mean_c, rstd_c = _per_channel(mean, c), _per_channel(rstd, c)  # [N, C]
    scale, shift = _scale_shift(mean_c, rstd_c, weight, bias)
    block_p, block_c, tiles = _reduction_tiling(pixels, c)
    blocks = triton.cdiv(pixels, block_p * tiles)
    dz_sums = x.new_empty(n, blocks, c, dtype=torch.float32)
    dz_xhat_sums = torch.empty_like(dz_sums)
    _channel_sums_kernel[(n, blocks)](x, grad_y, scale, shift, mean_c, rstd_c, dz_sums, dz_xhat_sums, pixels, c,
                                      BLOCK_P=block_p, BLOCK_C=block_c, TILES=tiles,
                                      num_warps=REDUCTION_WARPS)  # fmt: skip
    dz_sum, dz_xhat_sum = dz_sums.sum(1), dz_xhat_sums.sum(1)  # [N, C]
    # group norm's input gradient, with g = gamma * dz the gradient of x_hat and M = pixels * channels per group:
    #   dx = rstd * (g - mean_group(g) - x_hat * mean_group(g * x_hat)),  x_hat = (x - mean) * rstd
    group_elements = pixels * (c // num_groups)
    mean_g = _per_channel((gamma * dz_sum).view(n, num_groups, -1).sum(-1), c) / group_elements
    mean_g_xhat = _per_channel((gamma * dz_xhat_sum).view(n, num_groups, -1).sum(-1), c) / group_elements
    x_coef = -rstd_c * rstd_c * mean_g_xhat
    constant = -rstd_c * mean_g - x_coef * mean_c
    grad_x = torch.empty_like(x)
    block_p, block_c = _pointwise_tiling(pixels, c)
    _input_grad_kernel[(n, triton.cdiv(pixels, block_p))](
        x, grad_y, scale, shift, x_coef, constant, grad_x, pixels, c,
        BLOCK_P=block_p, BLOCK_C=block_c,
    )  # fmt: skip
    return grad_x, dz_xhat_sum.sum(0).to(weight.dtype), dz_sum.sum(0).to(bias.dtype)


@_backward.register_fake
def _(grad_y, x, weight, bias, mean, rstd):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _autograd_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    grad_x, grad_weight, grad_bias = _backward(grad_y, *ctx.saved_tensors)
    return grad_x, grad_weight, grad_bias, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def group_norm_silu(
    x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> torch.Tensor:
    """silu(group_norm(x)) for an NHWC activation x [N, C, H, W] (channels_last memory), in x's dtype, computed in
    fp32: what `F.silu(F.group_norm(x.float(), num_groups, weight, bias, eps)).to(x.dtype)` gives, differentiable
    in x, weight and bias."""
    _check_input(x, num_groups, weight, bias)
    return _forward(x, weight, bias, num_groups, eps)[0]


class FusedGroupNormSiLU(nn.GroupNorm):
    """silu(group_norm(x)) in one custom op. `fuse_norm_silu` swaps it in as the class of existing GroupNorm modules,
    so parameters keep their names and the weights, checkpoints and LoRA adapters stay as they are."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op in an NHWC network
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)


class FusedResnetBlock2D(ResnetBlock2D):
    """diffusers' ResnetBlock2D (default time-embedding norm, no up/downsampling inside) whose norm1 and norm2 are
    FusedGroupNormSiLU, so it skips the SiLU after each; otherwise the same computation in the same order."""

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None, *args, **kwargs) -> torch.Tensor:
        hidden_states = self.conv1(self.norm1(input_tensor))
        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = self.conv2(self.dropout(self.norm2(hidden_states)))
        if self.conv_shortcut is not None:
            # diffusers makes the input contiguous in training (DDP's gradient strides); here it stays NHWC
            input_tensor = self.conv_shortcut(input_tensor.contiguous(memory_format=torch.channels_last))
        return (input_tensor + hidden_states) / self.output_scale_factor


def _fusable(norm: nn.Module | None) -> bool:
    return type(norm) is nn.GroupNorm and norm.affine


def fuse_norm_silu(unet: nn.Module) -> int:
    """Route every group norm that a SiLU follows in a diffusers UNet through `group_norm_silu`: the resnet blocks'
    norm1 and norm2 (blocks with the default time-embedding norm and no up/downsampling inside; others stay as they
    are) and the output norm. Returns the number of group norms fused."""
    fused = 0
    for module in list(unet.modules()):  # a list: the loop replaces submodules
        if (type(module) is ResnetBlock2D and module.time_embedding_norm == "default" and module.upsample is None
                and module.downsample is None and isinstance(module.nonlinearity, nn.SiLU)
                and _fusable(module.norm1) and _fusable(module.norm2)):  # fmt: skip
            module.__class__ = FusedResnetBlock2D
            module.norm1.__class__ = module.norm2.__class__ = FusedGroupNormSiLU
            fused += 2
        elif _fusable(getattr(module, "conv_norm_out", None)) and type(getattr(module, "conv_act", None)) is nn.SiLU:
            module.conv_norm_out.__class__ = FusedGroupNormSiLU
            module.conv_act = nn.Identity()
            fused += 1
    return fused
