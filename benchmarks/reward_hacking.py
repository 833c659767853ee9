"""Reward hacking on the digits default, measured: each algorithm's training reward beside the independent judge.

    python benchmarks/reward_hacking.py                 # DDPO, DRaFT-K (K = 1), DRaFT (full), Adjoint Matching
    python benchmarks/reward_hacking.py --arms draft_k1 --extra algo.kl_weight=0   # one arm, with changed keys
    python benchmarks/reward_hacking.py --quick         # a smoke test: two epochs each

Every arm is `python -m rlft.run` on the shipped digits DDPM with the digit reward (target 3) and its defaults, in one
process (ray.enabled=false), evaluated on 256 samples of fixed noise. Per evaluation it prints the reward
classifier's share of 3s, the judge's (an MLP on the held-out split: rlft/envs/judge.py), the judge's confidence,
the hacking gap (the reward's gain minus the judge's, in base-model standard deviations) and the within-class
diversity (mean pairwise pixel distance of the samples the judge calls 3s) relative to the base model's. The goal:
>= 80% 3s by the judge, its confidence no more than 0.05 below the base model's, within-class diversity >= 70% of
the base model's, in <= 10 minutes of 2 CPU cores. A table and `benchmarks/results/reward_hacking-<date>.json`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from cli_run import arm_parser, timed_run, write_results

ARMS = {
    "ddpo": ["algo=ddpo"],
    "draft_k1": ["algo=draft", "algo.k=1"],
    "draft_full": ["algo=draft"],
    "adjoint_matching": ["algo=adjoint_matching"],
}
EVAL = ["eval.num_samples=256", "trainer.rollout_batch_size=32", "logging.wandb=disabled", "logging.progress=false",
        "ray.enabled=false"]  # fmt: skip


def run_arm(name: str, extra: list[str], quick: bool, folder: Path) -> dict:
    overrides = [*ARMS[name], *EVAL, *extra, f"logging.run_dir={folder / name}"]
    if quick:
        overrides += ["trainer.epochs=2", "eval.every=1", "eval.num_samples=32"]
    _, seconds, _, evals = timed_run(overrides)
    return {"arm": name, "overrides": overrides, "seconds": seconds, "evaluations": evals}


def goals(first: dict, last: dict) -> dict[str, bool]:
    return {
        "judge_target_fraction_>=_0.8": last["eval/judge/target_fraction"] >= 0.8,
        "judge_confidence_>=_base_-_0.05": last["eval/judge/confidence"] >= first["eval/judge/confidence"] - 0.05,
        "within_class_diversity_>=_70%": last.get("eval/judge/target_diversity_ratio", 0.0) >= 0.7,
    }


def main(argv: list[str] | None = None) -> Path:
    parser = arm_parser(__doc__.split("\n\n")[0], list(ARMS), "two epochs per arm (a smoke test)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.arms:
            results.append(run_arm(name, args.extra, args.quick, Path(folder)))
    columns = ("epoch", "eval/target_fraction", "eval/judge/target_fraction", "eval/judge/confidence",
               "eval/hacking_gap", "eval/judge/target_diversity_ratio")  # fmt: skip
    print("| arm | " + " | ".join(c.removeprefix("eval/") for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for result in results:
        for evaluation in result["evaluations"]:
            cells = [f"{evaluation.get(c, float('nan')):.3f}" if c != "epoch" else str(evaluation[c]) for c in columns]
            print(f"| {result['arm']} | " + " | ".join(cells) + " |")
        first, last = result["evaluations"][0], result["evaluations"][-1]
        result["goals"] = goals(first, last)
        print(f"{result['arm']}: {result['seconds']:.0f} s; goals met: {result['goals']}")
    return write_results(args.out, "reward_hacking", {"arms": results})


if __name__ == "__main__":
    main()
