"""Rewards for `reward=python reward.function=tests.python_rewards:<name> reward.differentiable=true` in tests.

Each is called as name(images, **context) with decoded images [B, C, H, W] and returns [B]; the context keywords
(prompts=... for Stable Diffusion) are accepted and ignored.
"""

import torch


def smooth(images: torch.Tensor, **context) -> torch.Tensor:
    """A non-quadratic differentiable function of the images, so that every Jacobian of the chain matters."""
    flat = images.float().flatten(1)
    return -((flat - 0.3) ** 2).mean(1) + torch.sin(2 * flat).mean(1)


def half_nan(images: torch.Tensor, **context) -> torch.Tensor:
    """`smooth`, but NaN where the first pixel is brighter than the second: about half of random images. Each
    image's value depends on that image alone, so a sub-batch of the same images gets the same values."""
    flat = images.float().flatten(1)
    return torch.where(flat[:, 0] > flat[:, 1], float("nan"), smooth(images))


def all_nan(images: torch.Tensor, **context) -> torch.Tensor:
    """NaN for every image."""
    return smooth(images) * float("nan")


def nan_every_other_row(images: torch.Tensor, **context) -> torch.Tensor:
    """`smooth`, but NaN in rows 0, 2, 4, ... of every call (its gradient there is zero, not NaN)."""
    values = smooth(images)
    rows = torch.arange(len(values), device=values.device)
    return torch.where(rows % 2 == 0, float("nan"), values)
