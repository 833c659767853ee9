"""`python -m rlft.pretrain pretrain.image_folder=DIR pretrain.out_dir=OUT`: a base DDPM from your own images.

For a domain no public model covers (microscopy, as in DRaFT + STED-FM): train a diffusers UNet2DModel with
the DDPM objective (Ho et al. 2020, eq. 14: ||eps - eps_theta(sqrt(a_t) x_0 + sqrt(1 - a_t) eps, t)||^2) on
the folder's images, keep an EMA of the weights, and write the EMA model + scheduler with save_pretrained into
OUT, so that `python -m rlft.run env=ddpm env.base_model=OUT` fine-tunes it with any algorithm.

Resumable: every `checkpoint_every` steps OUT/checkpoint/ holds the weights, the EMA, the optimizer, the
learning-rate schedule, the random stream and the step (written to a temporary folder, then renamed); a rerun
with the same OUT continues from it, and gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from rlft.checkpoint import due, join_tensors, split_tensors
from rlft.core.flow import noised_sample

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_image_folder(folder: str | Path, size: int, channels: int) -> torch.Tensor:
    """Every image under `folder` (recursively), centre-cropped to a square, resized to `size`: [N, C, size, size]
    uint8 (kept as uint8 in memory; converted to [-1, 1] per batch)."""
    from PIL import Image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrain.image_folder={folder} is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"pretrain.image_folder={folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if channels not in (1, 3):
        raise ValueError(f"pretrain.channels={channels}; use 1 (grayscale) or 3 (RGB)")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for path in tqdm(paths, desc="loading images", unit="image", leave=False):
        with Image.open(path) as image:
            image = image.convert(mode)
            side = min(image.size)
            left, top = (image.width - side) // 2, (image.height - side) // 2
            image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            images.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, channels))
    return torch.stack(images).permute(0, 3, 1, 2).contiguous()  # [N, C, H, W] uint8


def unet_config(p) -> dict:
    """A UNet2DModel for `image_size` x `image_size` x `channels`; attention at the levels in `attention_levels`."""
    levels = len(p.block_out_channels)
    if p.image_size % 2 ** (levels - 1):
        raise ValueError(f"pretrain.image_size={p.image_size} must divide by 2^{levels - 1} "
                         f"(pretrain.block_out_channels has {levels} levels)")  # fmt: skip
    down = ["AttnDownBlock2D" if i in p.attention_levels else "DownBlock2D" for i in range(levels)]
    up = ["AttnUpBlock2D" if levels - 1 - i in p.attention_levels else "UpBlock2D" for i in range(levels)]
    return dict(
        sample_size=p.image_size, in_channels=p.channels, out_channels=p.channels,
        layers_per_block=p.layers_per_block, block_out_channels=tuple(p.block_out_channels),
        down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=p.norm_num_groups,
    )  # fmt: skip


def save_checkpoint(path: Path, unet, ema, optimizer, lr_schedule, generator: torch.Generator, step: int) -> None:
    """Atomically: write into <path>.tmp, fsync the files, then replace <path>."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp / "unet.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
    tensors: dict[str, torch.Tensor] = {}  # the rest as JSON plus its tensors: nothing here is ever unpickled
    state = split_tensors({"optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                           "generator": generator.get_state(), "step": step}, tensors)  # fmt: skip
    save_file(tensors, str(tmp / "training_state.safetensors"))
    (tmp / "training_state.json").write_text(json.dumps(state))
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, unet, ema, optimizer, lr_schedule, generator: torch.Generator) -> int:
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(str(path / "unet.safetensors")))
    ema.load_state_dict(load_file(str(path / "ema.safetensors")))
    state = join_tensors(json.loads((path / "training_state.json").read_text()),
                         load_file(str(path / "training_state.safetensors")))  # fmt: skip
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    generator.set_state(state["generator"])
    return int(state["step"])


def fit_ddpm(images: torch.Tensor, unet_config: dict, cfg, out_dir: Path, device: torch.device,
             desc: str, hflip: bool, checkpoint: Path | None, objective: str = "ddpm") -> None:  # fmt: skip
    """Train a UNet2DModel on `images` ([N, C, H, W], uint8 or floats in [-1, 1]) and save its EMA weights and
    scheduler into `out_dir`; resumable from `checkpoint` when one is given.

    objective="ddpm": epsilon prediction (Ho et al. 2020, eq. 14) under a DDPMScheduler. objective="flow": velocity
    prediction on the rectified-flow path x_t = (1 - t) x_0 + t e, target e - x_0 (Liu et al. 2023; Lipman et al.
    2023), t uniform in (0, 1) and the network reading t * 1000, under a FlowMatchEulerDiscreteScheduler (SD3's)."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DModel

    p = cfg.pretrain
    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(**unet_config).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    if objective == "flow":
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    else:
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=p.beta_schedule, clip_sample=False)
        alphas_cumprod = scheduler.alphas_cumprod.to(device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=p.ddpm_lr, weight_decay=0.0)
    warmup = max(1, p.ddpm_steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 5% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, p.ddpm_steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = 0
    if checkpoint is not None and checkpoint.exists() and p.resume:
        start = load_checkpoint(checkpoint, unet, ema, optimizer, lr_schedule, generator)
        print(f"resuming from {checkpoint} at step {start}")
    to_unit = (lambda x: x.float() / 127.5 - 1) if images.dtype == torch.uint8 else (lambda x: x)
    bar = tqdm(range(start, p.ddpm_steps), initial=start, total=p.ddpm_steps, desc=desc, unit="step")
    for step in bar:
        idx = torch.randint(0, len(images), (p.ddpm_batch_size,), generator=generator)
        x0 = to_unit(images[idx])  # [B, C, H, W] in [-1, 1]
        if hflip:
            flip = torch.rand(len(x0), generator=generator) < 0.5
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
        noise = torch.randn(x0.shape, generator=generator)
        x0, noise = x0.to(device), noise.to(device)
        if objective == "flow":
            t = torch.rand(len(x0), generator=generator).to(device)
            x_t = noised_sample(x0, noise, t)
            loss = F.mse_loss(unet(x_t, t * scheduler.config.num_train_timesteps).sample, noise - x0)
        else:
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(device)
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        decay = min(p.ema_decay, (1 + step) / (10 + step))  # short EMA early, so a short run is still usable
        with torch.no_grad():
            for e, w in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(w, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if checkpoint is not None and due(step + 1, p.checkpoint_every, p.ddpm_steps):
            save_checkpoint(checkpoint, unet, ema, optimizer, lr_schedule, generator, step + 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    ema.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    scheduler.save_pretrained(out_dir)


def train_folder_ddpm(cfg, out_dir: Path, device: torch.device) -> Path:
    p = cfg.pretrain
    images = load_image_folder(p.image_folder, p.image_size, p.channels)
    fit_ddpm(images, unet_config(p), cfg, out_dir, device, "DDPM", p.hflip, out_dir / "checkpoint")
    print(f"saved the base DDPM (EMA weights, {len(images)} training images) to {out_dir}; fine-tune it with "
          f"`python -m rlft.run env=ddpm env.base_model={out_dir}`")  # fmt: skip
    return out_dir
