"""Rewards: each one a config dataclass (its keys, what it accepts, how to build it) and the `Reward` it builds.

A reward maps decoded images in [-1, 1] ([B, C, H, W]) and the env's context keywords to [B] floats:

    reward(images, **context)      context: prompts=[...] (text-to-image envs), measurement=y (inverse problems)

`reward=<name>` chooses a registered config class; `reward=python reward.function=package.module:name` calls your
own function the same way. Every call goes through `evaluate_reward`, which checks the shape and dtype (a wrong one
raises a `RewardError` naming the reward and the shapes) and returns a mask of finite values: non-finite rewards are
counted, kept out of every update and cut off from the gradient (see `evaluate_reward`), never averaged in.

A config declares what it `accepts` (channels, image sizes, the context it needs, whether gradients flow through it),
so `rlft.config.validate` refuses a reward that cannot work with an env before any model is loaded.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from rlft.core.spec import knob


class RewardError(ValueError):
    """A reward that cannot be used as it is: it returned the wrong shape or dtype, or could not be imported."""


@dataclass
class Reward:
    """A built reward, ready to score."""

    name: str
    fn: Callable[..., torch.Tensor]  # (images [B, C, H, W] in [-1, 1], **context) -> [B]
    differentiable: bool  # whether gradients flow from the reward to the images (DRaFT, Adjoint Matching)
    # extra evaluation metrics of final samples, e.g. the fraction classified as the target digit
    describe: Callable[..., dict[str, float]] = field(default=lambda images, **context: {})
    # the reward model's embedding of images ([B, D]), for diversity measures; None = the reward has none
    features: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, images: torch.Tensor, **context) -> torch.Tensor:
        return self.fn(images, **context)


# ---- what an env gives its rewards, and what a reward needs ----
@dataclass(frozen=True)
class ImageSpec:
    """The images an env's reward sees (after decoding latents) and the context keywords the env passes."""

    channels: int
    height: int
    width: int
    context: tuple[str, ...] = ()  # "prompts" (text-to-image), "measurement" (inverse problems)


@dataclass(frozen=True)
class Accepts:
    """The images and context a reward can score."""

    channels: tuple[int, ...] | None = None  # None: any number of channels
    sizes: tuple[int, int] | None = None  # (smallest, largest) image side in pixels; None: any
    needs: tuple[str, ...] = ()  # context keywords it reads
    differentiable: bool = False

    def problems(self, image: ImageSpec) -> list[str]:
        problems = []
        if self.channels is not None and image.channels not in self.channels:
            problems.append(f"it scores {'/'.join(map(str, self.channels))}-channel images and this env makes "
                            f"{image.channels}-channel ones")  # fmt: skip
        if self.sizes is not None and not self.sizes[0] <= min(image.height, image.width) <= max(
                image.height, image.width) <= self.sizes[1]:  # fmt: skip
            low, high = self.sizes
            span = f"{low} px" if low == high else f"{low}-{high} px"
            problems.append(f"it scores images of {span} and this env makes {image.height}x{image.width}")
        for need in self.needs:
            if need not in image.context:
                problems.append(f"it needs the env's {need}, which this env has none of")
        return problems


@dataclass
class RewardConfig:
    """The keys every reward has; a reward's own config adds its arguments and `build`."""

    name: str = knob("", "reward registry key (reward=<name>)")

    def accepts(self) -> Accepts:
        raise NotImplementedError

    def check(self) -> None:
        """Cheap availability check run before Ray starts (missing model files raise here, with the fix)."""

    def build(self, device: str | torch.device = "cpu") -> Reward:
        raise NotImplementedError


REWARDS: dict[str, type[RewardConfig]] = {}


def register_reward(cls: type[RewardConfig]) -> type[RewardConfig]:
    """Register a reward config class under its `name` default (the `reward=<name>` choice)."""
    REWARDS[cls.name] = cls
    return cls


