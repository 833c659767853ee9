"""Buffered vs on-policy Adjoint Matching on digits: wall time and network evaluations to reach the same reward.

    python benchmarks/am_buffered_vs_onpolicy.py                      # CPU, the default digits config
    python benchmarks/am_buffered_vs_onpolicy.py --device cuda --threads 2

Both variants run side by side in one process (no Ray: the same RolloutWorker and Learner the pipeline uses),
from the same seed and config except `algo.passes_per_buffer` (10 = buffered, 1 = on-policy). Each trains until
the fixed evaluation batch reaches `--target-fraction` of the target digit, or `--max-samples` trajectories.
Network evaluations count per-sample forward passes: T to sample and T (plus their VJPs) for the lean adjoint per
trajectory, `num_train_timesteps` per trajectory per pass in the learner. Evaluation time is not counted.
Prints a table and writes benchmarks/results/am_buffered_vs_onpolicy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from rlft.config import compose, validate
from rlft.learner import Learner
from rlft.rollout import RolloutWorker, derive_seed

RESULTS = Path(__file__).parent / "results" / "am_buffered_vs_onpolicy.json"


def run_variant(name: str, passes: int, args) -> dict:
    overrides = [
        "algo=adjoint_matching", "env=digits", "reward=digit", f"algo.passes_per_buffer={passes}",
        f"trainer.samples_per_epoch={args.samples_per_epoch}", f"device={args.device}", "ray.enabled=false",
        f"ray.rollout_threads={args.threads}", f"ray.learner_threads={args.threads}", "logging.wandb=disabled",
        f"seed={args.seed}", *args.override,
    ]  # fmt: skip
    cfg = compose(overrides)
    validate(cfg)
    device = torch.device(args.device)
    worker, learner = RolloutWorker(cfg), Learner(cfg, device)
    trained_s, rollout_evals, samples, epoch = 0.0, 0.0, 0, 0
    curve = []

    def evaluate() -> dict:
        metrics = worker.evaluate(learner.policy_version, cfg.eval.seed, cfg.eval.num_samples)["metrics"]
        point = {"epoch": epoch, "samples": samples, "trained_s": trained_s,
                 "network_evals": rollout_evals + learner.state.train_network_evals, **metrics}  # fmt: skip
        curve.append(point)
        print(f"  {name:>10} epoch {epoch:4d} {trained_s:7.1f} s target_fraction {metrics['eval/target_fraction']:.3f}"
              f"  confidence {metrics['eval/confidence']:.3f}", flush=True)
        return point

    reached = None
    evaluate()
    while samples < args.max_samples:
        start = time.perf_counter()
        seed = derive_seed(args.seed, 3, epoch)
        metrics = learner.ingest([(f"e{epoch}", worker.collect(learner.policy_version, seed, args.samples_per_epoch))])
        metrics.update(learner.update())
        worker.set_weights(learner.policy.trainable_state_dict(), learner.policy_version)
        trained_s += time.perf_counter() - start
        rollout_evals += metrics.get("am/rollout_network_evals", 0.0)
        samples += args.samples_per_epoch
        epoch += 1
        if epoch % args.eval_every == 0:
            point = evaluate()
            if point["eval/target_fraction"] >= args.target_fraction:
                reached = point
                break
    return {"variant": name, "passes_per_buffer": passes, "reached": reached, "final": curve[-1], "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples-per-epoch", type=int, default=64)
    parser.add_argument("--target-fraction", type=float, default=0.8, help="eval/target_fraction both must reach")
    parser.add_argument("--max-samples", type=int, default=64 * 120, help="trajectories before giving up")
    parser.add_argument("--eval-every", type=int, default=2, help="epochs between evaluations")
    parser.add_argument("--buffered-passes", type=int, default=10)
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides, key=value")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = [run_variant("buffered", args.buffered_passes, args), run_variant("on-policy", 1, args)]
    print(f"\nAM on digits to eval/target_fraction >= {args.target_fraction} ({args.device}, {args.threads} threads)")
    print(f"{'variant':>10} {'passes':>6} {'reached':>7} {'epochs':>6} {'samples':>7} {'wall s':>8} {'net evals':>10} "
          f"{'target frac':>11} {'confidence':>10}")
    for r in results:
        p = r["reached"] or r["final"]
        print(f"{r['variant']:>10} {r['passes_per_buffer']:>6} {str(r['reached'] is not None):>7} {p['epoch']:>6} "
              f"{p['samples']:>7} {p['trained_s']:>8.1f} {p['network_evals']:>10.0f} "
              f"{p['eval/target_fraction']:>11.3f} {p['eval/confidence']:>10.3f}")
    buffered, onpolicy = (r["reached"] for r in results)
    if buffered and onpolicy:
        print(f"on-policy / buffered: wall time x{onpolicy['trained_s'] / buffered['trained_s']:.2f}, "
              f"network evals x{onpolicy['network_evals'] / buffered['network_evals']:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
