"""Shared test helpers: composed specs on the tiny random DDPM, and the driver run as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rlft.config import compose

TINY_OVERRIDES = [  # a run on the tiny random UNet small enough for unit tests (after env.base_model=...)
    "env.num_inference_steps=5", "trainer.rollout_batch_size=8", "trainer.samples_per_epoch=16",
    "algo.minibatch_size=8", "eval.num_samples=8", "ray.rollout_threads=1", "ray.learner_threads=1",
    "logging.wandb=disabled", "logging.progress=false",
]  # fmt: skip


def tiny_cfg(model_dir, *overrides: str):
    """A run spec (rlft.spec.RunSpec) on a tiny random UNet, small enough for unit tests."""
    return compose([f"env.base_model={model_dir}", *TINY_OVERRIDES, *overrides])


def run_rlft(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m rlft.run ARGS` in a subprocess, offline, on a fresh local Ray (never a cluster from the
    environment); fails the test with the end of its output unless it exits 0."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    result = subprocess.run([sys.executable, "-m", "rlft.run", *args], capture_output=True, text=True,
                            timeout=timeout, env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read_jsonl(path: Path) -> list[dict]:
    """The records of a run's .jsonl file (metrics, replicas), none while it does not exist yet."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_with_fault(command: list[str], fault: Callable[[], bool], timeout_s: float = 480, cwd: Path | None = None,
                   env: dict | None = None) -> str:  # fmt: skip
    """Run `command` (an rlft run, offline, never a cluster from the environment) and call `fault()` every 0.05 s
    until it returns True (it strikes once, when the run got where it wants); fails the test unless the run exits 0
    after the fault struck. Returns the run's output."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "", **(env or {})}
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               text=True, start_new_session=True)  # fmt: skip
    struck, deadline = False, time.monotonic() + timeout_s
    try:
        while process.poll() is None and time.monotonic() < deadline:
            struck = struck or fault()
            time.sleep(0.05)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-4000:]
    assert struck, f"the fault never struck: {output[-4000:]}"
    return output
