"""Oxford Flowers102 ground truths for 4x super-resolution with a user-supplied pretrained DDPM (env=flowers102_sr).

Nothing here downloads: the images must already be under `env.data_root` in torchvision's Flowers102 layout

    <data_root>/flowers-102/jpg/image_00001.jpg ...    the 8,189 photographs
    <data_root>/flowers-102/setid.mat                  trnid / valid / tstid: 1-based image numbers of each split
    <data_root>/flowers-102/imagelabels.mat            the class of every image (unused here)

(`torchvision.datasets.Flowers102(root, download=True)` writes it, on a machine with network). The layout is read
directly, with scipy and Pillow, so torchvision is not needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPLITS = {"train": "trnid", "heldout": "tstid"}  # the h-net trains on train measurements; evaluation uses test


def layout_problem(data_root: str | None) -> str | None:
    folder = Path(data_root).expanduser() / "flowers-102" if data_root else None
    if folder is None or not (folder / "jpg").is_dir() or not (folder / "setid.mat").is_file():
        return (f"Flowers102 images not found under env.data_root={data_root!r}: download them once on a machine "
                "with network (torchvision.datasets.Flowers102(root, split='train', download=True)) and set "
                "env.data_root=root (the folder holding flowers-102/ with jpg/ and setid.mat)")  # fmt: skip
    return None


def flowers102_problems(data_root: str | None) -> list[str]:
    """What is missing for env=flowers102_sr, checked before Ray starts."""
    problem = layout_problem(data_root)
    return [problem] if problem else []


def split_ids(data_root: str, split: str) -> list[int]:
    from scipy.io import loadmat

    ids = loadmat(str(Path(data_root).expanduser() / "flowers-102" / "setid.mat"))[SPLITS[split]]
    return [int(i) for i in ids.reshape(-1)]


def load_image(path: Path, size: int) -> torch.Tensor:
    """[3, size, size] in [-1, 1]: the shorter side resized to `size` (bilinear, antialiased), centre-cropped."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
        image = image.resize((width, height), Image.BILINEAR)
        left, top = (width - size) // 2, (height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1


def load_flowers102(split: str, data_root: str, image_size: int) -> torch.Tensor:
    """Centre-cropped, resized images in [-1, 1], [N, 3, image_size, image_size], of the "train" or "heldout" split."""
    problem = layout_problem(data_root)
    if problem:
        raise FileNotFoundError(problem)
    folder = Path(data_root).expanduser() / "flowers-102" / "jpg"
    paths = [folder / f"image_{i:05d}.jpg" for i in split_ids(data_root, split)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"env.data_root={data_root}: the {split} split lists images that are not in "
                                f"{folder} (e.g. {', '.join(missing[:3])}); download Flowers102 again")  # fmt: skip
    return torch.stack([load_image(path, image_size) for path in paths])
