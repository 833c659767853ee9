"""Pretrained models from a Hugging Face Hub id or a local folder, with an error that says how to provide them.

Every loader here goes through `from_pretrained` of diffusers / transformers (safetensors preferred, `.bin`
files only through their `weights_only=True` loaders, `trust_remote_code` never set). When a model is neither
a local folder nor in the HF cache and the Hub cannot be reached (or HF_HUB_OFFLINE=1), the error names the
model id, the config key that points at it, and the three ways to provide it.

`check_available` is the cheap form used before Ray starts: it fetches (or finds in the cache) one small config
file of the model, so a missing model stops the run in the driver instead of inside a Ray actor; `revision` pins a
Hub model to a branch, tag or commit.
"""

from __future__ import annotations

import os
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


def builtin_models() -> dict:
    """The shipped model folders: builtin:digits (the digits DDPM) and builtin:digits_flow (its flow twin)."""
    from rlft.envs.digits import BASE_MODEL_DIR, FLOW_MODEL_DIR

    return {"builtin:digits": BASE_MODEL_DIR, "builtin:digits_flow": FLOW_MODEL_DIR}


def resolve(model_id: str) -> str:
    """A model spec as diffusers / transformers take it: "builtin:<name>" is a shipped folder."""
    if model_id.startswith("builtin:"):
        builtin = builtin_models()
        if model_id not in builtin:
            raise ModelUnavailableError(f"unknown shipped model {model_id!r}; shipped: {', '.join(builtin)}")
        return str(builtin[model_id])
    return model_id


def check_available(model_id: str, filename: str, what: str, config_key: str, subfolder: str | None = None,
                    revision: str | None = None) -> None:  # fmt: skip
    """Raise `ModelUnavailableError` unless `filename` of `model_id` is in a local folder, the HF cache or the Hub."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        path = local / subfolder / filename if subfolder else local / filename
        if not path.exists():
            raise unavailable(model_id, what, config_key, f"{path} is missing")
        return
    import logging

    from huggingface_hub import hf_hub_download

    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings; the error below says it all
    try:
        hf_hub_download(repo_id=model_id, filename=filename, subfolder=subfolder, revision=revision)
    except Exception as error:  # offline, unreachable, unknown repo, malformed id: all mean "not available"
        raise unavailable(model_id, what, config_key, error) from error


def check_weights(folder: Path, what: str, config_key: str, model_id: str) -> None:
    """A local model folder holds a weights file whose header parses (a missing or truncated file is named here,
    before anything starts, instead of failing inside a worker)."""
    candidates = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    if not candidates:
        raise unavailable(model_id, what, config_key, f"{folder} holds no weights file (*.safetensors or *.bin)")
    for file in candidates:
        if file.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:  # safe_open checks that the header's tensors cover the file exactly: a truncation fails here
                with safe_open(str(file), framework="pt") as weights:
                    weights.keys()
            except (SafetensorError, OSError) as error:
                raise unavailable(model_id, what, config_key, f"{file} is damaged or truncated ({error})") from None


def from_pretrained(cls, model_id: str, what: str, config_key: str, revision: str | None = None, **kwargs):
    """`cls.from_pretrained(model_id, **kwargs)`, with the explanatory error when the files are not to be had."""
    try:
        return cls.from_pretrained(resolve(model_id), revision=revision, **kwargs)
    except (OSError, ValueError) as error:  # what diffusers/transformers raise for missing files or repos
        raise unavailable(model_id, what, config_key, error) from error


# ---------------------------------------------------------------- base DDPMs (google/ddpm-*, rlft.pretrain folders)


def check_ddpm(model_id: str, revision: str | None = None, config_key: str = "env.base_model") -> None:
    """The cheap availability check of a base DDPM, for the driver before Ray starts: its configs (and, for a local
    folder, a readable weights file)."""
    if model_id.startswith("builtin:"):
        folder = Path(resolve(model_id))
        if not (folder / "config.json").exists():
            model = "ddpm" if model_id == "builtin:digits" else "flow"
            raise FileNotFoundError(f"the shipped model {model_id} is missing from {folder}; train it with "
                                    f"`python -m rlft.pretrain env=digits 'pretrain.models=[{model}]'`")  # fmt: skip
        return
    check_available(model_id, "config.json", "base DDPM", config_key, revision=revision)
    check_available(model_id, "scheduler_config.json", "base DDPM's scheduler", config_key, revision=revision)
    if Path(model_id).expanduser().is_dir():
        check_weights(Path(model_id).expanduser(), "base DDPM", config_key, model_id)


def load_ddpm(model_id: str, config_key: str = "env.base_model", revision: str | None = None) -> tuple[nn.Module, dict]:
    """An unconditional base DDPM: (diffusers UNet2DModel, its scheduler config as a dict)."""
    from diffusers import DDPMScheduler, UNet2DModel

    unet = from_pretrained(UNet2DModel, model_id, "base DDPM", config_key, revision)
    scheduler = from_pretrained(DDPMScheduler, model_id, "base DDPM's scheduler", config_key, revision)
    return unet, dict(scheduler.config)


def load_ddpm_configs(model_id: str, revision: str | None = None, config_key: str = "env.base_model",
                      what: str = "base DDPM") -> tuple[dict, dict]:  # fmt: skip
    """The UNet and scheduler configs of a base DDPM (or flow model), without its weights: shapes and noise schedule;
    the scheduler's `_class_name` says which of the two it is."""
    from diffusers import DDPMScheduler, UNet2DModel

    try:
        spec = resolve(model_id)
        return (dict(UNet2DModel.load_config(spec, revision=revision)),
                dict(DDPMScheduler.load_config(spec, revision=revision)))  # fmt: skip
    except (OSError, ValueError) as error:
        raise unavailable(model_id, what, config_key, error) from error


