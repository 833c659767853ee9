"""Shared test helpers: composed specs on the tiny random DDPM, and the driver run as a user runs it."""

import os
import subprocess
import sys

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
