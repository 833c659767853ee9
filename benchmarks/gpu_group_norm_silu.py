"""Group norm + SiLU on the celebahq-256 UNet's activations: inductor's compiled kernels against rlft's Triton kernels
(`rlft/kernels/group_norm_silu.py`) and against the memory floor, side by side in one run.

    python benchmarks/gpu_group_norm_silu.py          # on a GPU (~2-3 min, compiles included)
    python benchmarks/gpu_group_norm_silu.py --tiny   # CPU smoke test: the Triton interpreter, eager reference

Why: these kernels are 47% of the GPU time of a compiled DDPO training call (benchmarks/gpu_ddpo_epoch.py on an
H100). Each case is one activation shape of the UNet's group norms that a SiLU follows (resnet blocks and the output
norm) at the training call's batch, x in bf16 and NHWC as the fast path runs them:

    eager:    silu(group_norm(x.float())).to(bf16), PyTorch's own kernels, forward and forward + backward
    inductor: torch.compile of the same (GPU only), as the compiled network runs it without rlft's kernels
    rlft:     rlft.kernels.group_norm_silu (4 Triton kernels and small [N, C] tensors in between)
    floor:    the bytes each pass must move (forward: read x, write y; + backward: read x and dy, write dx) at the
              device-to-device copy bandwidth measured in the same run

Cases are the shapes covering --coverage of the UNet's group-norm elements, largest first; totals weight each
shape by its number of call sites. JSON goes to benchmarks/results/gpu_group_norm_silu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

if "--tiny" in sys.argv:  # CPU: the Triton interpreter, which must be chosen before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_ddpo_epoch import CELEBAHQ_UNET, TINY_UNET, sync  # noqa: E402

FORWARD_BYTES_PER_ELEMENT = 4  # bf16: read x, write y
TRAINING_BYTES_PER_ELEMENT = 10  # the forward's, and the backward's read x, read dy, write dx


def norm_silu_shapes(unet_config: dict) -> Counter:
    """(channels, height, width, groups, eps) of every group norm that a SiLU follows, with its number of call sites.

    Attention blocks' group norms (3-D inputs, no SiLU after them) are left out."""
    unet = UNet2DModel(**unet_config)
    shapes: Counter = Counter()

    def record(module, inputs, _output):
        if inputs[0].dim() == 4:
            _, c, h, w = inputs[0].shape
            shapes[(c, h, w, module.num_groups, module.eps)] += 1

    for module in unet.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_hook(record)
    size = unet_config["sample_size"]
    with torch.no_grad():
        unet(torch.randn(1, unet_config["in_channels"], size, size), torch.tensor([500]))
    return shapes


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """What the network computes under bf16 autocast: group norm in fp32, then SiLU, back to x's dtype."""
    return F.silu(F.group_norm(x.float(), groups, weight, bias, eps)).to(x.dtype)