@dataclass
class NoJudge(RewardConfig):
    """judge=none: evaluations report the training reward only (and the env's own metrics, such as PSNR)."""

    name: str = knob("none", "judge registry key (judge=<name>): none, or any reward")

    def accepts(self) -> Accepts:
        return Accepts()


def judge_classes() -> dict[str, type[RewardConfig]]:
    """The judge group's options: none, or any reward (a model the update never sees scores the samples)."""
    return {"none": NoJudge, **REWARDS}


def make_reward(name: str, device: str | torch.device = "cpu", **kwargs) -> Reward:
    """Build a registered reward from keyword arguments (tests and scripts; runs compose a config)."""
    if name not in REWARDS:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {', '.join(sorted(REWARDS))}")
    return REWARDS[name](**kwargs).build(device)


def evaluate_reward(reward: Reward, images: torch.Tensor, context: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Call the reward and check its output: returns (rewards [B] float32, finite mask [B] bool).

    When `images` carries gradients, the gradient of every sample with a non-finite reward is set to zero before it
    leaves the reward (0 x inf is NaN, so masking the loss alone is not enough): no gradient flows through them."""
    values = reward(images, **context)
    batch = images.shape[0]
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (batch,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise RewardError(f"reward {reward.name!r} returned {shape} for images of shape {tuple(images.shape)}; a "
                          f"reward must return one value per image, a tensor of shape ({batch},)")  # fmt: skip
    if not values.is_floating_point():
        raise RewardError(f"reward {reward.name!r} returned dtype {values.dtype}; it must return floating point values")
    values = values.float()
    finite = torch.isfinite(values.detach())
    if images.requires_grad and not bool(finite.all()):
        cut_gradient(images, finite)
    return values, finite


def reward_statistics(values: torch.Tensor, finite: torch.Tensor) -> dict[str, float]:
    """The training metrics of a batch of rewards: mean, std and max of the finite ones, and how many were not."""
    kept = values.detach().float()[finite]
    nan = float("nan")
    return {
        "reward/mean": kept.mean().item() if len(kept) else nan,
        "reward/std": kept.std(unbiased=False).item() if len(kept) else nan,
        "reward/max": kept.max().item() if len(kept) else nan,
        "reward/nonfinite": float((~finite).sum()),
    }


def cut_gradient(tensor: torch.Tensor, keep: torch.Tensor) -> None:
    """In the backward pass, replace the gradient of `tensor`'s rows where `keep` is False by zeros."""
    mask = keep.reshape(-1, *([1] * (tensor.dim() - 1))).to(tensor.device)
    tensor.register_hook(lambda grad: torch.where(mask, grad, torch.zeros_like(grad)))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8."""
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return array.permute(0, 2, 3, 1).cpu().numpy()


# ---- JPEG (in)compressibility (DDPO sec. 6.1) ----
def jpeg_size_kb(images: torch.Tensor, quality: int) -> torch.Tensor:
    from PIL import Image

    sizes = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, "JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


@register_reward
@dataclass
class JpegCompressibility(RewardConfig):
    """Minus the JPEG size of x_0 in kB (Pillow): rewards images that compress well. Not differentiable."""

    name: str = knob("jpeg_compressibility", "reward registry key (reward=<name>)")
    quality: int = knob(95, "JPEG quality setting", ge=1, le=100)
    SIGN: ClassVar[float] = -1.0

    def accepts(self) -> Accepts:
        return Accepts(channels=(1, 3))

    def build(self, device: str | torch.device = "cpu") -> Reward:
        sign, quality = self.SIGN, self.quality
        return Reward(self.name, lambda images, **_: sign * jpeg_size_kb(images, quality), False)


@register_reward
@dataclass
class JpegIncompressibility(JpegCompressibility):
    """The JPEG size of x_0 in kB (Pillow): rewards detailed, hard-to-compress images. Not differentiable."""

    name: str = knob("jpeg_incompressibility", "reward registry key (reward=<name>)")
    SIGN: ClassVar[float] = 1.0


# ---- the digit classifier (the embedded default) ----
@register_reward
@dataclass
class DigitReward(RewardConfig):
    """log p(target | x_0) under the shipped digit classifier; differentiable."""

    name: str = knob("digit", "reward registry key (reward=<name>)")
    target: int = knob(3, "the digit class the fine-tuned model should draw", ge=0, le=9)

    def accepts(self) -> Accepts:
        from rlft.envs.digits import IMAGE_SIZE

        return Accepts(channels=(1,), sizes=(IMAGE_SIZE, IMAGE_SIZE), differentiable=True)

    def check(self) -> None:
        from rlft.envs.digits import CLASSIFIER_PATH, missing_classifier

        if not CLASSIFIER_PATH.exists():
            raise missing_classifier(CLASSIFIER_PATH)

    def build(self, device: str | torch.device = "cpu") -> Reward:
        from rlft.envs.digits import load_classifier

        classifier, target = load_classifier(device=device), self.target

        def log_prob_target(images: torch.Tensor, **_) -> torch.Tensor:
            return F.log_softmax(classifier(images.float()), dim=-1)[:, target]

        @torch.no_grad()
        def describe(images: torch.Tensor, **_) -> dict[str, float]:
            probs = F.softmax(classifier(images.float()), dim=-1)
            return {
                "target_fraction": (probs.argmax(-1) == target).float().mean().item(),
                "confidence": probs.max(-1).values.mean().item(),  # high when samples still look like digits
            }

        @torch.no_grad()
        def features(images: torch.Tensor) -> torch.Tensor:
            return classifier.features(images.float())  # [B, 128] penultimate embedding

        return Reward(self.name, log_prob_target, True, describe, features)


# ---- a scorer behind HTTP (outside the cluster: a VLM judge, a reward server) ----
# The protocol, both sides in this project (the service: python -m rlft.reward_service): a POST of JSON
#   {"images": base64 of a .npy uint8 array [B, H, W, C], "prompts": [B strings] (when the reward needs them)}
# answered by {"scores": [B numbers]}. Arrays travel as .npy bytes read with allow_pickle=False: nothing is unpickled.
def encode_images(images: torch.Tensor) -> str:
    """[B, C, H, W] in [-1, 1] -> base64 of the .npy bytes of the uint8 array [B, H, W, C]."""
    buffer = io.BytesIO()
    np.save(buffer, to_uint8(images), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_images(text: str) -> torch.Tensor:
    """The inverse of `encode_images`, as the float images [B, C, H, W] in [-1, 1] a reward scores."""
    array = np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim != 4:
        raise RewardError(f"images must be a uint8 array [B, H, W, C], not {array.dtype} of shape {array.shape}")
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1


def post_json(url: str, payload: dict, timeout_s: float, retries: int) -> dict:
    """POST `payload` as JSON and return the JSON answer; connection failures and 5xx answers are retried."""
    import time
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == retries:
                detail = error.read().decode(errors="replace")[:300]
                raise RewardError(f"reward=http: {url} answered {error.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            if attempt == retries:
                reason = getattr(error, "reason", error)
                raise RewardError(f"reward=http: no answer from {url} ({reason}) after {retries + 1} tries; start the "
                                  "reward service (python -m rlft.reward_service) or fix reward.url") from None
        time.sleep(min(2.0**attempt, 10.0))
    raise AssertionError("unreachable")


@register_reward
@dataclass
class HttpReward(RewardConfig):
    """Scores from an HTTP service (the protocol above); the images go as uint8, so it is not differentiable."""

    name: str = knob("http", "reward registry key (reward=<name>)")
    url: str = knob("", "the service's scoring endpoint, e.g. http://scorer.internal:8000/score")
    needs: list[str] = knob([], "context keywords it sends: prompts (text-to-image envs)", choices=("prompts",))
    batch_size: int = knob(64, "images per request (bounds a request's size)", ge=1)
    timeout_s: float = knob(120.0, "seconds one request may take", gt=0)
    retries: int = knob(2, "a request that fails to connect or gets a 5xx answer is sent again this often", ge=0)

    def accepts(self) -> Accepts:
        return Accepts(needs=tuple(self.needs))

    def check(self) -> None:
        from urllib.parse import urlparse

        if urlparse(self.url).scheme not in ("http", "https") or not urlparse(self.url).hostname:
            raise RewardError(f"reward=http needs reward.url=http(s)://host:port/path, not {self.url!r} (the service: "
                              "python -m rlft.reward_service reward=<name> --port 8000)")  # fmt: skip

    def build(self, device: str | torch.device = "cpu") -> Reward:
        self.check()
        config = self

        def score(images: torch.Tensor, **context) -> torch.Tensor:
            scores = []
            for start in range(0, len(images), config.batch_size):
                chunk = images[start : start + config.batch_size]
                payload = {"images": encode_images(chunk)}
                if "prompts" in config.needs:
                    payload["prompts"] = list(context["prompts"][start : start + config.batch_size])
                answer = post_json(config.url, payload, config.timeout_s, config.retries)
                values = answer.get("scores") if isinstance(answer, dict) else None
                if not isinstance(values, list) or len(values) != len(chunk):
                    raise RewardError(f"reward=http: {config.url} must answer {{\"scores\": [{len(chunk)} numbers]}} "
                                      f"for {len(chunk)} images, not {str(answer)[:200]}")  # fmt: skip
                scores.append(torch.tensor([float("nan") if v is None else v for v in values], dtype=torch.float32))
            return torch.cat(scores).to(images.device)

        return Reward(f"http:{self.url}", score, False)


# ---- your own reward, by import path ----
def import_object(spec: str, key: str) -> Any:
    """`package.module:name` -> the object (a function, a class); `key` is the config key that gave it."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise RewardError(f"{key}={spec!r} is not of the form package.module:name")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardError(f"{key}={spec!r}: cannot import {module_name} ({error}); put it on PYTHONPATH or install "
                          "its package") from None  # fmt: skip
    if not hasattr(module, attribute):
        raise RewardError(f"{key}={spec!r}: {module_name} has no attribute {attribute!r}")
    return getattr(module, attribute)


