"""An independent judge of digit samples: an MLP on the raw pixels, trained on the held-out split only.

Why it exists: the digits reward is log p(target | x) under the CNN `DigitClassifier` (envs/digits.py). A fine-tune
that follows that classifier's gradients (DRaFT) learns to fool it: 8s, 9s and 5s get scored as confident 3s. So
evaluations judge the final samples with a second classifier that the update never saw.

How it is independent of the reward classifier:
  - another family: a multilayer perceptron on the 256 flattened pixels, no convolutions, so it does not share the
    CNN's inductive bias, and few of the images that fool the CNN fool it too (tests/test_judge.py);
  - disjoint data: it trains only on the "heldout" split, the reward classifier only on "train"; the judge's quality
    is therefore measured on "train", which it never saw.

It trains with the same light augmentation as the reward classifier (small shifts and pixel noise), so imperfect
samples are judged sensibly. The shipped weights are rebuilt with
`python -m rlft.pretrain env=digits pretrain.models=[judge]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rlft.core.spec import knob
from rlft.envs.digits import ASSETS, IMAGE_SIZE, NUM_CLASSES, load_digits
from rlft.envs.rewards import Accepts, Reward, RewardConfig, register_reward

JUDGE_PATH = ASSETS / "digit_judge.safetensors"
HIDDEN = 128
DROPOUT = 0.3
REBUILD_COMMAND = "python -m rlft.pretrain env=digits pretrain.models=[judge]"


class DigitJudge(nn.Module):
    """An MLP on 16x16 digits in [-1, 1]: flattened pixels -> 128 -> 128 -> 10 logits (no convolutions).

    Dropout on the pixels and the first hidden layer (training only) keeps any few pixels from deciding the class;
    with it, fewer of the images that fool the reward classifier also fool the judge.
    """

    def __init__(self, hidden: int = HIDDEN, dropout: float = DROPOUT) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(IMAGE_SIZE * IMAGE_SIZE, hidden), nn.SiLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )  # fmt: skip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # logits [B, 10]


def load_judge(path: str | Path = JUDGE_PATH, device: str | torch.device = "cpu") -> DigitJudge:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"digit judge weights not found at {path}; train them with `{REBUILD_COMMAND}`")
    model = DigitJudge()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to one pixel in each direction and add pixel noise, like the reward classifier's."""
    # per image (not per batch as in rlft/pretrain.py): an MLP has no built-in shift tolerance, so it needs more variety
    shifts = torch.randint(-1, 2, (len(images), 2), generator=generator)
    pixels = torch.arange(IMAGE_SIZE)
    rows = (pixels - shifts[:, :1]) % IMAGE_SIZE  # [B, 16]: torch.roll's wrap-around, one gather for the whole batch
    cols = (pixels - shifts[:, 1:]) % IMAGE_SIZE
    batch = torch.arange(len(images))[:, None, None]
    shifted = images[:, 0][batch, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
    return shifted + 0.1 * torch.randn(images.shape, generator=generator)


@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Class probabilities [N, 10] of `model` for images [N, 1, 16, 16], on the model's device, returned on CPU."""
    device = next(model.parameters()).device
    return torch.cat([F.softmax(model(x.to(device)), dim=1).cpu() for x in images.split(batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict_probs(model, images).argmax(1) == labels).float().mean().item()


def fit_judge(
    images: torch.Tensor, labels: torch.Tensor, seed: int, epochs: int, lr: float, device: str | torch.device
) -> DigitJudge:
    """Minibatch AdamW on augmented images; the initialisation, batch order and augmentation all come from `seed`."""
    torch.manual_seed(seed)
    model = DigitJudge().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    # a cosine decay to zero: the last epochs settle the weights, so the result does not hinge on the final batch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=generator).split(64):
            x = augment(images[idx], generator)
            loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
    return model.eval()


def train_judge(
    out_path: str | Path = JUDGE_PATH, seed: int = 0, epochs: int = 200, lr: float = 3e-3, device: str = "cpu"
) -> dict:
    """Train the judge on the "heldout" split, save it as safetensors, and return its accuracy on "train" (unseen).

    Seeded and single-threaded on CPU, so a rerun on the same kind of machine reproduces the weights bit for bit.
    """
    from safetensors.torch import save_file

    fit_x, fit_y = load_digits("heldout")  # the judge's only training data: disjoint from the reward classifier's
    test_x, test_y = load_digits("train")
    threads = torch.get_num_threads()
    # one thread: the matrices are tiny, so more threads only add overhead (they stall on a busy machine), and the
    # float summation order, hence the weights, no longer depends on the machine's core count
    torch.set_num_threads(1)
    try:
        model = fit_judge(fit_x, fit_y, seed, epochs, lr, device)
    finally:
        torch.set_num_threads(threads)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, str(out_path))
    return {
        "train_accuracy": accuracy(model, test_x, test_y),  # unseen data: the judge's real quality
        "heldout_accuracy": accuracy(model, fit_x, fit_y),  # its own training data: a fit check only
        "path": str(out_path),
    }


def judge_metrics(images: torch.Tensor, target: int, judge: nn.Module | None = None) -> dict:
    """How the judge sees a batch of final samples [N, 1, 16, 16] that were meant to show digit `target`.

    target_fraction: share of samples judged to be `target`; confidence: mean max probability (high while the samples
    still look like some digit, low for noise or blobs); target_prob: mean p(target | x); counts: samples per class.
    """
    judge = load_judge() if judge is None else judge
    # final samples are shown and saved clamped to [-1, 1]; judge what is shown, not values the data never take
    probs = predict_probs(judge, images.detach().float().clamp(-1, 1))
    predicted = probs.argmax(1)
    return {
        "target_fraction": (predicted == target).float().mean().item(),
        "confidence": probs.max(1).values.mean().item(),
        "target_prob": probs[:, target].mean().item(),
        "counts": torch.bincount(predicted, minlength=NUM_CLASSES).tolist(),
    }


def within_target_diversity(images: torch.Tensor, predicted: torch.Tensor, target: int) -> float:
    """Mean pairwise pixel distance among the samples judged to be `target` (nan with fewer than two): a collapse to
    one image of the class shows here even when the fraction of the class is high."""
    members = images[predicted == target].flatten(1).double()
    return torch.pdist(members).mean().item() if len(members) > 1 else float("nan")


@register_reward
@dataclass
class DigitJudgeReward(RewardConfig):
    """The independent judge of digit samples as a score: log p(target | x) under the judge (an MLP on the held-out
    split, not the reward's CNN). It is the digits envs' evaluation judge; as a training reward it is differentiable
    too, and then the reward classifier can judge it."""

    name: str = knob("digit_judge", "reward registry key (reward=<name>, judge=<name>)")
    target: int = knob(3, "the digit class the fine-tuned model should draw", ge=0, le=NUM_CLASSES - 1)

    def accepts(self) -> Accepts:
        return Accepts(channels=(1,), sizes=(IMAGE_SIZE, IMAGE_SIZE), differentiable=True)

    def check(self) -> None:
        if not JUDGE_PATH.exists():
            raise FileNotFoundError(f"digit judge weights not found at {JUDGE_PATH}; train them with "
                                    f"`{REBUILD_COMMAND}`")  # fmt: skip

    def build(self, device: str | torch.device = "cpu") -> Reward:
        judge, target = load_judge(device=device), self.target

        def log_prob_target(images: torch.Tensor, **_) -> torch.Tensor:
            return F.log_softmax(judge(images.float()), dim=-1)[:, target]

        @torch.no_grad()
        def describe(images: torch.Tensor, **_) -> dict[str, float]:
            probs = F.softmax(judge(images.float().clamp(-1, 1)), dim=-1)
            predicted = probs.argmax(-1)
            return {
                "target_fraction": (predicted == target).float().mean().item(),
                "confidence": probs.max(-1).values.mean().item(),  # high while the samples still look like digits
                "target_diversity": within_target_diversity(images.float().clamp(-1, 1), predicted, target),
            }

        return Reward(self.name, log_prob_target, True, describe)
