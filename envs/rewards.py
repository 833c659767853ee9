"""Reward registry: name -> factory. A reward maps images in [-1, 1] ([B, C, H, W]) and contexts to [B] floats.

Every call goes through `evaluate_reward`, which checks the shape and dtype (a wrong one raises an error naming
the reward and the shapes) and returns a mask of finite values: non-finite rewards are counted and kept out of
the update, never averaged in.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Reward:
    name: str
    fn: RewardFn  # (images [B, C, H, W] in [-1, 1], context [B, ...]) -> [B]
    differentiable: bool  # whether gradients flow from the reward to the images (DRaFT, Adjoint Matching)
    # extra evaluation metrics on final samples, e.g. the fraction classified as the target digit
    describe: Callable[[torch.Tensor], dict[str, float]] = field(default=lambda images: {})
    # the reward model's embedding of images ([B, D]), for diversity measures; None = the reward has none
    features: Callable[[torch.Tensor], torch.Tensor] | None = None


REWARDS: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str):
    def add(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        REWARDS[name] = factory
        return factory

    return add


def make_reward(name: str, device: str | torch.device = "cpu", **kwargs) -> Reward:
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](device=device, **kwargs)


# keys of a reward config that say where the reward runs (rlft's reward actor), not what it computes
PLACEMENT_KEYS = ("name", "remote", "remote_gpus", "remote_batch_size", "actor")


def make_reward_from_config(reward_cfg: dict, device: str | torch.device = "cpu") -> Reward:
    """The reward of a `reward:` config section ({"name": ..., factory kwargs..., placement keys...})."""
    kwargs = {k: v for k, v in reward_cfg.items() if k not in PLACEMENT_KEYS}
    return make_reward(reward_cfg["name"], device=device, **kwargs)


def evaluate_reward(reward: Reward, images: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the reward and check its output: returns (rewards [B] float32, finite mask [B] bool)."""
    values = reward.fn(images, context)
    batch = images.shape[0]
    if not isinstance(values, torch.Tensor) or values.shape != (batch,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(
            f"reward {reward.name!r} returned {shape} for images of shape {tuple(images.shape)}; "
            f"a reward must return one value per image, a tensor of shape ({batch},)"
        )
    if not values.is_floating_point():
        raise TypeError(f"reward {reward.name!r} returned dtype {values.dtype}; it must return floating point values")
    values = values.float()
    return values, torch.isfinite(values.detach())


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, "JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(device: str | torch.device = "cpu", quality: int = 95) -> Reward:
    """Minus the JPEG size in kB (DDPO's compressibility task)."""
    return Reward("jpeg_compressibility", lambda images, context: -jpeg_size_kb(images, quality), False)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(device: str | torch.device = "cpu", quality: int = 95) -> Reward:
    """The JPEG size in kB (DDPO's incompressibility task)."""
    return Reward("jpeg_incompressibility", lambda images, context: jpeg_size_kb(images, quality), False)


@register_reward("digit")
def digit(device: str | torch.device = "cpu", target: int = 3) -> Reward:
    """log p(target | x_0) under the shipped digit classifier; differentiable in the images."""
    from envs.digits import NUM_CLASSES, load_classifier

    if not 0 <= target < NUM_CLASSES:
        raise ValueError(f"reward.target must be a digit class 0..{NUM_CLASSES - 1}, got {target}")
    classifier = load_classifier(device=device)

    def log_prob_target(images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(classifier(images.float()), dim=-1)[:, target]

    @torch.no_grad()
    def describe(images: torch.Tensor) -> dict[str, float]:
        probs = F.softmax(classifier(images.float()), dim=-1)
        return {
            "target_fraction": (probs.argmax(-1) == target).float().mean().item(),
            "confidence": probs.max(-1).values.mean().item(),  # high when samples still look like digits
        }

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return classifier.features(images.float())  # [B, 128] penultimate embedding

    return Reward("digit", log_prob_target, True, describe, features)
