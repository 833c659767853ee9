"""One DDPO epoch on the google/ddpm-celebahq-256 architecture (random weights): a plain research loop against
rlft's fast path, side by side in one run.

    python benchmarks/gpu_ddpo_epoch.py           # on a GPU: the full comparison (~5 min on an H100, compiles included)
    python benchmarks/gpu_ddpo_epoch.py --tiny    # CPU smoke test of the same code on a tiny UNet (CI runs this)

An epoch = sample N trajectories of 50 DDIM steps (eta 1, with log-probabilities), then one DDPO pass training on
every stochastic step of every trajectory (forward + backward per step, one optimizer step per minibatch). Both
arms run rlft's own `DiffusionPolicy.step` and `rlft.algorithms.ddpo.train_step`; they differ only in the fast path:

    plain: fp32 eager, sampling and training batches of 16 (as the published research loops run)
    rlft:  bf16 autocast (fp32 log-probabilities), channels_last, torch.compile, cuDNN autotuning,
           sampling batches of 96, and 7 timesteps of each trajectory stacked into one training call
           (algo.timesteps_per_forward: the same gradient as one call per timestep) on minibatches of 4,
           so every network call in training sees 28 samples
    rlft+fused (GPU only): rlft with policy.fused_norm_silu (group norm + SiLU through rlft/kernels/group_norm_silu.py)

`--arms` picks the arms and their order (default: plain and rlft+fused on a GPU, plain and rlft on CPU); each runs
after the last, so they never share the card.

Reported per arm: samples/s for the whole epoch, sampling and training throughput, peak GPU memory, and the
fraction of the card's bf16 matmul peak (measured in the same run) that the FLOPs counted by torch's
FlopCounterMode represent (MFU). On a GPU, a profile of one sampling call and one training call of each arm
then says where the time goes: GPU kernel time by kind (convolutions, attention, fused elementwise/norm kernels,
...) and the share of wall time with no kernel running. JSON goes to benchmarks/results/gpu_ddpo_epoch.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from tensordict import TensorDict

from rlft.algorithms import LearnerContext, ddpo
from rlft.core.schedule import DDIMSchedule
from rlft.policy import DiffusionPolicy

CELEBAHQ_UNET = dict(  # shared/reference/performance.md: 113.7 M parameters, ~497 GFLOP per forward per sample
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
    norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
    time_embedding_type="positional",
)  # fmt: skip
TINY_UNET = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
)  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(unet_config: dict, device: torch.device) -> float:
    """FLOPs of one forward pass for one sample (FlopCounterMode: 1 multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DModel(**unet_config).to(device)
    x = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500], device=device))
    return float(counter.get_total_flops())


