"""One `python -m rlft.run` in this process, timed, with its metrics: what every learning benchmark here runs per
arm."""

from __future__ import annotations

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
