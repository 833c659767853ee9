"""The embedded default task: scikit-learn's 8x8 digits, upsampled to 16x16, one channel.

Everything here is offline: the data ship with scikit-learn, and the base DDPM and the digit classifier are
trained by `python -m rlft.pretrain env=digits` and shipped inside the package (`rlft/assets/`).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 16
NUM_CLASSES = 10
TRAIN_FRACTION = 0.8  # the rest of the 1,797 digits is held out for evaluations
SPLIT_SEED = 0  # fixed: the train / held-out split must never change once weights are shipped

ASSETS = Path(str(files("rlft") / "assets"))
BASE_MODEL_DIR = ASSETS / "digits_ddpm"  # diffusers UNet2DModel + DDPMScheduler (save_pretrained layout)
FLOW_MODEL_DIR = ASSETS / "digits_flow"  # UNet2DModel (velocity) + FlowMatchEulerDiscreteScheduler (env=digits_flow)
CLASSIFIER_PATH = ASSETS / "digit_classifier.safetensors"


def load_digits(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as images in [-1, 1] of shape [N, 1, 16, 16] and labels [N], for split "train" or "heldout"."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown digits split {split!r}; use 'train', 'heldout' or 'all'")
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    labels = torch.tensor(data.target, dtype=torch.int64)
    if split == "all":
        return images, labels
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train = int(TRAIN_FRACTION * len(labels))
    chosen = order[:n_train] if split == "train" else order[n_train:]
    return images[chosen], labels[chosen]


def digits_unet_config() -> dict:
    """Architecture of the shipped base model: a 1.1 M-parameter diffusers UNet2DModel."""
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )


class DigitClassifier(nn.Module):
    """A small CNN on 16x16 digits in [-1, 1]; `features` gives the 128-d penultimate embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # -> [32, 8, 8]
            nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # -> [64, 4, 4]
        )  # fmt: skip
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, NUM_CLASSES)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return F.silu(self.fc(self.conv(images).flatten(1)))  # [B, 128]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # logits [B, 10]


def missing_classifier(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"digit classifier weights not found at {path}; train them with "
                             "`python -m rlft.pretrain env=digits pretrain.models=[classifier]`")


def load_classifier(path: str | Path = CLASSIFIER_PATH, device: str | torch.device = "cpu") -> DigitClassifier:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise missing_classifier(path)
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)
