"""Oxford Flowers102 ground truths for 4x super-resolution with a user-supplied pretrained DDPM (env=flowers102_sr).

Nothing here downloads: torchvision is imported only when this dataset is used, and the images must already be
under `env.data_root` (torchvision's Flowers102 layout). The error messages say what to provide.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPLITS = {"train": "train", "heldout": "test"}  # the h-net trains on train measurements; evaluation uses test


def check_flowers102(data_root: str | None, base_model: str | None) -> None:
    """Fail early, before Ray starts, when a piece the flowers102 env needs is missing."""
    if not base_model:
        raise FileNotFoundError(
            "env=flowers102_sr needs a pretrained unconditional DDPM on flowers at env.image_size: give a diffusers "
            "folder (config.json, diffusion_pytorch_model.safetensors, scheduler_config.json) with "
            "env.base_model=/path/to/model"
        )
    try:
        import torchvision  # noqa: F401
    except ImportError as error:
        raise FileNotFoundError(
            "env=flowers102_sr reads Oxford Flowers102 through torchvision, which is not installed. Install the "
            "torchvision build that matches your torch (for a CPU torch: pip install torchvision --index-url "
            "https://download.pytorch.org/whl/cpu; the PyPI wheel pins another torch and fails beside it)"
        ) from error
    if not data_root or not (Path(data_root) / "flowers-102" / "jpg").is_dir():
        raise FileNotFoundError(
            f"Flowers102 images not found under env.data_root={data_root!r}: download them once on a machine with "
            "network (torchvision.datasets.Flowers102(root, split='train', download=True)) and set "
            "env.data_root=root (the folder holding flowers-102/)"
        )


def load_flowers102(split: str, data_root: str, image_size: int) -> torch.Tensor:
    """Centre-cropped, resized images in [-1, 1], [N, 3, image_size, image_size]."""
    check_flowers102(data_root, base_model="given")
    from torchvision import datasets, transforms

    transform = transforms.Compose([
        transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
    ])  # fmt: skip
    data = datasets.Flowers102(data_root, split=SPLITS[split], transform=transform, download=False)
    return torch.stack([image for image, _ in data]) * 2 - 1