def bf16_matmul_peak(device: torch.device, seconds: float = 3.0) -> float:
    """The card's achievable bf16 dense matmul FLOP/s, measured now (8192^3 products back to back)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            a @ b
        sync(device)
        count += 20
    return 2 * n**3 * count / (time.perf_counter() - start)


def make_policy(unet_config: dict, steps: int, device: torch.device, fast: bool, probe_batch: int = 0,
                inductor_options: dict | None = None, fused_norm_silu: bool = False) -> tuple[DiffusionPolicy, dict]:
    """The policy of one arm, and (rlft's arm on a GPU) what its compile reported."""
    torch.manual_seed(0)  # both arms start from the same random weights
    unet = UNet2DModel(**unet_config).to(device)
    schedule = DDIMSchedule.from_scheduler_config(DDPMScheduler(num_train_timesteps=1000).config, steps, eta=1.0)
    policy = DiffusionPolicy(unet, schedule.to(device), autocast_dtype=torch.bfloat16 if fast else None)
    if fast:
        policy.use_channels_last()
    if fast and device.type == "cuda":
        # checked against eager (output and gradients) on a batch of the training call's shape, so no extra compile
        c, size = unet_config["in_channels"], unet_config["sample_size"]
        timestep = policy.schedule.timesteps[:1].expand(probe_batch)
        x_t = torch.randn(probe_batch, c, size, size, device=device)
        try:
            policy.compile_network((x_t, timestep, torch.zeros(probe_batch, 0, device=device)), check_gradients=True,
                                   inductor_options=inductor_options, fused_norm_silu=fused_norm_silu)  # fmt: skip
            check = "passed"
        except RuntimeError as error:  # the network is compiled either way: time it, and say the check failed
            check = f"FAILED: {error}"
        layout_pass = policy.backward_layout_pass
        report = {"compile_check": check, "inductor_options": inductor_options,
                  "nhwc_backward_arguments": layout_pass and layout_pass.restrided_arguments,
                  "fused_norm_silu": policy.fused_norm_silu_count}  # fmt: skip
        print(f"  compile check against eager: {check}; convolution-backward arguments made NHWC: "
              f"{report['nhwc_backward_arguments']}; group norms fused with their SiLU: {report['fused_norm_silu']}",
              flush=True)  # fmt: skip
        return policy, report
    return policy, {}


@torch.no_grad()
def sample(policy: DiffusionPolicy, n: int, generator: torch.Generator, device: torch.device) -> TensorDict:
    """n trajectories with log-probabilities, a stand-in reward (mean brightness) and batch-standardised advantages."""
    cfg = policy.unet.config
    x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=generator, device=device)
    context = torch.zeros(n, 0, device=device)
    latents, log_probs = [x], []
    for k in range(policy.schedule.num_steps):
        noise = torch.randn(x.shape, generator=generator, device=device)
        out = policy.step(x, k, context, noise=noise)
        x = out.prev_sample
        latents.append(x)
        log_probs.append(out.log_prob)
    reward = x.mean(dim=(1, 2, 3))
    return TensorDict(
        {
            "latents": torch.stack(latents, dim=1),  # [n, T+1, C, H, W]
            "log_prob": torch.stack(log_probs, dim=1),  # [n, T]
            "context": context,  # [n, 0]
            "advantage": (reward - reward.mean()) / (reward.std() + 1e-6),  # [n]
        },
        batch_size=[n],
        device=device,
    )


