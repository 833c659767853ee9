"""One `python -m rlft.run` in this process, timed, with its metrics: what every learning benchmark here runs per
arm."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def timed_run(overrides: list[str]) -> tuple[Path, float, list[dict], list[dict]]:
    """(run folder, wall seconds, the epochs' metrics lines, the evaluations' lines) of one run."""
    from rlft.run import main

    start = time.perf_counter()
    run_dir = main(overrides)
    seconds = time.perf_counter() - start
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if "policy_version" in line]
    return run_dir, seconds, epochs, [line for line in lines if "eval/reward_mean" in line]


def arm_parser(description: str, arms: list[str] | None, quick_help: str) -> argparse.ArgumentParser:
    """The arguments the learning benchmarks share: --arms (when there is a choice), --extra, --quick, --out."""
    parser = argparse.ArgumentParser(description=description)
    if arms is not None:
        parser.add_argument("--arms", nargs="+", default=list(arms), choices=list(arms))
    parser.add_argument("--extra", nargs="*", default=[], help="rlft overrides for every arm")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default="benchmarks/results", help="folder of the JSON")
    return parser


def write_results(out: str, name: str, payload: dict) -> Path:
    """`<out>/<name>-<date>-<time>.json`, announced on stdout."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{time.strftime('%Y-%m-%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
    return path
