"""DDPO epochs on the digits default: the Ray pipeline against a single-process loop doing the same work.

    python benchmarks/ddpo_pipeline.py [--epochs 8] [key=value ...]

All arms run the same learner and rollout code on the same config and seeds:

    plain     one process, no Ray: rollout workers as objects, one learner using every core
    ray       Ray: rollout actors, one Ray Train learner using every core, weights through the object store
    ray_ddp   Ray with one learner per core (DDP, one thread each); each takes algo.minibatch_size / learners
              trajectories per step, so every optimizer step sees as many trajectories as in the other arms, and
              DDPO standardises advantages over all learners' rewards: the same work, split across processes

The table gives the median steady-state epoch time (the first epoch is warm-up), throughput, and each Ray arm's
ratio to the plain loop, plus the end-to-end wall time including Ray's start-up. Results go to
benchmarks/results/ddpo_pipeline.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
# the same OpenMP spin setting as the Ray workers get (rlft/pipeline.py), so both arms run alike
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from rlft.config import compose, validate  # noqa: E402


def measure(cfg, use_ray: bool) -> dict:
    from rlft.pipeline import run_local, run_with_ray

    epochs: list[dict] = []

    def report(kind: str, payload: dict) -> None:
        if kind == "metrics":
            epochs.append(payload)

    start = time.perf_counter()
    if use_ray:
        import tempfile

        with tempfile.TemporaryDirectory() as run_dir:
            run_with_ray(cfg, report, Path(run_dir))
    else:
        run_local(cfg, report)
    wall = time.perf_counter() - start
    steady = [m["perf/epoch_s"] for m in epochs[1:]] or [epochs[0]["perf/epoch_s"]]
    epoch_s = statistics.median(steady)
    return {
        "epoch_s_median": epoch_s,
        "samples_per_s": cfg.trainer.samples_per_epoch / epoch_s,
        "collect_s_median": statistics.median(m["perf/collect_s"] for m in epochs[1:] or epochs),
        "update_s_median": statistics.median(m["perf/update_s"] for m in epochs[1:] or epochs),
        "update_preemptions_median": statistics.median(m["perf/update_preemptions"] for m in epochs[1:] or epochs),
        "wall_s": wall,
        "epochs": len(epochs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8, help="epochs per arm (the first is warm-up)")
    parser.add_argument("--out", default="benchmarks/results/ddpo_pipeline.json", help="where the JSON goes")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for python -m rlft.run")
    args = parser.parse_args()
    overrides = [f"trainer.epochs={args.epochs}", f"eval.every={args.epochs + 1}", "logging.wandb=disabled",
                 *args.overrides]  # fmt: skip
    cfg = compose(overrides)
    validate(cfg)
    learners = os.cpu_count() or 1
    minibatch = cfg.algo.minibatch_size
    if minibatch % learners:
        parser.error(f"algo.minibatch_size={minibatch} must split evenly over {learners} learners (one per core)")
    ddp_overrides = [f"ray.num_learners={learners}", f"algo.minibatch_size={minibatch // learners}"]
    ddp_cfg = compose([*overrides, *ddp_overrides])
    validate(ddp_cfg)
    results = {"plain": measure(dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, enabled=False)),
                                use_ray=False)}  # fmt: skip
    results["ray"] = measure(cfg, use_ray=True)
    results["ray_ddp"] = measure(ddp_cfg, use_ray=True)
    ratios = {arm: results[arm]["samples_per_s"] / results["plain"]["samples_per_s"] for arm in ("ray", "ray_ddp")}

    print(f"\nDDPO epoch, {cfg.env.name} / {cfg.reward.name}: {cfg.trainer.samples_per_epoch} trajectories x "
          f"{cfg.env.num_inference_steps} steps per epoch, {args.epochs} epochs per arm (median of epochs 2..)")
    print(f"{'arm':<8}{'epoch s':>10}{'collect s':>11}{'update s':>10}{'preemptions':>13}{'samples/s':>11}"
          f"{'wall s':>9}")
    for arm, r in results.items():
        print(f"{arm:<8}{r['epoch_s_median']:>10.2f}{r['collect_s_median']:>11.2f}{r['update_s_median']:>10.2f}"
              f"{r['update_preemptions_median']:>13.0f}{r['samples_per_s']:>11.2f}{r['wall_s']:>9.1f}")
    print("preemptions: involuntary context switches in the learner's process per update (median)")
    print(f"ray / plain throughput: {ratios['ray']:.3f}x (one learner, {learners} threads)")
    print(f"ray_ddp / plain throughput: {ratios['ray_ddp']:.3f}x ({learners} learners, 1 thread each)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"overrides": overrides, "learners_in_ray_ddp": learners, "results": results,
                               "ray_over_plain": ratios["ray"], "ray_ddp_over_plain": ratios["ray_ddp"]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
