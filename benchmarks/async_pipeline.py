"""Synchronous vs asynchronous rollouts through Ray with a slow reward: throughput and learning per sample.

    python benchmarks/async_pipeline.py                  # DDPO on the digits default, a reward of 1 s per batch
    python benchmarks/async_pipeline.py --latency 3      # a slower scorer
    python benchmarks/async_pipeline.py --quick          # a smoke test: three epochs each

Both arms run `python -m rlft.run` through Ray (two rollout actors, one Ray Train learner) with the same seed, the
digit reward behind a scorer that waits `--latency` seconds per rollout batch (benchmarks/slow_rewards.py: the
waiting of a remote judge, not computation), and trainer.max_staleness=1. The synchronous arm collects, then
updates; the asynchronous one (trainer.async_rollouts=true) collects epoch e + 1 with version e's weights while the
learner trains on epoch e, so each update sees data one version old (DDPO's ratio uses the stored behaviour
log-probabilities). It prints the median epoch time of each arm, their ratio, and the reward and judge per
evaluation against samples; a table and `benchmarks/results/async_pipeline-<date>.json`.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

from cli_run import arm_parser, timed_run, write_results

HERE = Path(__file__).resolve().parent


def run_arm(name: str, asynchronous: bool, args, folder: Path) -> dict:
    overrides = ["algo=ddpo", "reward=python", "reward.function=slow_rewards:slow_digit",
                 f"reward.arguments.seconds_per_batch={args.latency}", "trainer.max_staleness=1",
                 f"trainer.async_rollouts={str(asynchronous).lower()}", f"trainer.epochs={args.epochs}",
                 "eval.every=10", "eval.num_samples=128", "logging.wandb=disabled", "logging.progress=false",
                 "ray.learner_threads=1", "ray.rollout_threads=1", *args.extra,
                 f"logging.run_dir={folder / name}"]  # fmt: skip
    if args.quick:
        overrides += ["trainer.epochs=3", "eval.every=3", "eval.num_samples=32"]
    _, seconds, epochs, evaluations = timed_run(overrides)
    return {"arm": name, "overrides": overrides, "seconds": seconds,
            "median_epoch_s": statistics.median(e["perf/epoch_s"] for e in epochs[1:] or epochs),
            "staleness": sorted({e["buffer/staleness"] for e in epochs}),
            "epochs": epochs, "evaluations": evaluations}  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    parser = arm_parser(__doc__.split("\n\n")[0], None, "three epochs per arm (a smoke test)")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds the scorer waits per rollout batch")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    # the rollout actors import the scorer: they inherit the driver's environment, PYTHONPATH included
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as folder:
        results = [run_arm(name, name == "async", args, Path(folder)) for name in ("sync", "async")]
    sync, asynchronous = results
    speedup = sync["median_epoch_s"] / asynchronous["median_epoch_s"]
    print("| arm | median epoch (s) | staleness | whole run (s) |")
    print("|---|---|---|---|")
    for result in results:
        print(f"| {result['arm']} | {result['median_epoch_s']:.2f} | {result['staleness']} | {result['seconds']:.0f} |")
    print(f"\nasync / sync throughput: {speedup:.2f}x")
    print("\n| arm | epoch | samples | reward (log p(3)) | judge: 3s |")
    print("|---|---|---|---|---|")
    samples = {result["arm"]: result["epochs"][0]["perf/samples_per_s"] * result["epochs"][0]["perf/epoch_s"]
               for result in results}  # fmt: skip
    for result in results:
        for evaluation in result["evaluations"]:
            print(f"| {result['arm']} | {evaluation['epoch']} | {evaluation['epoch'] * samples[result['arm']]:.0f} | "
                  f"{evaluation['eval/reward_mean']:.3f} | "
                  f"{evaluation.get('eval/judge/target_fraction', float('nan')):.3f} |")
    return write_results(args.out, "async_pipeline", {"latency_s": args.latency, "throughput_ratio": speedup,
                                                       "arms": results})


if __name__ == "__main__":
    main()
