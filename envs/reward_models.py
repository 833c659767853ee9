"""Rewards backed by pretrained vision models, loaded through transformers from a Hub id or a folder.

    aesthetic  the LAION aesthetic predictor (Schuhmann et al., "improved aesthetic predictor"; DDPO's aesthetic
               task): a linear or MLP head on L2-normalised CLIP ViT-L/14 image embeddings
    over50     DDPO on CelebA-HQ (ddpo-celebahq): the probability the ViT age classifier
               nateraw/vit-age-classifier gives to the age classes of 50 and over

Both are differentiable in the images (the preprocessing is torch, not PIL). A missing model stops the run
with the error of `envs.models`, naming the id and how to provide it.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from rlft.envs.models import ImagePreprocess, from_pretrained
from rlft.envs.rewards import Reward, register_reward
from torch import nn


def _image_features(output) -> torch.Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding; older versions a tensor
    return output.pooler_output if hasattr(output, "pooler_output") else output


class LinearStack(nn.Module):
    """A stack of linear layers laid out like the saved head (`layers.<i>` or one Linear).

    The LAION heads are such stacks: `layers.{0,2,4,6,7}` (768 -> 1024 -> 128 -> 64 -> 16 -> 1, the gaps are
    dropouts, identities at inference, and there are no activations) or a single linear map (`weight`, `bias`).
    `activation="relu"` puts a ReLU after every linear layer but the last (the "reluMSE" heads).
    """

    def __init__(self, state: dict[str, torch.Tensor], source: str, activation: str | None = None):
        super().__init__()
        keys = set(state)
        if keys == {"weight", "bias"}:
            self.layers = nn.Sequential(nn.Linear(state["weight"].shape[1], state["weight"].shape[0]))
            state = {f"layers.0.{k}": v for k, v in state.items()}
        else:
            indices = sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"layers\.(\d+)\.(weight|bias)", k))})
            if not indices or len(keys) != 2 * len(indices):
                raise ValueError(
                    f"{source} is not an aesthetic head: expected the keys weight/bias (a linear head) or "
                    "layers.<i>.weight/bias (an MLP head, as in sac+logos+ava1-l14-linearMSE.pth); got "
                    f"{sorted(keys)[:6]}"
                )
            layers = [nn.Identity() for _ in range(indices[-1] + 1)]
            for i in indices:
                out_features, in_features = state[f"layers.{i}.weight"].shape
                layers[i] = nn.Linear(in_features, out_features)
            self.layers = nn.Sequential(*layers)
        if activation not in (None, "relu"):
            raise ValueError(f"reward.head_activation={activation}; use null (linearMSE heads) or relu (reluMSE heads)")
        self.activation = activation
        self.load_state_dict(state)

    @property
    def in_features(self) -> int:
        return next(m for m in self.layers if isinstance(m, nn.Linear)).in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        for layer in self.layers:
            x = layer(x)
            if self.activation == "relu" and isinstance(layer, nn.Linear) and layer is not linears[-1]:
                x = torch.relu(x)
        return x


def load_head(path: str, activation: str | None = None) -> LinearStack:
    """The head weights: safetensors, or a plain state dict read with torch.load(weights_only=True)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"reward.head_path={path} does not exist; download the LAION aesthetic head (e.g. "
            "sac+logos+ava1-l14-linearMSE.pth from github.com/christophschuhmann/improved-aesthetic-predictor) "
            "and set reward.head_path=/path/to/it"
        )
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    return LinearStack({k: v.float() for k, v in state.items()}, str(file), activation)


@register_reward("aesthetic")
def aesthetic(
    device: str | torch.device = "cpu",
    clip_model: str = "openai/clip-vit-large-patch14",
    head_path: str | None = None,
    head_activation: str | None = None,
) -> Reward:
    """The LAION aesthetic score (about 1-10) of each image: head(clip_embedding / |clip_embedding|)."""
    from transformers import AutoImageProcessor, CLIPModel

    if head_path is None:
        raise FileNotFoundError(
            "reward=aesthetic needs the weights of the LAION aesthetic head: set reward.head_path=/path/to/"
            "sac+logos+ava1-l14-linearMSE.pth (github.com/christophschuhmann/improved-aesthetic-predictor)"
        )
    clip = from_pretrained(CLIPModel, clip_model, "CLIP model of the aesthetic reward", "reward.clip_model")
    processor = from_pretrained(AutoImageProcessor, clip_model, "CLIP image processor", "reward.clip_model")
    clip = clip.to(device).eval().requires_grad_(False)
    head = load_head(head_path, head_activation).to(device).eval().requires_grad_(False)
    if head.in_features != clip.config.projection_dim:
        raise ValueError(
            f"the aesthetic head {head_path} takes {head.in_features}-d embeddings but {clip_model} makes "
            f"{clip.config.projection_dim}-d ones; use the CLIP the head was trained on (ViT-L/14: 768-d)"
        )
    preprocess = ImagePreprocess(processor).to(device)

    def embed(images: torch.Tensor) -> torch.Tensor:
        features = _image_features(clip.get_image_features(pixel_values=preprocess(images)))
        return features / features.norm(dim=-1, keepdim=True)  # [B, 768]

    def score(images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return head(embed(images)).squeeze(-1)

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return embed(images)

    return Reward("aesthetic", score, True, features=features)


def age_lower_bounds(id2label: dict) -> dict[int, int]:
    """Class index -> the first age in its label ("50-59" -> 50, "more than 70" -> 70)."""
    bounds = {}
    for index, label in id2label.items():
        numbers = re.findall(r"\d+", str(label))
        if not numbers:
            raise ValueError(f"age class {index} has the label {label!r}, which names no age")
        bounds[int(index)] = int(numbers[0])
    return bounds


@register_reward("over50")
def over50(
    device: str | torch.device = "cpu", classifier: str = "nateraw/vit-age-classifier", min_age: int = 50
) -> Reward:
    """The probability the age classifier puts on the classes starting at `min_age` or above."""
    from transformers import AutoImageProcessor, ViTForImageClassification

    model = from_pretrained(ViTForImageClassification, classifier, "age classifier of the over50 reward",
                            "reward.classifier")  # fmt: skip
    processor = from_pretrained(AutoImageProcessor, classifier, "age classifier's image processor", "reward.classifier")
    model = model.to(device).eval().requires_grad_(False)
    preprocess = ImagePreprocess(processor).to(device)
    old = [i for i, age in sorted(age_lower_bounds(model.config.id2label).items()) if age >= min_age]
    if not old:
        raise ValueError(f"reward.min_age={min_age}: the classifier {classifier} has no age class starting that late")
    old_classes = torch.tensor(old, device=device)

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=preprocess(images)).logits.float().softmax(dim=-1)  # [B, num_classes]

    def score(images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return probabilities(images)[:, old_classes].sum(dim=-1)

    @torch.no_grad()
    def describe(images: torch.Tensor) -> dict[str, float]:
        predicted = probabilities(images).argmax(dim=-1)
        return {"over_fraction": torch.isin(predicted, old_classes).float().mean().item()}

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return model.vit(pixel_values=preprocess(images)).last_hidden_state[:, 0]  # the CLS state the head reads

    return Reward("over50", score, True, describe, features)

