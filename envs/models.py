"""Pretrained models from a Hugging Face Hub id or a local folder, with an error that says how to provide them.

Every loader here goes through `from_pretrained` of diffusers / transformers (safetensors preferred, `.bin`
files only through their `weights_only=True` loaders, `trust_remote_code` never set). When a model is neither
a local folder nor in the HF cache and the Hub cannot be reached (or HF_HUB_OFFLINE=1), the error names the
model id, the config key that points at it, and the three ways to provide it.

`check_available` is the cheap form used before Ray starts: it fetches (or finds in the cache) one small config
file of the model, so a missing model stops the run in the driver instead of inside a Ray actor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


class ModelUnavailableError(FileNotFoundError):
    """A pretrained model could not be found locally, in the HF cache, or on the Hub."""


def unavailable(model_id: str, what: str, config_key: str, cause: BaseException | str) -> ModelUnavailableError:
    reason = " ".join(str(cause).split())  # library messages span lines; the error reads as one
    if Path(model_id).expanduser().exists():
        return ModelUnavailableError(
            f"cannot load the {what}: the folder {model_id} exists but does not hold a loadable {what} ({reason}). "
            "Save one there with `save_pretrained`, or point "
            f"{config_key}=... at another folder or Hub id"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    state = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub was not reachable or refused it"
    return ModelUnavailableError(
        f"cannot load the {what} {model_id!r}: it is not a local folder, not in the Hugging Face cache, and {state} "
        f"({type(cause).__name__ if isinstance(cause, BaseException) else 'reason'}: {reason}). Provide it in one of "
        f"three ways: (1) a local copy: {config_key}=/path/to/folder (a folder written by save_pretrained or "
        f"`hf download {model_id} --local-dir /path/to/folder`); (2) the HF cache: run `hf download {model_id}` on "
        "a machine with network, copy its cache ($HF_HOME, default ~/.cache/huggingface) here and set "
        "HF_HUB_OFFLINE=1; (3) network access to huggingface.co (unset HF_HUB_OFFLINE)"
    )


def check_available(model_id: str, filename: str, what: str, config_key: str, subfolder: str | None = None) -> None:
    """Raise `ModelUnavailableError` unless `filename` of `model_id` is in a local folder, the HF cache or the Hub."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        path = local / subfolder / filename if subfolder else local / filename
        if not path.exists():
            raise unavailable(model_id, what, config_key, f"{path} is missing")
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id=model_id, filename=filename, subfolder=subfolder)
    except Exception as error:  # offline, unreachable, unknown repo, malformed id: all mean "not available"
        raise unavailable(model_id, what, config_key, error) from error


def from_pretrained(cls, model_id: str, what: str, config_key: str, **kwargs):
    """`cls.from_pretrained(model_id, **kwargs)`, with the explanatory error when the files are not to be had."""
    try:
        return cls.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError) as error:  # what diffusers/transformers raise for missing files or repos
        raise unavailable(model_id, what, config_key, error) from error


def is_stable_diffusion(env_cfg: dict) -> bool:
    return env_cfg.get("model_type", "ddpm") == "stable_diffusion"


# ---------------------------------------------------------------- base DDPMs (google/ddpm-*, rlft.pretrain folders)