@register_reward
@dataclass
class PythonReward(RewardConfig):
    """Your own function, called as name(images, **context) with images [B, C, H, W] in [-1, 1]; returns [B]."""

    name: str = knob("python", "reward registry key (reward=<name>)")
    function: str = knob("", "the function as package.module:name; called as name(images, **context) -> [B]")
    differentiable: bool = knob(False, "true when gradients may flow through it (DRaFT, Adjoint Matching)")
    needs: list[str] = knob([], "context keywords it reads: prompts (text-to-image envs), measurement (inverse "
                            "problems)")  # fmt: skip
    arguments: dict[str, Any] = knob({}, "keyword arguments passed on every call (reward.arguments.scale=2, ...)")

    def accepts(self) -> Accepts:
        return Accepts(needs=tuple(self.needs), differentiable=self.differentiable)

    def check(self) -> None:
        if not self.function:
            raise RewardError("reward=python needs reward.function=package.module:name (your function, called as "
                              "name(images, **context) and returning a tensor [B])")  # fmt: skip
        if not callable(import_object(self.function, "reward.function")):
            raise RewardError(f"reward.function={self.function!r} is not callable")

    def build(self, device: str | torch.device = "cpu") -> Reward:
        self.check()
        function, arguments = import_object(self.function, "reward.function"), dict(self.arguments)
        return Reward(self.function, lambda images, **context: function(images, **context, **arguments),
                      self.differentiable)  # fmt: skip
