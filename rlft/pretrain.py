"""`python -m rlft.pretrain env=digits`: train the embedded default's base DDPM and digit classifier.

`python -m rlft.pretrain pretrain.image_folder=DIR pretrain.out_dir=OUT` instead trains a base DDPM on your own
images (rlft/pretrain_folder.py).

Both train on the fixed training split of `envs.digits` (the rest stays held out for evaluations) and are
written as safetensors into the package's assets, so `python -m rlft.run` needs no training and no network.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from rlft.config import compose, resolve_device
from rlft.envs import digits


def train_ddpm(cfg: DictConfig, out_dir: Path, device: torch.device) -> None:
    """The shipped digits DDPM: the DDPM objective on the training split, EMA weights saved (no flips: digits)."""
    from rlft.pretrain_folder import fit_ddpm

    images, _ = digits.load_digits("train")  # [N, 1, 16, 16] in [-1, 1]
    fit_ddpm(images, digits.digits_unet_config(), cfg, out_dir, device, "digits DDPM", hflip=False, checkpoint=None)
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