def load_flow_unet(model_id: str, revision: str | None = None, config_key: str = "env.base_model") -> nn.Module:
    """The velocity network (diffusers UNet2DModel) of a pixel-space flow-matching model folder (rlft.pretrain's
    digits_flow layout: config.json, diffusion_pytorch_model.safetensors, scheduler_config.json)."""
    from diffusers import UNet2DModel

    return from_pretrained(UNet2DModel, model_id, "base flow model", config_key, revision)


# ---------------------------------------------------------------- Stable Diffusion (diffusers layout, by component)

SD_COMPONENTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                 "tokenizer": "tokenizer_config.json", "scheduler": "scheduler_config.json"}  # fmt: skip


def check_stable_diffusion(model_id: str, revision: str | None = None, config_key: str = "env.base_model") -> None:
    """Every component's config file (and, for a local folder, the UNet's, VAE's and text encoder's weights)."""
    local = Path(model_id).expanduser()
    if (local / "transformer").is_dir() and not (local / "unet").is_dir():
        raise unavailable(model_id, "Stable Diffusion unet", config_key, "the folder holds transformer/ and no unet/, "
                          "a Stable Diffusion 3 layout: use env=sd35_medium env.base_model=... for it")  # fmt: skip
    for subfolder, filename in SD_COMPONENTS.items():
        what = f"Stable Diffusion {subfolder}"
        check_available(model_id, filename, what, config_key, subfolder=subfolder, revision=revision)
        local = Path(model_id).expanduser() / subfolder
        if local.is_dir() and subfolder in ("unet", "vae", "text_encoder"):
            check_weights(local, what, config_key, model_id)


# SD3 / 3.5: text_encoder_3/ and tokenizer_3/ (T5) are optional, as in diffusers' pipeline
SD3_COMPONENTS = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                  "text_encoder_2": "config.json", "tokenizer": "tokenizer_config.json",
                  "tokenizer_2": "tokenizer_config.json", "scheduler": "scheduler_config.json"}  # fmt: skip


def check_sd3(model_id: str, revision: str | None = None, config_key: str = "env.base_model") -> None:
    """Every required component's config file (and, for a local folder, the weights of the networks)."""
    for subfolder, filename in SD3_COMPONENTS.items():
        what = f"Stable Diffusion 3 {subfolder}"
        check_available(model_id, filename, what, config_key, subfolder=subfolder, revision=revision)
        local = Path(model_id).expanduser() / subfolder
        if local.is_dir() and subfolder in ("transformer", "vae", "text_encoder", "text_encoder_2"):
            check_weights(local, what, config_key, model_id)
    local = Path(model_id).expanduser()
    if local.is_dir() and (local / "text_encoder_3").is_dir() != (local / "tokenizer_3").is_dir():
        raise unavailable(model_id, "Stable Diffusion 3 T5 text encoder", config_key,
                          "text_encoder_3/ and tokenizer_3/ come together: give both, or neither (no T5)")


def sd3_has_t5(model_id: str, revision: str | None = None) -> bool:
    """Whether an SD3 model comes with its T5 text encoder (text_encoder_3/)."""
    try:
        check_available(model_id, "config.json", "T5", "env.base_model", subfolder="text_encoder_3", revision=revision)
    except ModelUnavailableError:
        return False
    return True


def load_sd_config(model_id: str, subfolder: str, revision: str | None = None, config_key: str = "env.base_model",
                   what: str = "Stable Diffusion") -> dict:  # fmt: skip
    """A component's config (vae/config.json, scheduler/scheduler_config.json, ...) without its weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, SD3Transformer2DModel, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
           "scheduler": DDIMScheduler}[subfolder]  # fmt: skip  (any scheduler class reads scheduler_config.json)
    try:
        return dict(cls.load_config(model_id, subfolder=subfolder, revision=revision))
    except (OSError, ValueError) as error:
        raise unavailable(model_id, f"{what} {subfolder}", config_key, error) from error


def load_sd_part(cls, model_id: str, subfolder: str, revision: str | None = None,
                 config_key: str = "env.base_model"):  # fmt: skip
    """One component of a diffusers Stable Diffusion folder (no safety checker, no pipeline)."""
    return from_pretrained(cls, model_id, f"Stable Diffusion {subfolder}", config_key, revision, subfolder=subfolder)


def load_sd_unet(model_id: str, revision: str | None = None) -> nn.Module:
    from diffusers import UNet2DConditionModel

    return load_sd_part(UNet2DConditionModel, model_id, "unet", revision)


def load_sd3_transformer(model_id: str, revision: str | None = None) -> nn.Module:
    from diffusers import SD3Transformer2DModel

    return load_sd_part(SD3Transformer2DModel, model_id, "transformer", revision)


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