def median_ms(work, device: torch.device, reps: int) -> float:
    for _ in range(2):
        work()
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, elements: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), on a bf16 tensor of `elements`."""
    source = torch.randn(elements, device=device).bfloat16()
    target = torch.empty_like(source)
    ms = median_ms(lambda: target.copy_(source), device, reps=20)
    return 2 * source.numel() * source.element_size() / (ms / 1e3)


def time_arm(norm_silu, x, weight, bias, dy, device, reps) -> dict:
    def training():
        y = norm_silu(x, weight, bias)
        torch.autograd.grad(y, (x, weight, bias), dy)

    with torch.no_grad():
        forward_ms = median_ms(lambda: norm_silu(x, weight, bias), device, reps)
    return {"forward_ms": forward_ms, "training_ms": median_ms(training, device, reps)}


def errors(norm_silu, x, weight, bias, dy, groups, eps) -> dict:
    """Relative errors of the output and the three gradients against fp32 eager on the same bf16 input."""
    y = norm_silu(x, weight, bias)
    got = (y, *torch.autograd.grad(y, (x, weight, bias), dy))
    exact_x = x.detach().float().requires_grad_()
    y32 = F.silu(F.group_norm(exact_x, groups, weight, bias, eps))
    expected = (y32, *torch.autograd.grad(y32, (exact_x, weight, bias), dy.float()))
    names = ("output", "grad_x", "grad_weight", "grad_bias")
    return {n: ((a.float() - e).norm() / e.norm()).item() for n, a, e in zip(names, got, expected, strict=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny UNet on CPU through the Triton interpreter")
    parser.add_argument("--batch", type=int, default=28, help="samples per call (the DDPO training call's 4 x 7)")
    parser.add_argument("--coverage", type=float, default=0.95,
                        help="time the largest shapes that hold this fraction of all group-norm elements")
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions per arm and pass (median kept)")
    parser.add_argument("--out", default="benchmarks/results/gpu_group_norm_silu.json", help="where the JSON goes")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    from rlft.kernels.group_norm_silu import group_norm_silu

    unet_config, batch, reps = (TINY_UNET, 2, 2) if args.tiny else (CELEBAHQ_UNET, args.batch, args.reps)
    shapes = norm_silu_shapes(unet_config)
    elements = {shape: batch * shape[0] * shape[1] * shape[2] for shape in shapes}
    total_elements = sum(elements[s] * k for s, k in shapes.items())
    cases, covered = [], 0
    for shape in sorted(shapes, key=lambda s: -elements[s] * shapes[s]):
        if covered >= args.coverage * total_elements:
            break
        cases.append(shape)
        covered += elements[shape] * shapes[shape]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    bandwidth = copy_bandwidth(device, max(elements.values()))
    print(f"{card}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; {len(cases)} of {len(shapes)} shapes, "
          f"{100 * covered / total_elements:.1f}% of the {total_elements:,} group-norm elements per call", flush=True)

    rows = []
    for c, h, w, groups, eps in cases:
        torch.manual_seed(0)
        x = torch.randn(batch, c, h, w, device=device).bfloat16().contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        weight = (1 + 0.1 * torch.randn(c, device=device)).requires_grad_()
        bias = (0.1 * torch.randn(c, device=device)).requires_grad_()
        dy = torch.randn_like(x)

        def eager(x, weight, bias, groups=groups, eps=eps):
            return reference(x, weight, bias, groups, eps)

        def rlft(x, weight, bias, groups=groups, eps=eps):
            return group_norm_silu(x, groups, weight, bias, eps)

        arms = {"eager": eager, "rlft": rlft}
        if device.type == "cuda":  # inductor's Triton kernels, as in the compiled network
            torch._dynamo.reset()  # a fresh compile per shape: past dynamo's recompile limit, it would run eager
            arms = {"eager": eager, "inductor": torch.compile(eager, dynamic=False), "rlft": rlft}
        n_elements = elements[(c, h, w, groups, eps)]
        row = {
            "shape": [batch, c, h, w], "groups": groups, "call_sites": shapes[(c, h, w, groups, eps)],
            "times": {name: time_arm(arm, x, weight, bias, dy, device, reps) for name, arm in arms.items()},
            "errors": {name: errors(arm, x, weight, bias, dy, groups, eps) for name, arm in arms.items()},
        }  # fmt: skip
        row["times"]["floor"] = {"forward_ms": FORWARD_BYTES_PER_ELEMENT * n_elements / bandwidth * 1e3,
                                 "training_ms": TRAINING_BYTES_PER_ELEMENT * n_elements / bandwidth * 1e3}  # fmt: skip
        rows.append(row)
        print(f"  {batch}x{c}x{h}x{w} (x{row['call_sites']}), training: "
              + ", ".join(f"{name} {t['training_ms']:.3f} ms" for name, t in row["times"].items())
              + f"; rlft grad_x error {row['errors']['rlft']['grad_x']:.1e}", flush=True)  # fmt: skip

    columns = list(rows[0]["times"])
    totals = {name: {key: sum(row["times"][name][key] * row["call_sites"] for row in rows)
                     for key in ("forward_ms", "training_ms")} for name in columns}  # fmt: skip
    print(f"\ngroup norm + SiLU, batch {batch}, bf16 NHWC ({card}): ms per call site; total over all call sites")
    for key, label in (("forward_ms", "forward"), ("training_ms", "forward + backward")):
        print(f"{label:>20}{'sites':>6}" + "".join(f"{name:>10}" for name in columns))
        for row in rows:
            print(f"{'x'.join(map(str, row['shape'])):>20}{row['call_sites']:>6}"
                  + "".join(f"{row['times'][name][key]:>10.3f}" for name in columns))  # fmt: skip
        print(f"{'total':>20}{sum(r['call_sites'] for r in rows):>6}"
              + "".join(f"{totals[name][key]:>10.2f}" for name in columns))  # fmt: skip
    speedups = {name: totals[name]["training_ms"] / totals["rlft"]["training_ms"]
                for name in columns if name not in ("rlft", "floor")}  # fmt: skip
    print("rlft's training speed-up over " + ", ".join(f"{name}: {v:.2f}x" for name, v in speedups.items()))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": card, "torch": torch.__version__, "copy_bandwidth_gb_s": bandwidth / 1e9, "batch": batch,
        "coverage": covered / total_elements, "cases": rows, "totals": totals, "training_speedup_of_rlft": speedups,
    }, indent=2))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
