"""A user's own reward for the matrix tests (reward=python reward.function=tests.matrix_rewards:brightness)."""

import torch


def brightness(images: torch.Tensor, **context) -> torch.Tensor:
    """The mean pixel value of each image: differentiable, any channels and size."""
    return images.mean(dim=tuple(range(1, images.dim())))
