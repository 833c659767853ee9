"""GRPO, DiffusionNFT and DDPO on the shipped flow-matching model, side by side: samples and seconds to 80% judged 3s.

    python benchmarks/flow_rl.py                  # the three arms, each `python -m rlft.run algo=<arm> env=digits_flow`
    python benchmarks/flow_rl.py --arms nft --extra algo.beta=0.5
    python benchmarks/flow_rl.py --quick          # a smoke test: two epochs each

Every arm runs the shipped digits_flow model (rectified flow, 10 memoryless SDE steps) with the digit reward
(target 3) and its own defaults, one after the other in one process (ray.enabled=false, so the arms share nothing but
the machine), evaluated every 5 epochs on 256 samples of fixed noise. Per evaluation it prints the reward classifier's
share of 3s, the independent judge's (an MLP on the held-out split, rlft/envs/judge.py), the judge's confidence and
the within-class diversity relative to the base model's; per arm, the training samples and the training seconds
(the sum of the epochs' collect + update time, evaluations excluded) at the first evaluation where the judge counts
>= 80% 3s. A table and `benchmarks/results/flow_rl-<date>.json`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from cli_run import arm_parser, timed_run, write_results

ARMS = {"grpo": ["algo=grpo"], "nft": ["algo=nft"], "ddpo": ["algo=ddpo", "trainer.epochs=80"]}
COMMON = ["env=digits_flow", "eval.num_samples=256", "eval.every=5", "trainer.rollout_batch_size=32",
          "logging.wandb=disabled", "logging.progress=false", "ray.enabled=false"]  # fmt: skip
TARGET = 0.8


def run_arm(name: str, extra: list[str], quick: bool, folder: Path) -> dict:
    overrides = [*ARMS[name], *COMMON, *extra, f"logging.run_dir={folder / name}"]
    if quick:
        overrides += ["trainer.epochs=2", "eval.every=1", "eval.num_samples=32"]
    run_dir, seconds, epoch_lines, evaluation_lines = timed_run(overrides)
    epochs = {line["epoch"]: line for line in epoch_lines}
    samples_per_epoch = _samples_per_epoch(run_dir)
    evaluations = []
    for line in evaluation_lines:
        trained = [epochs[e] for e in epochs if e <= line["epoch"]]
        evaluations.append({**line, "samples": samples_per_epoch * len(trained),
                            "train_seconds": sum(e["perf/epoch_s"] for e in trained)})  # fmt: skip
    reached = next((e for e in evaluations if e["eval/judge/target_fraction"] >= TARGET), None)
    return {"arm": name, "overrides": overrides, "seconds": seconds, "evaluations": evaluations,
            "to_target": None if reached is None else {k: reached[k] for k in ("epoch", "samples", "train_seconds")}}


def _samples_per_epoch(run_dir: Path) -> int:
    import yaml

    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["samples_per_epoch"])


def main(argv: list[str] | None = None) -> Path:
    parser = arm_parser(__doc__.split("\n\n")[0], list(ARMS), "two epochs per arm (a smoke test)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as folder:
        results = [run_arm(name, args.extra, args.quick, Path(folder)) for name in args.arms]
    columns = ("epoch", "samples", "train_seconds", "eval/target_fraction", "eval/judge/target_fraction",
               "eval/judge/confidence", "eval/judge/target_diversity_ratio")  # fmt: skip
    print("| arm | " + " | ".join(c.removeprefix("eval/") for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for result in results:
        for evaluation in result["evaluations"]:
            cells = [f"{evaluation.get(c, float('nan')):.3f}" if c.startswith("eval/") else f"{evaluation[c]:.0f}"
                     for c in columns]  # fmt: skip
            print(f"| {result['arm']} | " + " | ".join(cells) + " |")
    print(f"\n| arm | samples to {TARGET:.0%} judged 3s | training seconds to it | epoch | whole run (s) |")
    print("|---|---|---|---|---|")
    for result in results:
        reached = result["to_target"]
        cells = ("not reached",) * 3 if reached is None else (
            str(reached["samples"]), f"{reached['train_seconds']:.0f}", str(reached["epoch"]))  # fmt: skip
        print(f"| {result['arm']} | " + " | ".join(cells) + f" | {result['seconds']:.0f} |")
    return write_results(args.out, "flow_rl", {"target": TARGET, "arms": results})


if __name__ == "__main__":
    main()
