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
    from rlft.envs.digits import NUM_CLASSES, load_classifier

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


# ---- perceptual similarity (DRaFT + STED-FM: similarity of foundation-model embeddings to target images) ----


class HFVisionEncoder(torch.nn.Module):
    """A Hugging Face vision model as an embedding: [B, C, H, W] in [-1, 1] -> [B, D], differentiable.

    Images are resized to the model's input size, given its channel count and normalised with its processor's
    mean and std, all in torch, so gradients reach the pixels. The embedding is the pooled output when the model
    has one, else the mean of its last hidden states over tokens (or space).
    """

    def __init__(self, spec: str):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        try:
            self.model = AutoModel.from_pretrained(spec, trust_remote_code=False)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"reward.encoder={spec!r} is neither 'digits_classifier' nor a loadable Hugging Face vision model (a "
                "local folder, or a hub id already in the HF cache; models that need trust_remote_code are refused)"
            ) from error
        config = AutoConfig.from_pretrained(spec, trust_remote_code=False)
        mean, std, size = [0.5], [0.5], getattr(config, "image_size", None)
        try:
            processor = AutoImageProcessor.from_pretrained(spec, trust_remote_code=False)
            mean, std = processor.image_mean, processor.image_std
            size = processor.size.get("height") or processor.size.get("shortest_edge") or size
        except (OSError, ValueError, AttributeError):
            pass  # no processor saved: [-1, 1] inputs as they are, at the config's image size
        self.channels = getattr(config, "num_channels", 3)
        self.size = int(size) if size else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.float() + 1) / 2  # [B, C, H, W] in [0, 1]
        if pixels.shape[1] != self.channels:
            pixels = pixels.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        if self.size and pixels.shape[-1] != self.size:
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.model(pixel_values=(pixels - self.mean) / self.std)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.flatten(2).mean(-1)  # [B, D]


class DigitFeatures(torch.nn.Module):
    """The shipped digit classifier's 128-d penultimate features."""

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        from rlft.envs.digits import load_classifier

        self.classifier = load_classifier(device=device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())


SIMILARITIES = ("cosine", "mse")


def perceptual_reward(
    encoder: torch.nn.Module, targets: torch.Tensor, similarity: str = "cosine", name: str = "perceptual"
) -> Reward:
    """r(x) = mean_j sim(f(x), f(y_j)) over target images y_j, with a frozen encoder f (any torch module).

    sim is the cosine similarity, or minus the mean squared distance between embeddings ("mse").
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"reward.similarity={similarity} is not one of {', '.join(SIMILARITIES)}")
    encoder = encoder.eval().requires_grad_(False)
    with torch.no_grad():
        target_embeddings = encoder(targets).float()  # [M, D]
    if target_embeddings.dim() != 2 or target_embeddings.shape[0] != targets.shape[0]:
        raise ValueError(f"the encoder must map [M, C, H, W] images to [M, D] embeddings, got "
                         f"{tuple(target_embeddings.shape)} for {tuple(targets.shape)}")  # fmt: skip
    unit_targets = F.normalize(target_embeddings, dim=-1)

    def similarity_to_targets(images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        embeddings = encoder(images).float()  # [B, D]
        if similarity == "cosine":
            return (F.normalize(embeddings, dim=-1) @ unit_targets.T).mean(dim=1)
        return -((embeddings[:, None, :] - target_embeddings[None]) ** 2).mean(dim=(1, 2))

    @torch.no_grad()
    def describe(images: torch.Tensor) -> dict[str, float]:
        return {
            f"{similarity}_similarity": similarity_to_targets(images, images.new_zeros(len(images), 0)).mean().item()
        }

    return Reward(name, similarity_to_targets, True, describe)


def load_target_images(spec: str, num_targets: int) -> torch.Tensor:
    """ "digits:<class>" (held-out digits of that class) or a safetensors file with an "images" tensor in [-1, 1]."""
    if spec.startswith("digits:"):
        from rlft.envs.digits import NUM_CLASSES, load_digits

        label = int(spec.split(":", 1)[1])
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"reward.targets={spec}: the digit class must lie in 0..{NUM_CLASSES - 1}")
        images, labels = load_digits("heldout")
        return images[labels == label][:num_targets]
    from safetensors.torch import load_file

    try:
        return load_file(spec)["images"].float()[:num_targets]
    except (OSError, KeyError) as error:
        raise FileNotFoundError(
            f"reward.targets={spec!r}: give 'digits:<class>' or a safetensors file with an 'images' tensor "
            "[M, C, H, W] in [-1, 1]"
        ) from error


@register_reward("perceptual")
def perceptual(
    device: str | torch.device = "cpu",
    encoder: str = "digits_classifier",
    targets: str = "digits:3",
    similarity: str = "cosine",
    num_targets: int = 64,
) -> Reward:
    """Perceptual similarity to a set of target images through a frozen encoder; differentiable."""
    module = DigitFeatures(device) if encoder == "digits_classifier" else HFVisionEncoder(encoder).to(device)
    return perceptual_reward(module, load_target_images(targets, num_targets).to(device), similarity)