def load_ddpm(model_id: str, config_key: str = "env.base_model") -> tuple[nn.Module, dict]:
    """An unconditional base DDPM: (diffusers UNet2DModel, its scheduler config as a dict)."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = from_pretrained(UNet2DModel, model_id, "base DDPM", config_key)
    scheduler = from_pretrained(DDPMScheduler, model_id, "base DDPM's scheduler", config_key)
    return unet, dict(scheduler.config)


def load_ddpm_configs(model_id: str, config_key: str = "env.base_model") -> tuple[dict, dict]:
    """The UNet and scheduler configs of a base DDPM, without its weights (shapes and noise schedule)."""
    from diffusers import DDPMScheduler, UNet2DModel

    try:
        return dict(UNet2DModel.load_config(model_id)), dict(DDPMScheduler.load_config(model_id))
    except (OSError, ValueError) as error:
        raise unavailable(model_id, "base DDPM", config_key, error) from error


# ---------------------------------------------------------------- Stable Diffusion (diffusers layout, by component)

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class StableDiffusionParts:
    """The parts of a diffusers Stable Diffusion folder that fine-tuning uses (no safety checker, no pipeline)."""

    unet: nn.Module  # UNet2DConditionModel: the policy network
    vae: nn.Module  # AutoencoderKL: latents -> images before the reward
    text_encoder: nn.Module  # CLIPTextModel: prompts -> the context (encoder hidden states)
    tokenizer: object  # CLIPTokenizer
    scheduler_config: dict


def load_stable_diffusion(model_id: str, config_key: str = "env.base_model") -> StableDiffusionParts:
    """Each component from its subfolder of `model_id` (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def part(cls, subfolder: str, **kwargs):
        what = f"Stable Diffusion {subfolder}"
        return from_pretrained(cls, model_id, what, config_key, subfolder=subfolder, **kwargs)

    return StableDiffusionParts(
        unet=part(UNet2DConditionModel, "unet"),
        vae=part(AutoencoderKL, "vae"),
        text_encoder=part(CLIPTextModel, "text_encoder"),
        tokenizer=part(CLIPTokenizer, "tokenizer"),
        scheduler_config=dict(part(DDIMScheduler, "scheduler").config),
    )


def check_base_model(env_cfg: dict, config_key: str = "env.base_model") -> None:
    """The cheap availability check of the env's base model, for the driver before Ray starts."""
    spec = env_cfg["base_model"]
    if spec is None:
        raise ValueError(f"env={env_cfg['name']} needs a base model: set {config_key}=<Hub id or folder>")
    if str(spec).startswith("builtin:"):
        return  # the shipped weights; their loader explains how to rebuild them
    if is_stable_diffusion(env_cfg):
        for subfolder in SD_COMPONENTS:
            name = "tokenizer_config.json" if subfolder == "tokenizer" else (
                "scheduler_config.json" if subfolder == "scheduler" else "config.json")  # fmt: skip
            check_available(spec, name, f"Stable Diffusion {subfolder}", config_key, subfolder=subfolder)
    else:
        check_available(spec, "config.json", "base DDPM", config_key)
        check_available(spec, "scheduler_config.json", "base DDPM's scheduler", config_key)


# ---------------------------------------------------------------- image preprocessing for transformers backbones


class ImagePreprocess(nn.Module):
    """Differentiable torch version of a transformers image processor: [-1, 1] images -> normalised pixels.

    Resize (bicubic, antialiased) so the shorter side is `size` (or to `height x width`), centre-crop, and
    normalise with the processor's mean and std, so gradients reach the images (DRaFT, Adjoint Matching).
    """

    def __init__(self, processor) -> None:
        super().__init__()
        size = processor.size
        self.shortest_edge = size.get("shortest_edge")
        self.resize_to = None if self.shortest_edge else (size["height"], size["width"])
        crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
        self.crop = (crop["height"], crop["width"]) if crop else None
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().clamp(-1, 1) + 1) / 2  # [B, C, H, W] in [0, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB, as PIL's convert("RGB") does
        if self.resize_to is None:
            h, w = x.shape[-2:]
            scale = self.shortest_edge / min(h, w)
            target = (max(self.shortest_edge, round(h * scale)), max(self.shortest_edge, round(w * scale)))
        else:
            target = self.resize_to
        if tuple(x.shape[-2:]) != tuple(target):
            x = nn.functional.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
        if self.crop:
            top, left = (x.shape[-2] - self.crop[0]) // 2, (x.shape[-1] - self.crop[1]) // 2
            x = x[..., top : top + self.crop[0], left : left + self.crop[1]]
        return (x - self.mean) / self.std
