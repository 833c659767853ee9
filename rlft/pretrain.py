"""`python -m rlft.pretrain env=digits`: train the embedded default's base DDPM and digit classifier.

`python -m rlft.pretrain pretrain.image_folder=DIR pretrain.out_dir=OUT` instead trains a base DDPM on your own
images (rlft/pretrain_folder.py).

Both train on the fixed training split of `envs.digits` (the rest stays held out for evaluations) and are
written as safetensors into the package's assets, so `python -m rlft.run` needs no training and no network.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from envs import digits
from rlft.config import compose, resolve_device


def train_ddpm(cfg: DictConfig, out_dir: Path, device: torch.device) -> None:
    from diffusers import DDPMScheduler, UNet2DModel

    images, _ = digits.load_digits("train")
    images = images.to(device)
    unet = UNet2DModel(**digits.digits_unet_config()).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    p = cfg.pretrain
    optimizer = torch.optim.AdamW(unet.parameters(), lr=p.ddpm_lr, weight_decay=0.0)
    warmup = max(1, p.ddpm_steps // 20)

    def lr_factor(step: int) -> float:  # linear warm-up, then cosine to 5% of the peak
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, p.ddpm_steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    bar = tqdm(range(p.ddpm_steps), desc="digits DDPM", unit="step")
    for step in bar:
        idx = torch.randint(0, len(images), (p.ddpm_batch_size,), generator=generator).to(device)
        x0 = images[idx]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator).to(device)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(x_t, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        decay = min(p.ema_decay, (1 + step) / (10 + step))  # short EMA early, so a short run still ships well
        with torch.no_grad():
            for e, w in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(w, 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    ema.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    scheduler.save_pretrained(out_dir)
    print(f"saved the digits DDPM (EMA weights) to {out_dir}")


def train_classifier(cfg: DictConfig, out_path: Path, device: torch.device) -> None:
    from safetensors.torch import save_file

    train_x, train_y = digits.load_digits("train")
    test_x, test_y = digits.load_digits("heldout")
    torch.manual_seed(cfg.seed)
    model = digits.DigitClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain.classifier_lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(cfg.pretrain.classifier_epochs), desc="digit classifier", unit="epoch")
    for _ in bar:
        model.train()
        for idx in torch.randperm(len(train_y), generator=generator).split(64):
            x = train_x[idx]
            # small random shifts and pixel noise, so the classifier also judges imperfect samples sensibly
            x = torch.roll(x, shifts=tuple(torch.randint(-1, 2, (2,), generator=generator).tolist()), dims=(2, 3))
            x = x + 0.1 * torch.randn(x.shape, generator=generator)
            loss = F.cross_entropy(model(x.to(device)), train_y[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(test_x.to(device)).argmax(1).cpu() == test_y).float().mean().item()
        bar.set_postfix(heldout_accuracy=f"{accuracy:.3f}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(out_path))
    print(f"saved the digit classifier (held-out accuracy {accuracy:.3f}) to {out_path}")


def main(argv: list[str] | None = None) -> None:
    cfg = compose("pretrain", sys.argv[1:] if argv is None else argv)
    if cfg.pretrain.image_folder:  # a base DDPM from the user's own images (rlft/pretrain_folder.py)
        from rlft.pretrain_folder import train_folder_ddpm

        if not cfg.pretrain.out_dir:
            raise SystemExit("pretrain.image_folder needs pretrain.out_dir=/path/to/new/model (where the DDPM goes)")
        train_folder_ddpm(cfg, Path(cfg.pretrain.out_dir), resolve_device(cfg.device))
        return
    if cfg.env.name != "digits":
        raise SystemExit(f"rlft.pretrain trains the embedded digits models only; got env={cfg.env.name}")
    device = resolve_device(cfg.device)
    out_dir = Path(cfg.pretrain.out_dir) if cfg.pretrain.out_dir else digits.ASSETS
    unknown = set(cfg.pretrain.models) - {"ddpm", "classifier"}
    if unknown:
        raise SystemExit(f"pretrain.models has unknown entries {sorted(unknown)}; choose from ddpm, classifier")
    if "classifier" in cfg.pretrain.models:
        train_classifier(cfg, out_dir / digits.CLASSIFIER_PATH.name, device)
    if "ddpm" in cfg.pretrain.models:
        train_ddpm(cfg, out_dir / digits.BASE_MODEL_DIR.name, device)


if __name__ == "__main__":
    main()
