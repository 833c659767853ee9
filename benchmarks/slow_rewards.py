"""A reward with a scorer's latency, for benchmarks/async_pipeline.py: the digit reward, after waiting as a remote
judge (a VLM, a detector, a reward server) would make the rollout worker wait."""

from __future__ import annotations

import functools
import time

import torch


@functools.lru_cache(maxsize=1)
def _digit():
    from rlft.envs.rewards import make_reward

    return make_reward("digit")


def slow_digit(images: torch.Tensor, seconds_per_batch: float = 1.0, **context) -> torch.Tensor:
    """The digit reward (target 3) of each image, returned after `seconds_per_batch` of waiting (not computing)."""
    time.sleep(seconds_per_batch)
    return _digit()(images)