KERNEL_KINDS = (  # GPU kernel name fragments -> kind, first match wins
    ("group norm + SiLU (rlft)", ("_channel_moments", "_group_statistics", "_scale_shift_silu", "_channel_sums",
                                  "_input_grad")),  # fmt: skip
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("convolution", ("conv", "cudnn", "xmma", "implicit", "dgrad", "wgrad", "fprop", "nchw", "nhwc")),
    ("matmul", ("gemm", "cutlass", "cublas", "sm90", "sm80")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused elementwise/norm (triton)", ("triton",)),
    ("elementwise/norm (eager)", ("norm", "elementwise", "vectorized", "reduce", "silu", "copy", "fill")),
)


TOP_KERNELS = 15  # kernels listed by name in each profile


def kernel_breakdown(name: str, work, device: torch.device) -> dict:
    """GPU kernel time by kind during `work()` (run after warm-up), as shares of its wall time, plus the share
    of wall time with no kernel running."""
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        work()
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    kernels.sort(key=lambda e: -e.self_device_time_total)
    by_kind: dict[str, float] = {}
    for event in kernels:
        lowered = event.key.lower()
        kind = next((k for k, fragments in KERNEL_KINDS if any(f in lowered for f in fragments)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + event.self_device_time_total
    shares = {kind: us / wall_us for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    shares["gpu idle"] = max(0.0, 1 - sum(by_kind.values()) / wall_us)
    top = [(e.key[:100], e.self_device_time_total / wall_us, e.count) for e in kernels[:TOP_KERNELS]]
    print(f"  {name}: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()), flush=True)
    for kernel, share, count in top:
        print(f"      {100 * share:5.1f}%  x{count:<5} {kernel}", flush=True)
    return {"wall_ms": wall_us / 1e3, "shares": shares, "top_kernels": top}  # wall: with the profiler's overhead


def run_arm(name: str, policy: DiffusionPolicy, samples: int, sample_batch: int, train_batch: int,
            device: torch.device, flops_per_forward: float, peak: float | None,
            timesteps_per_forward: int = 1) -> tuple[dict, dict]:  # fmt: skip
    """The arm's epoch timings, and its sampling and training calls (to profile after the timings are saved)."""
    # kl_weight=0: the plain loop it is measured against is DDPO's update without the KL to a reference model
    cfg = ddpo.Config(minibatch_size=train_batch, timesteps_per_forward=timesteps_per_forward, kl_weight=0.0)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5, fused=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    ctx = LearnerContext(policy, policy, optimizer, None, None, torch.Generator().manual_seed(0), device)
    trained_steps = len(policy.schedule.stochastic_steps)
    # exactly one training call's worth of timesteps, for the warm-up and the profile
    one_call = ddpo.Config(timestep_fraction=timesteps_per_forward / trained_steps,
                           timesteps_per_forward=timesteps_per_forward, kl_weight=0.0)  # fmt: skip

    # warm-up (compilation, cuDNN autotuning): one sampling batch, one training step of one call
    warm = sample(policy, sample_batch, generator, device)
    ddpo.train_step(ctx, warm[:train_batch], one_call)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    start = time.perf_counter()
    batches = [sample(policy, sample_batch, generator, device) for _ in range(samples // sample_batch)]
    sync(device)
    sampled = time.perf_counter()
    epoch = torch.cat(batches)
    for minibatch in epoch.split(train_batch):
        ddpo.train_step(ctx, minibatch, cfg)
    sync(device)
    trained = time.perf_counter()

    steps = policy.schedule.num_steps
    sampling_s, training_s = sampled - start, trained - sampled
    flops = samples * (steps + 3 * trained_steps) * flops_per_forward  # backward ~ 2 forwards
    result = {
        "samples": samples, "sample_batch": sample_batch, "train_batch": train_batch,
        "sampling_s": sampling_s, "training_s": training_s,
        "samples_per_s": samples / (sampling_s + training_s),
        "sampling_samples_per_s": samples / sampling_s,
        "training_sample_steps_per_s": samples * trained_steps / training_s,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "tflops_per_s": flops / (sampling_s + training_s) / 1e12,
        "mfu": flops / (sampling_s + training_s) / peak if peak else None,
        "sampling_mfu": samples * steps * flops_per_forward / sampling_s / peak if peak else None,
        "training_mfu": samples * 3 * trained_steps * flops_per_forward / training_s / peak if peak else None,
    }  # fmt: skip
    rate = result["samples_per_s"]
    print(f"  {name}: {rate:.3f} samples/s (sampling {sampling_s:.1f} s, training {training_s:.1f} s)", flush=True)
    calls = {"sampling_call_time": lambda: sample(policy, sample_batch, generator, device),
             "training_call_time": lambda: ddpo.train_step(ctx, epoch[:train_batch], one_call)}  # fmt: skip
    return result, calls


ARMS = ("plain", "rlft", "rlft+fused")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny UNet, 5 steps: a CPU smoke test of this script")
    parser.add_argument("--plain-samples", type=int, default=16, help="trajectories in the plain arm's epoch")
    parser.add_argument("--rlft-samples", type=int, default=96, help="trajectories in rlft's epoch")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps per trajectory")
    parser.add_argument("--rlft-sample-batch", type=int, default=96, help="rlft's sampling batch")
    parser.add_argument("--rlft-train-batch", type=int, default=4, help="rlft's training minibatch (trajectories)")
    parser.add_argument("--rlft-stack", type=int, default=7,
                        help="rlft's timesteps per training call (a divisor of the trained steps: one shape)")
    parser.add_argument("--inductor-options", type=json.loads, default=None,
                        help="""extra inductor options for rlft's compile, as JSON, e.g. '{"max_autotune": true}'""")
    parser.add_argument("--arms", nargs="+", choices=ARMS,
                        help="arms to run, in this order (default: plain rlft+fused on a GPU, plain rlft on CPU)")
    parser.add_argument("--out", default="benchmarks/results/gpu_ddpo_epoch.json", help="where the JSON goes")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.arms is None:
        args.arms = ["plain", "rlft+fused" if device.type == "cuda" else "rlft"]
    if "rlft+fused" in args.arms and device.type != "cuda":
        parser.error("the rlft+fused arm runs Triton GPU kernels in the compiled network: it needs a GPU")
    unet_config, steps = (TINY_UNET, 5) if args.tiny else (CELEBAHQ_UNET, args.steps)
    plain_samples, rlft_samples = (8, 8) if args.tiny else (args.plain_samples, args.rlft_samples)
    plain_batches = (4, 4) if args.tiny else (16, 16)
    rlft_batches = (8, 4) if args.tiny else (args.rlft_sample_batch, args.rlft_train_batch)
    rlft_stack = 2 if args.tiny else args.rlft_stack

    flops_per_forward = forward_flops(unet_config, device)
    peak = bf16_matmul_peak(device) if device.type == "cuda" else None
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{card}: forward {flops_per_forward / 1e9:.1f} GFLOP/sample"
          + (f", measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {"device": card, "steps": steps, "forward_gflop": flops_per_forward / 1e9,
              "bf16_peak_tflops": peak / 1e12 if peak else None}  # fmt: skip
    results = {}
    for name in args.arms:
        start = time.perf_counter()
        # rlft's shapes are fixed, so cuDNN may autotune; the plain loop runs cuDNN's defaults, as published code does
        torch.backends.cudnn.benchmark = name != "plain" and device.type == "cuda"
        if name == "plain":
            policy, report = make_policy(unet_config, steps, device, fast=False)
            results[name], calls = run_arm(name, policy, plain_samples, *plain_batches, device, flops_per_forward,
                                           peak)  # fmt: skip
        else:
            probe_batch = rlft_batches[1] * rlft_stack  # the training call's batch
            policy, report = make_policy(unet_config, steps, device, fast=True, probe_batch=probe_batch,
                                         inductor_options=args.inductor_options, fused_norm_silu=name == "rlft+fused")
            results[name], calls = run_arm(name, policy, rlft_samples, *rlft_batches, device, flops_per_forward,
                                           peak, rlft_stack)  # fmt: skip
        results[name]["warmup_and_epoch_s"] = time.perf_counter() - start
        results[name].update(report)
        out.write_text(json.dumps({**header, "results": results}, indent=2))  # kept if a profile or later arm fails
        if device.type == "cuda":
            for key, work in calls.items():
                results[name][key] = kernel_breakdown(f"{name} {key.removesuffix('_time').replace('_', ' ')}", work,
                                                      device)  # fmt: skip
            out.write_text(json.dumps({**header, "results": results}, indent=2))
        del calls, policy
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ratios = {f"{a} / {b}": results[a]["samples_per_s"] / results[b]["samples_per_s"]
              for a, b in (("rlft", "plain"), ("rlft+fused", "plain"), ("rlft+fused", "rlft"))
              if a in results and b in results}  # fmt: skip

    print(f"\nDDPO epoch, {steps} DDIM steps, training on every stochastic step ({card})")
    print(f"{'arm':<11}{'samples/s':>10}{'sampling/s':>11}{'train steps/s':>14}{'peak GiB':>9}{'MFU':>7}"
          f"{'samp MFU':>9}{'train MFU':>10}")  # fmt: skip
    for arm, r in results.items():
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        mfus = [f"{100 * r[k]:.0f}%" if r[k] is not None else "-" for k in ("mfu", "sampling_mfu", "training_mfu")]
        print(f"{arm:<11}{r['samples_per_s']:>10.3f}{r['sampling_samples_per_s']:>11.2f}"
              f"{r['training_sample_steps_per_s']:>14.1f}{mem:>9}{mfus[0]:>7}{mfus[1]:>9}{mfus[2]:>10}")  # fmt: skip
    for ratio, value in ratios.items():
        print(f"{ratio}: {value:.2f}x samples/s")
    out.write_text(json.dumps({**header, "results": results, "speedups": ratios}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
