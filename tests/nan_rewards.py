"""Rewards that are not finite for some rows, for reward=python reward.function=tests.nan_rewards:<name>.

Both are differentiable functions of the images whose backward pass would carry NaN into the network's gradient
unless the rows with a non-finite reward are cut off from it (rlft.envs.rewards.evaluate_reward): their gradient
multiplies the upstream one by NaN, and 0 x NaN is NaN, so leaving the rows out of the loss is not enough.
"""

import torch


def half_nan(images: torch.Tensor, **context) -> torch.Tensor:
    """mean(x) for the even rows, NaN for the odd ones (mean(x) x NaN: its gradient is NaN too)."""
    odd = torch.arange(images.shape[0], device=images.device) % 2 == 1
    mean = images.mean(dim=(1, 2, 3))
    return mean * torch.where(odd, torch.full_like(mean, float("nan")), torch.ones_like(mean))


def all_nan(images: torch.Tensor, **context) -> torch.Tensor:
    """mean(x) x NaN for every row: NaN, and a NaN gradient even where the loss gives the rows a zero one."""
    mean = images.mean(dim=(1, 2, 3))
    return mean * torch.full_like(mean, float("nan"))
