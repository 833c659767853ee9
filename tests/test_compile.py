"""policy.compile: the compiled network is checked against eager before anything uses it (compile_network)."""

import pytest
import torch
import torch._inductor.config

from rlft.rollout import build_policy
from tests.helpers import tiny_cfg

CPU = torch.device("cpu")


def output_and_gradients(policy, observation) -> list[torch.Tensor]:
    output = policy.base_forward(observation["x_t"], observation["timestep"], observation["context"])
    params = [p for p in policy.parameters() if p.requires_grad]
    return [output.detach(), *torch.autograd.grad((output**2).mean(), params)]


@pytest.fixture(scope="module")
def one_level_model_dir(tmp_path_factory):
    """A UNet2DModel without down/upsamplers: torch 2.13's inductor on CPU drops the gradient behind a nearest
    upsampler (the check refuses those networks, as it should), so the passing case uses a network without one."""
    from diffusers import DDPMScheduler, UNet2DModel

    path = tmp_path_factory.mktemp("one_level_ddpm")
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8,),
                down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4,
                add_attention=False).save_pretrained(path)  # fmt: skip
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(path)
    return path


def test_an_inductor_compiled_network_passes_the_check_and_trains_like_eager(one_level_model_dir):
    torch._dynamo.reset()
    compiled, env, _ = build_policy(tiny_cfg(one_level_model_dir, "policy.compile=true"), CPU)  # raises on a mismatch
    eager, _, _ = build_policy(tiny_cfg(one_level_model_dir), CPU)
    observation, _ = env.reset(seed=123)  # another batch than the check's, same shape (no recompilation)
    for got, expected in zip(output_and_gradients(compiled, observation), output_and_gradients(eager, observation),
                             strict=True):  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_an_nhwc_network_compiles_with_nhwc_convolution_backward_and_trains_like_eager(tiny_model_dir):
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):  # a cached graph would skip the pass
        nhwc = tiny_cfg(tiny_model_dir, "policy.compile=true", "policy.channels_last=true")
        compiled, env, _ = build_policy(nhwc, CPU)
    eager, _, _ = build_policy(tiny_cfg(tiny_model_dir), CPU)
    assert compiled.backward_layout_pass.restrided_arguments > 0  # this network's backward had NCHW arguments
    observation, _ = env.reset(seed=123)
    for got, expected in zip(output_and_gradients(compiled, observation), output_and_gradients(eager, observation),
                             strict=True):  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_group_norm_silu_fused_into_the_compiled_network_passes_the_check(one_level_model_dir):
    """policy.fused_norm_silu: rlft's Triton kernels (on CPU through Triton's interpreter, see tests/conftest.py) as
    custom ops inside the inductor graph, checked by compile_network against the unfused eager network (output and
    gradients; tests/test_group_norm_silu.py compares the kernels with autograd to float64 precision)."""
    torch._dynamo.reset()
    overrides = ("policy.compile=true", "policy.channels_last=true", "policy.fused_norm_silu=true")
    compiled, _, _ = build_policy(tiny_cfg(one_level_model_dir, *overrides), CPU)  # raises on a mismatch
    resnets = sum(type(m).__name__ == "FusedResnetBlock2D" for m in compiled.unet.modules())
    assert resnets > 0 and compiled.fused_norm_silu_count == 2 * resnets + 1


def test_the_backward_layout_pass_restrides_computed_arguments_next_to_nhwc_weights_only():
    from torch.fx.experimental.proxy_tensor import make_fx

    from rlft.kernels.inductor_passes import NHWCConvolutionBackward

    def backward(grad, x, weight):  # grad is computed in the graph; x stands for a saved activation (an input)
        return torch.ops.aten.convolution_backward.default(
            grad * 2, x, weight, [4], [1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True])

    nhwc = torch.channels_last
    x = torch.randn(2, 3, 8, 8)
    grad = torch.randn(2, 4, 8, 8)
    nchw_weight = torch.randn(4, 3, 3, 3)
    for weight, restrided in ((nchw_weight.contiguous(memory_format=nhwc), 1), (nchw_weight, 0)):
        graph = make_fx(backward, tracing_mode="fake")(grad, x, weight).graph
        layout_pass = NHWCConvolutionBackward()
        layout_pass(graph)
        assert layout_pass.restrided_arguments == restrided
        (node,) = graph.find_nodes(op="call_function", target=torch.ops.aten.convolution_backward.default)
        grad_value, x_value = (argument.meta["val"] for argument in node.args[:2])
        assert grad_value.is_contiguous(memory_format=nhwc) == bool(restrided)
        assert grad_value.shape == grad.shape
        assert not x_value.is_contiguous(memory_format=nhwc)  # a graph input keeps its strides


def _zero_one_gradient(policy):
    policy.unet.conv_out.weight.register_hook(torch.zeros_like)


def _shift_the_output(policy):
    policy.unet.conv_out.register_forward_hook(lambda module, args, output: output + 1)


@pytest.mark.parametrize(
    ("miscompile", "check_gradients", "named"),
    [(_zero_one_gradient, True, r"unet\.conv_out\.weight"), (_shift_the_output, False, "output")],
)
def test_a_compile_that_changes_results_is_refused_naming_the_tensor_and_the_fix(
    tiny_model_dir, monkeypatch, miscompile, check_gradients, named
):
    policy, env, _ = build_policy(tiny_cfg(tiny_model_dir), CPU)
    monkeypatch.setattr(policy.unet, "compile", lambda **options: miscompile(policy))  # stands in for a bad backend
    observation, _ = env.reset(seed=0)
    probe = (observation["x_t"], observation["timestep"], observation["context"])
    expected = rf"1 of \d+ tensors differ, worst {named} \(relative error .*policy\.compile=false"
    with pytest.raises(RuntimeError, match=expected):
        policy.compile_network(probe, check_gradients)
