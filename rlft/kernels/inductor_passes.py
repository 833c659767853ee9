"""A graph pass for torch.compile's inductor backend (`DiffusionPolicy.compile_network` installs it)."""

from __future__ import annotations

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class NHWCConvolutionBackward(CustomGraphPass):
    """An inductor post-grad pass: every convolution backward with an NHWC weight gets its gradient and input NHWC.

    Why: inductor lays a graph out NHWC by its forward convolutions (layout optimization), but a backward graph holds
    only `convolution_backward`, whose arguments keep the strides recorded when autograd was traced, and those follow
    eager semantics, where group norm and its backward produce NCHW. So cuDNN got NCHW gradients next to NHWC weights,
    and each backward call copied its gradient to NHWC, once for the input gradient and once for the weight gradient:
    on an H200 those copies were 26% of a DDPO training call. Re-striding the recorded value of an argument makes
    inductor write it NHWC in the kernel that produces it, so no copy is left; a saved activation (a graph input)
    keeps the layout the forward graph gave it. Torch 2.11's fallback for convolution backward reads these strides;
    torch 2.13 lowers it itself and asks for NHWC when the graph's layout decision is forced, which compile_network
    also does."""

    def __init__(self) -> None:
        self.restrided_arguments = 0  # convolution-backward arguments re-strided to NHWC, over all graphs compiled

    def __call__(self, graph: torch.fx.Graph) -> None:
        nhwc = torch.channels_last
        for node in graph.find_nodes(op="call_function", target=torch.ops.aten.convolution_backward.default):
            weight = node.args[2].meta.get("val")
            if weight is None or weight.dim() != 4 or not weight.is_contiguous(memory_format=nhwc):
                continue
            for argument in node.args[:2]:  # grad_output, input
                value = argument.meta.get("val")
                if argument.op == "placeholder" or value is None or value.is_contiguous(memory_format=nhwc):
                    continue
                with value.fake_mode:
                    argument.meta["val"] = torch.empty_like(value, memory_format=nhwc)
                self.restrided_arguments += 1

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))  # inductor's cache key: a changed pass recompiles
