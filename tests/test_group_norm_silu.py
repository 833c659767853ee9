"""rlft.kernels.group_norm_silu's Triton kernels against autograd in float64: on a GPU when there is one, else on CPU
through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported)."""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def kernels():
    module = importlib.import_module("rlft.kernels.group_norm_silu")
    interpreted = type(module._scale_shift_silu_kernel).__name__ == "InterpretedFunction"
    assert interpreted == (DEVICE == "cpu"), f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')} on {DEVICE}"
    return module


def channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE).contiguous(memory_format=torch.channels_last)


def relative_errors(kernels, x, groups, eps=1e-6):
    """Output and gradient errors of group_norm_silu against float64 autograd, for one upstream gradient."""
    c = x.shape[1]
    weight = torch.randn(c, device=DEVICE, requires_grad=True)
    bias = torch.randn(c, device=DEVICE, requires_grad=True)
    x = x.requires_grad_()
    y = kernels.group_norm_silu(x, groups, weight, bias, eps)
    dy = torch.randn_like(y)
    got = (y, *torch.autograd.grad(y, (x, weight, bias), dy))
    exact = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y64 = F.silu(F.group_norm(exact[0], groups, exact[1], exact[2], eps))
    expected = (y64, *torch.autograd.grad(y64, exact, dy.double()))
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert got[1].is_contiguous(memory_format=torch.channels_last)
    return [((g.double() - e).norm() / e.norm()).item() for g, e in zip(got, expected, strict=True)]


@pytest.mark.parametrize(
    "shape, groups",
    [
        ((2, 12, 5, 3), 4),  # 3 channels per group: a group is not a power of 2, and the channel block is padded
        ((3, 64, 4, 4), 32),  # the UNet's 32 groups
        ((1, 24, 17, 9), 2),  # 153 pixels: several pixel blocks (small tiles below), the last one short
    ],
)  # fmt: skip
def test_output_and_gradients_match_autograd_in_float64(kernels, monkeypatch, shape, groups):
    monkeypatch.setattr(kernels, "REDUCTION_TILE", 64)  # small tiles, so reductions combine several blocks
    monkeypatch.setattr(kernels, "POINTWISE_TILE", 64)
    monkeypatch.setattr(kernels, "PARTIALS_PER_STEP", 4)  # and fold their partial sums in steps, the last one short
    torch.manual_seed(0)
    errors = relative_errors(kernels, channels_last(torch.randn(shape) * 2), groups)
    assert max(errors) < 1e-5, errors


def test_statistics_do_not_cancel_when_the_mean_is_large_against_the_spread(kernels, monkeypatch):
    monkeypatch.setattr(kernels, "REDUCTION_TILE", 64)  # several blocks, whose sums add up
    monkeypatch.setattr(kernels, "PARTIALS_PER_STEP", 2)
    torch.manual_seed(0)
    x = channels_last(torch.randn(2, 16, 8, 8) * 0.01 + 300.0)  # mean / std = 3e4: E[x^2] - E[x]^2 loses it all
    mean, rstd = kernels._group_moments(x, 4, eps=0.0)
    groups = x.double().reshape(2, 4, -1)
    torch.testing.assert_close(mean.double(), groups.mean(-1), rtol=1e-7, atol=0)
    torch.testing.assert_close(rstd.double(), groups.var(-1, unbiased=False).rsqrt(), rtol=1e-5, atol=0)


def test_bf16_activations_are_normalised_in_fp32(kernels):
    torch.manual_seed(0)
    x = channels_last(torch.randn(2, 48, 6, 6)).bfloat16()
    output_error, grad_x_error, grad_weight_error, grad_bias_error = relative_errors(kernels, x, 8)
    assert output_error < 8e-3 and grad_x_error < 8e-3  # bf16 rounding of the stored results (2^-8), no more
    assert grad_weight_error < 1e-5 and grad_bias_error < 1e-5  # reductions and parameters in fp32


def test_the_custom_op_is_registered_for_autograd_and_compile(kernels):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and AOT dispatch agree."""
    torch.manual_seed(0)
    x = channels_last(torch.randn(2, 8, 4, 4)).requires_grad_()
    weight = torch.randn(8, device=DEVICE, requires_grad=True)
    bias = torch.randn(8, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.rlft.group_norm_silu.default, (x, weight, bias, 4, 1e-5))


def test_bad_inputs_name_the_fix(kernels, monkeypatch):
    weight, bias = torch.ones(8, device=DEVICE), torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="channels_last"):
        kernels.group_norm_silu(torch.randn(2, 8, 4, 4, device=DEVICE), 4, weight, bias)
    with pytest.raises(ValueError, match="8 channels do not split into 3"):
        kernels.group_norm_silu(channels_last(torch.randn(2, 8, 4, 4)), 3, weight, bias)
    with pytest.raises(ValueError, match=r"shape \(8,\)"):
        kernels.group_norm_silu(channels_last(torch.randn(2, 8, 4, 4)), 4, torch.ones(4, device=DEVICE), bias)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA GPU.*TRITON_INTERPRET=1"):
        kernels.group_norm_silu(torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last), 4,
                                torch.ones(8), torch.zeros(8))  # fmt: skip


def tiny_unet():
    from diffusers import UNet2DModel

    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    return unet, {}


def tiny_conditional_unet():
    """Stable Diffusion's UNet class: its transformer blocks' group norms (no SiLU after them) stay unfused."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2,
    )  # fmt: skip
    return unet, {"encoder_hidden_states": torch.randn(3, 5, 8, device=DEVICE)}


@pytest.mark.parametrize("make_unet", [tiny_unet, tiny_conditional_unet])
def test_a_fused_unet_computes_what_diffusers_computes_with_the_same_parameter_names(kernels, make_unet):
    torch.manual_seed(0)
    unet, context = make_unet()
    unet = unet.to(DEVICE).to(memory_format=torch.channels_last)
    x = channels_last(torch.randn(3, 1, 8, 8))
    timestep = torch.tensor([10, 500, 900], device=DEVICE)
    names = [name for name, _ in unet.named_parameters()]
    expected_output = unet(x, timestep, **context).sample
    expected = torch.autograd.grad(expected_output.square().mean(), list(unet.parameters()))

    resnets = sum(type(m).__name__ == "ResnetBlock2D" for m in unet.modules())
    assert kernels.fuse_norm_silu(unet) == 2 * resnets + 1  # norm1, norm2 of every resnet block, and the output norm
    assert [name for name, _ in unet.named_parameters()] == names
    output = unet(x, timestep, **context).sample
    gradients = torch.autograd.grad(output.square().mean(), list(unet.parameters()))
    torch.testing.assert_close(output, expected_output, rtol=1e-4, atol=1e-5)
    for name, got, want in zip(names, gradients, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
