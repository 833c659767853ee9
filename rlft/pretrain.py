"""`python -m rlft.pretrain env=digits`: train the embedded default's base DDPM, its flow-matching twin
(env=digits_flow), the digit classifier and the judge.

`python -m rlft.pretrain pretrain.image_folder=DIR pretrain.out_dir=OUT` instead trains a base DDPM on your own
images (rlft/pretrain_folder.py).

The DDPM and the reward classifier train on the fixed training split of `rlft.envs.digits`; the judge (an
independent classifier of another family, rlft/envs/judge.py) on the held-out split only. All are written as
safetensors into the package's assets, so `python -m rlft.run` needs no training and no network.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from tqdm import tqdm

from rlft.core.spec import knob
from rlft.envs import digits

MODELS = ("ddpm", "flow", "classifier", "judge")


@dataclass
class PretrainOptions:
    models: list[str] = knob(list(MODELS), "which digits models to train: ddpm, flow (env=digits_flow), classifier, "
                             "judge",
                             choices=MODELS)  # fmt: skip
    out_dir: str | None = knob(None, "where the weights go; null = the package's shipped assets (rlft/assets)")
    ddpm_steps: int = knob(1500, "optimizer steps for the DDPM", ge=1)
    ddpm_batch_size: int = knob(64, "images per DDPM step", ge=1)
    ddpm_lr: float = knob(2.0e-3, "peak AdamW learning rate (linear warm-up, cosine decay)", gt=0)
    ema_decay: float = knob(0.999, "EMA of the DDPM weights; the EMA copy is what ships", ge=0, lt=1)
    classifier_epochs: int = knob(40, "passes over the training split for the classifier", ge=1)
    classifier_lr: float = knob(2.0e-3, "AdamW learning rate for the classifier", gt=0)
    image_folder: str | None = knob(None, "a folder of images (png, jpg, tif, ...; searched recursively) to train a "
                                    "base DDPM on; null = the digits task")  # fmt: skip
    image_size: int = knob(64, "your images are centre-cropped to a square and resized to this side", ge=4)
    channels: int = knob(3, "1 = grayscale (e.g. microscopy), 3 = RGB", choices=(1, 3))
    block_out_channels: list[int] = knob([64, 128, 128, 256], "UNet widths, one per resolution level (image_size "
                                         "divides by 2^(levels - 1))", ge=1)  # fmt: skip
    attention_levels: list[int] = knob([2], "levels (0 = full resolution) whose blocks have self-attention", ge=0)
    layers_per_block: int = knob(2, "ResNet blocks per level", ge=1)
    norm_num_groups: int = knob(32, "GroupNorm groups (must divide every width)", ge=1)
    beta_schedule: str = knob("squaredcos_cap_v2", "DDPM noise schedule: squaredcos_cap_v2 (cosine) or linear "
                              "(google/ddpm-*)", choices=("squaredcos_cap_v2", "linear"))  # fmt: skip
    hflip: bool = knob(True, "random horizontal flips of your images")
    checkpoint_every: int = knob(500, "steps between resumable checkpoints in out_dir/checkpoint", ge=1)
    resume: bool = knob(True, "continue from out_dir/checkpoint when it exists")


@dataclass
class PretrainSpec:
    seed: int = knob(0, "seed for initialisation and minibatch order", ge=0)
    device: str = knob("auto", "cpu, cuda, cuda:<index> or auto (cuda when one is visible)")
    env: Any = MISSING  # the task whose base models are trained (env=digits)
    pretrain: PretrainOptions = knob(PretrainOptions(), "what to train and how")


def train_ddpm(spec: PretrainSpec, out_dir: Path, device: torch.device) -> None:
    """The shipped digits DDPM: the DDPM objective on the training split, EMA weights saved (no flips: digits)."""
    from rlft.pretrain_folder import fit_ddpm

    images, _ = digits.load_digits("train")  # [N, 1, 16, 16] in [-1, 1]
    fit_ddpm(images, digits.digits_unet_config(), spec, out_dir, device, "digits DDPM", hflip=False, checkpoint=None)
    print(f"saved the digits DDPM (EMA weights) to {out_dir}")


def train_flow(spec: PretrainSpec, out_dir: Path, device: torch.device) -> None:
    """The shipped digits flow-matching model (env=digits_flow): the digits DDPM's UNet architecture trained for
    velocity prediction on the rectified-flow path, on the same training split, EMA weights saved."""
    from rlft.pretrain_folder import fit_ddpm

    images, _ = digits.load_digits("train")
    fit_ddpm(images, digits.digits_unet_config(), spec, out_dir, device, "digits flow", hflip=False, checkpoint=None,
             objective="flow")  # fmt: skip
    print(f"saved the digits flow-matching model (EMA weights) to {out_dir}")


def train_classifier(spec: PretrainSpec, out_path: Path, device: torch.device) -> None:
    from safetensors.torch import save_file

    train_x, train_y = digits.load_digits("train")
    test_x, test_y = digits.load_digits("heldout")
    torch.manual_seed(spec.seed)
    model = digits.DigitClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.pretrain.classifier_lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(spec.seed)
    bar = tqdm(range(spec.pretrain.classifier_epochs), desc="digit classifier", unit="epoch")
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


def train_judge(spec: PretrainSpec, out_path: Path) -> None:
    from rlft.envs.judge import train_judge as fit

    result = fit(out_path, seed=spec.seed)
    print(f"saved the digit judge to {result['path']}: accuracy {result['train_accuracy']:.3f} on the 'train' split "
          f"it never saw ({result['heldout_accuracy']:.3f} on its own 'heldout' training split)")  # fmt: skip


USAGE = "[env=digits] [pretrain.models=[ddpm,classifier,judge]] [pretrain.image_folder=DIR pretrain.out_dir=OUT] ..."


def main(argv: list[str] | None = None) -> None:
    from rlft.config import ConfigError, compose, help_text, resolve_device

    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(help_text("python -m rlft.pretrain", USAGE, "pretrain"))
        return
    try:
        spec = compose(argv, "pretrain")
        device = resolve_device(spec.device)
        if spec.pretrain.image_folder and not spec.pretrain.out_dir:
            raise ConfigError("pretrain.image_folder needs pretrain.out_dir=/path/to/new/model (where the DDPM goes)")
        if not spec.pretrain.image_folder and spec.env.name != "digits":
            raise ConfigError(f"rlft.pretrain trains the embedded digits models, or a DDPM on pretrain.image_folder; "
                              f"got env={spec.env.name}")  # fmt: skip
    except (ConfigError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"rlft: {error}") from None
    if spec.pretrain.image_folder:  # a base DDPM from the user's own images (rlft/pretrain_folder.py)
        from rlft.pretrain_folder import train_folder_ddpm

        train_folder_ddpm(spec, Path(spec.pretrain.out_dir), device)
        return
    out_dir = Path(spec.pretrain.out_dir) if spec.pretrain.out_dir else digits.ASSETS
    if "classifier" in spec.pretrain.models:
        train_classifier(spec, out_dir / digits.CLASSIFIER_PATH.name, device)
    if "judge" in spec.pretrain.models:
        from rlft.envs.judge import JUDGE_PATH

        train_judge(spec, out_dir / JUDGE_PATH.name)
    if "ddpm" in spec.pretrain.models:
        train_ddpm(spec, out_dir / digits.BASE_MODEL_DIR.name, device)
    if "flow" in spec.pretrain.models:
        train_flow(spec, out_dir / digits.FLOW_MODEL_DIR.name, device)


if __name__ == "__main__":
    main()
