"""Rewards that misbehave on their first call only, for the reward actor's fault tests:

    reward=python reward.function=tests.flaky_rewards:dies_once
        +reward.arguments.marker=<file> +reward.arguments.log=<file>

The first call anywhere (the marker file does not exist yet; it is created atomically) dies (`dies_once`: the
process exits, as a reward model crashing its process does) or hangs (`hangs_once`: sleeps far beyond
ray.reward_timeout_s); every later call scores the mean brightness of each image. Each call appends the pid of the
process that scored it (and the time) to `log`, so a test can tell a restarted actor from the first one.
"""

from __future__ import annotations

import os
import time

import torch


def first_call(marker: str) -> bool:
    """True for exactly one call: the one that creates `marker`."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.float().flatten(1).mean(dim=1)


def record(log: str) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {time.time():.3f}\n")


def dies_once(images: torch.Tensor, *, marker: str, log: str, **context) -> torch.Tensor:
    record(log)
    if first_call(marker):
        os._exit(1)
    return brightness(images)


def hangs_once(images: torch.Tensor, *, marker: str, log: str, seconds: float = 3600.0, **context) -> torch.Tensor:
    record(log)
    if first_call(marker):
        time.sleep(seconds)
    return brightness(images)
