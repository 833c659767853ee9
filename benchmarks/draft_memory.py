"""Peak memory and time per DRaFT update against K, with and without gradient checkpointing, on the digits model.

    python benchmarks/draft_memory.py                       # K = 1, 2, 5, all (10 steps), batch 32, CPU
    python benchmarks/draft_memory.py --ks 1 10 --batch 64  # other settings

Each configuration runs in a fresh subprocess, so its peak resident memory (getrusage ru_maxrss; on CUDA,
torch.cuda.max_memory_allocated) belongs to that configuration alone. The table shows the peak during the updates,
the extra memory the updates needed over the process's peak before them (model, data, a no-grad sampling pass), and
the median wall and process CPU time per optimizer step (on shared cores the CPU time is the steadier of the two:
with one thread it counts this process's work, not its waiting). Writes benchmarks/results/draft_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(k: int, checkpointing: bool, batch: int, steps: int, threads: int, device_name: str) -> dict:
    import torch

    from rlft.algorithms import draft
    from rlft.config import compose
    from rlft.learner import Learner

    cfg = compose([
        "algo=draft", f"algo.k={k}", f"policy.gradient_checkpointing={checkpointing}", f"device={device_name}",
        f"trainer.rollout_batch_size={batch}", f"ray.rollout_threads={threads}", f"ray.learner_threads={threads}",
        "logging.wandb=disabled",
    ])  # fmt: skip
    device = torch.device(device_name)
    learner = Learner(cfg, device)
    ctx, algo = learner.ctx, learner.algo
    with torch.no_grad():  # a no-grad pass first, so the baseline peak includes sampling's own buffers
        obs, _ = ctx.env.reset(seed=0)
        draft.sample(ctx, obs["x_t"], obs["context"], None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    before = peak_mb(device)
    times, cpu_times = [], []
    for _ in range(steps + 1):  # the first step is a warm-up (optimizer state, allocator)
        start, cpu_start = time.perf_counter(), time.process_time()
        draft.train_step(ctx, algo, learner.state)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = peak_mb(device)
    return {"k": k, "checkpointing": checkpointing, "peak_mb": peak, "baseline_mb": before,
            "update_mb": peak - before, "step_s": statistics.median(times[1:]),
            "cpu_s": statistics.median(cpu_times[1:])}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10], help="K values (10 = all steps here)")
    parser.add_argument("--batch", type=int, default=32, help="samples per optimizer step")
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per configuration")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=2, metavar=("K", "CHECKPOINTING"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "draft_memory.json"))
    args = parser.parse_args()
    if args.child:
        k, checkpointing = int(args.child[0]), args.child[1] == "1"
        print(json.dumps(child(k, checkpointing, args.batch, args.steps, args.threads, args.device)))
        return

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for k in args.ks:
        for checkpointing in (False, True):
            command = [sys.executable, __file__, "--child", str(k), "1" if checkpointing else "0",
                       "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads),
                       "--device", args.device]  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
            if result.returncode:
                raise SystemExit(f"configuration K={k} checkpointing={checkpointing} failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"  K={k:<3} checkpointing={checkpointing!s:<6} {row['update_mb']:8.1f} MB  {row['cpu_s']:.2f} cpu s",
                  file=sys.stderr, flush=True)  # fmt: skip

    print(f"\nDRaFT update on the digits model: batch {args.batch}, 10 DDIM steps, {args.device}, "
          f"{args.threads} thread(s); median of {args.steps} steps after a warm-up")  # fmt: skip
    print(f"{'K':>4}{'checkpointing':>15}{'peak MB':>10}{'update MB':>11}{'wall s/step':>13}{'cpu s/step':>12}")
    for row in rows:
        print(f"{row['k']:>4}{row['checkpointing']!s:>15}{row['peak_mb']:>10.1f}{row['update_mb']:>11.1f}"
              f"{row['step_s']:>13.2f}{row['cpu_s']:>12.2f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    out.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
