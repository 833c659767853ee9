"""Rewards backed by pretrained vision models, loaded through transformers from a Hub id or a folder.

    aesthetic     the LAION aesthetic predictor (Schuhmann et al., "improved aesthetic predictor"; DDPO's aesthetic
                  task): a linear or MLP head on L2-normalised CLIP ViT-L/14 image embeddings
    over50        DDPO on CelebA-HQ (ddpo-celebahq): the ViT age classifier nateraw/vit-age-classifier's evidence for
    under30       the age classes from 50 up (below 30): the sum of their logits, or of their probabilities
    clip_score    CLIPScore (Hessel et al. 2021): 2.5 * max(cos(CLIP image, CLIP prompt), 0)
    pickscore     PickScore (Kirstain et al. 2023): a CLIP-H fine-tuned on Pick-a-Pic preferences, scale * cosine
    image_reward  ImageReward (Xu et al. 2023): BLIP's image-grounded text encoder + an MLP head, standardised
    perceptual    similarity of x_0 to target images through a frozen encoder (DRaFT + a foundation-model encoder)

All are differentiable in the images (the preprocessing is torch, not PIL). clip_score, pickscore and image_reward
score an image against its prompt: they need the env's `prompts`. A missing model stops the run before Ray starts
with the error of `envs.models`, naming the id and how to provide it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rlft.core.spec import knob
from rlft.envs.models import ImagePreprocess, ModelUnavailableError, check_available, from_pretrained, unavailable
from rlft.envs.rewards import Accepts, Reward, RewardConfig, RewardError, register_reward


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


# a Hub repo id: owner/name (a local path that does not exist is not taken for one: it starts with / . or ~, or it
# names a weights file)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")


def resolve_file(spec: str, filename: str, what: str, key: str, file_key: str, revision: str | None = None,
                 suffixes: tuple[str, ...] = WEIGHT_SUFFIXES) -> Path:  # fmt: skip
    """The local path of a weights file that `key=spec` names: a local file; in a local folder, `filename` or else
    its one file ending in `suffixes`; in a Hub repo, `filename` (at `revision`), downloaded with hf_hub_download or
    found in the HF cache. A Hub file that is not to be had raises `envs.models`'s explanatory error."""
    local = Path(spec).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if (local / filename).is_file():
            return local / filename
        found = sorted(p for p in local.iterdir() if p.is_file() and p.suffix in suffixes)
        if len(found) == 1:
            return found[0]
        holds = ", ".join(p.name for p in found) if found else f"no {'/'.join(suffixes)} file"
        raise ModelUnavailableError(f"{key}={spec} is a folder without {filename} ({file_key}), and it holds {holds}; "
                                    f"set {file_key}=<the file's name> or point {key} at the file itself")  # fmt: skip
    if not HUB_ID.fullmatch(spec) or spec.startswith((".", "~")) or local.suffix in suffixes:
        raise FileNotFoundError(f"{key}={spec} does not exist; give the {what} as a file, a folder holding it, or a "
                                f"Hugging Face Hub repo id (with its file name in {file_key})")  # fmt: skip
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=spec, filename=filename, revision=revision))
    except Exception as error:  # offline, unreachable, unknown repo or file: all mean "not available"
        raise unavailable(spec, f"{what} ({filename})", key, error) from error


def load_state(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a torch.save file read with torch.load(weights_only=True)."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # pickles that need more than tensors and containers are refused
        reason = " ".join(str(error).split())[:400]
        raise ValueError(f"cannot read {file} with torch.load(weights_only=True) ({reason}); convert it to a plain "
                         "state dict (or safetensors) on a machine you trust") from None  # fmt: skip
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} does not hold a state dict (a dict of tensors)")
    return state


def load_head(path: str | Path, activation: str | None = None) -> LinearStack:
    """The aesthetic head in a local file: safetensors, or a state dict read with torch.load(weights_only=True)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"reward.head_path={path} does not exist")
    return LinearStack({k: v.float() for k, v in load_state(file).items()}, str(file), activation)


# images a CLIP or ViT backbone scores: RGB (grayscale is expanded to it), at least 16 px a side (it resizes)
BACKBONE_INPUTS = dict(channels=(1, 3), sizes=(16, 4096))


@register_reward
@dataclass
class AestheticReward(RewardConfig):
    """The LAION aesthetic score (about 1-10) of each image: head(clip_embedding / |clip_embedding|).

    The LAION-Aesthetics predictor (Schuhmann et al. 2022, github.com/christophschuhmann/improved-aesthetic-
    predictor), as DDPO's aesthetic task uses it (Black et al. 2023). The default head is the one of TRL's DDPO
    example (trl-lib/ddpo-aesthetic-predictor, aesthetic-model.pth: the sac+logos+ava1-l14-linearMSE MLP).
    """

    name: str = knob("aesthetic", "reward registry key (reward=<name>)")
    clip_model: str = knob("openai/clip-vit-large-patch14", "CLIP Hub id or folder (CLIPModel + image processor)")
    head_path: str = knob("trl-lib/ddpo-aesthetic-predictor", "the head (linear or MLP): a .pth/.safetensors file, a "
                          "folder holding one, or a Hub repo id")  # fmt: skip
    head_file: str = knob("aesthetic-model.pth", "the head's file name in a head_path folder or Hub repo")
    head_activation: str | None = knob(None, "null for the linearMSE heads (no activations), relu for the reluMSE "
                                       "heads", choices=("relu",))  # fmt: skip
    head_revision: str | None = knob(None, "Hub revision (branch, tag or commit) that a Hub head_path is pinned to")
    revision: str | None = knob(None, "Hub revision (branch, tag or commit) that clip_model is pinned to")

    def accepts(self) -> Accepts:
        return Accepts(**BACKBONE_INPUTS, differentiable=True)

    def head_file_path(self) -> Path:
        return resolve_file(self.head_path, self.head_file, "LAION aesthetic head", "reward.head_path",
                            "reward.head_file", self.head_revision)  # fmt: skip

    def check(self) -> None:
        self.head_file_path()  # a local file, or the small head file fetched into (or found in) the HF cache
        check_available(self.clip_model, "config.json", "CLIP model of the aesthetic reward", "reward.clip_model",
                        revision=self.revision)  # fmt: skip

    def build(self, device: str | torch.device = "cpu") -> Reward:
        from transformers import AutoImageProcessor, CLIPModel

        head_file = self.head_file_path()
        head = load_head(head_file, self.head_activation).to(device).eval().requires_grad_(False)
        clip = from_pretrained(CLIPModel, self.clip_model, "CLIP model of the aesthetic reward", "reward.clip_model",
                               self.revision)  # fmt: skip
        processor = from_pretrained(AutoImageProcessor, self.clip_model, "CLIP image processor", "reward.clip_model",
                                    self.revision)  # fmt: skip
        clip = clip.to(device).eval().requires_grad_(False)
        if head.in_features != clip.config.projection_dim:
            raise ValueError(
                f"the aesthetic head {head_file} takes {head.in_features}-d embeddings but {self.clip_model} "
                f"makes {clip.config.projection_dim}-d ones; use the CLIP the head was trained on (ViT-L/14: 768-d)"
            )
        preprocess = ImagePreprocess(processor).to(device)

        def embed(images: torch.Tensor) -> torch.Tensor:
            features = _image_features(clip.get_image_features(pixel_values=preprocess(images)))
            return features / features.norm(dim=-1, keepdim=True)  # [B, 768]

        def score(images: torch.Tensor, **_) -> torch.Tensor:
            return head(embed(images)).squeeze(-1)

        @torch.no_grad()
        def features(images: torch.Tensor) -> torch.Tensor:
            return embed(images)

        return Reward(self.name, score, True, features=features)


def age_lower_bounds(id2label: dict) -> dict[int, int]:
    """Class index -> the first age in its label ("50-59" -> 50, "more than 70" -> 70)."""
    bounds = {}
    for index, label in id2label.items():
        numbers = re.findall(r"\d+", str(label))
        if not numbers:
            raise ValueError(f"age class {index} has the label {label!r}, which names no age")
        bounds[int(index)] = int(numbers[0])
    return bounds


@dataclass
class AgeClassReward(RewardConfig):
    """The age classifier's evidence for some of its age classes: the sum of their logits or probabilities."""

    classifier: str = knob("nateraw/vit-age-classifier", "Hub id or folder (ViTForImageClassification + processor)")
    form: str = knob("logits", "the sum of the chosen classes' logits (ddpo-celebahq's definition) or probabilities",
                     choices=("logits", "probability"))  # fmt: skip
    revision: str | None = knob(None, "Hub revision (branch, tag or commit) that the classifier is pinned to")

    def chosen(self, bounds: dict[int, int]) -> list[int]:
        """The class indices that count, from each class's first age."""
        raise NotImplementedError

    def range_key(self) -> str:
        """The key that sets the age range, as key=value (for errors)."""
        raise NotImplementedError

    def accepts(self) -> Accepts:
        return Accepts(**BACKBONE_INPUTS, differentiable=True)

    def check(self) -> None:
        check_available(self.classifier, "config.json", f"age classifier of the {self.name} reward",
                        "reward.classifier", revision=self.revision)  # fmt: skip

    def build(self, device: str | torch.device = "cpu") -> Reward:
        from transformers import AutoImageProcessor, ViTForImageClassification

        what = f"age classifier of the {self.name} reward"
        model = from_pretrained(ViTForImageClassification, self.classifier, what, "reward.classifier", self.revision)
        processor = from_pretrained(AutoImageProcessor, self.classifier, "age classifier's image processor",
                                    "reward.classifier", self.revision)  # fmt: skip
        model = model.to(device).eval().requires_grad_(False)
        preprocess = ImagePreprocess(processor).to(device)
        bounds = age_lower_bounds(model.config.id2label)
        chosen = self.chosen(bounds)
        if not chosen:
            raise ValueError(f"reward={self.name} {self.range_key()}: the classifier {self.classifier} has no age "
                             f"class in that range (its classes start at {sorted(set(bounds.values()))})")
        classes, form = torch.tensor(chosen, device=device), self.form

        def logits(images: torch.Tensor) -> torch.Tensor:
            return model(pixel_values=preprocess(images)).logits.float()  # [B, num_classes]

        def score(images: torch.Tensor, **_) -> torch.Tensor:
            values = logits(images)
            return (values if form == "logits" else values.softmax(dim=-1))[:, classes].sum(dim=-1)

        @torch.no_grad()
        def describe(images: torch.Tensor, **_) -> dict[str, float]:
            predicted = logits(images).argmax(dim=-1)
            return {"age_class_fraction": torch.isin(predicted, classes).float().mean().item()}

        @torch.no_grad()
        def features(images: torch.Tensor) -> torch.Tensor:
            return model.vit(pixel_values=preprocess(images)).last_hidden_state[:, 0]  # the CLS state the head reads

        return Reward(self.name, score, True, describe, features)


@register_reward
@dataclass
class Over50Reward(AgeClassReward):
    """OVER50 of ddpo-celebahq (DDPO, Black et al. 2023, fine-tuned on CelebA-HQ): the age classifier's classes whose
    label starts at `min_age` or above (50-59, 60-69, more than 70)."""

    name: str = knob("over50", "reward registry key (reward=<name>)")
    min_age: int = knob(50, "classes whose label starts at this age or above count", ge=0)

    def chosen(self, bounds: dict[int, int]) -> list[int]:
        return [i for i, age in sorted(bounds.items()) if age >= self.min_age]

    def range_key(self) -> str:
        return f"reward.min_age={self.min_age}"


@register_reward
@dataclass
class Under30Reward(AgeClassReward):
    """UNDER30 of ddpo-celebahq (DDPO, Black et al. 2023, fine-tuned on CelebA-HQ): the age classifier's classes
    whose label starts below `max_age` (0-2, 3-9, 10-19, 20-29)."""

    name: str = knob("under30", "reward registry key (reward=<name>)")
    max_age: int = knob(30, "classes whose label starts below this age count", ge=1)

    def chosen(self, bounds: dict[int, int]) -> list[int]:
        return [i for i, age in sorted(bounds.items()) if age < self.max_age]

    def range_key(self) -> str:
        return f"reward.max_age={self.max_age}"


# ---- prompt-image rewards: CLIPScore, PickScore, ImageReward ----
PROMPT_INPUTS = dict(**BACKBONE_INPUTS, needs=("prompts",), differentiable=True)


def prompts_for(images: torch.Tensor, prompts, name: str) -> list[str]:
    """The batch's prompts, one per image (a single string is every image's prompt)."""
    if prompts is None:
        raise RewardError(f"reward {name!r} scores each image against its prompt; call it as reward(images, "
                          "prompts=[...]) with one prompt per image (a text-to-image env passes them)")  # fmt: skip
    prompts = [prompts] * images.shape[0] if isinstance(prompts, str) else [str(p) for p in prompts]
    if len(prompts) != images.shape[0]:
        raise RewardError(f"reward {name!r} got {len(prompts)} prompts for {images.shape[0]} images")
    return prompts


class ClipPair(nn.Module):
    """A frozen CLIPModel with its tokenizer and a torch image preprocessing: unit image embeddings (differentiable
    in the images) and unit prompt embeddings (no gradient; cached per prompt, as prompts repeat)."""

    CACHE = 4096  # prompt embeddings kept; the cache is emptied when it is full

    def __init__(self, model_id: str, processor_id: str, what: str, model_key: str, processor_key: str,
                 revision: str | None, processor_revision: str | None) -> None:  # fmt: skip
        super().__init__()
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.clip = from_pretrained(CLIPModel, model_id, what, model_key, revision).eval().requires_grad_(False)
        self.tokenizer = from_pretrained(AutoTokenizer, processor_id, f"tokenizer of the {what}", processor_key,
                                         processor_revision)  # fmt: skip
        processor = from_pretrained(AutoImageProcessor, processor_id, f"image processor of the {what}",
                                    processor_key, processor_revision)  # fmt: skip
        self.preprocess = ImagePreprocess(processor)
        self.max_length = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        self.cache: dict[str, torch.Tensor] = {}

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        features = _image_features(self.clip.get_image_features(pixel_values=self.preprocess(images))).float()
        return F.normalize(features, dim=-1)  # [B, D]

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if new:
            if len(self.cache) + len(new) > self.CACHE:
                self.cache.clear()
            tokens = self.tokenizer(new, padding=True, truncation=True, max_length=self.max_length,
                                    return_tensors="pt").to(self.preprocess.mean.device)  # fmt: skip
            features = _image_features(self.clip.get_text_features(input_ids=tokens.input_ids,
                                                                   attention_mask=tokens.attention_mask))
            self.cache.update(zip(new, F.normalize(features.float(), dim=-1), strict=True))
        return torch.stack([self.cache[p] for p in prompts])  # [B, D]

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)  # [B]


def clip_pair_reward(name: str, pair: ClipPair, scale: float, clamp: bool, device) -> Reward:
    pair = pair.to(device)

    def score(images: torch.Tensor, prompts=None, **_) -> torch.Tensor:
        cosine = pair.cosine(images, prompts_for(images, prompts, name))
        return scale * (cosine.clamp(min=0) if clamp else cosine)

    @torch.no_grad()
    def describe(images: torch.Tensor, prompts=None, **_) -> dict[str, float]:
        return {"clip_cosine": pair.cosine(images, prompts_for(images, prompts, name)).mean().item()}

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        return pair.image_embeddings(images)

    return Reward(name, score, True, describe, features)


def check_processor(spec: str, what: str, key: str, revision: str | None) -> None:
    """A tokenizer and an image processor: tokenizer_config.json and preprocessor_config.json (or the single
    processor_config.json that transformers 5's processors save)."""
    try:
        check_available(spec, "preprocessor_config.json", what, key, revision=revision)
    except ModelUnavailableError as error:
        try:
            check_available(spec, "processor_config.json", what, key, revision=revision)
        except ModelUnavailableError:
            raise error from None
    check_available(spec, "tokenizer_config.json", what, key, revision=revision)


@register_reward
@dataclass
class ClipScoreReward(RewardConfig):
    """CLIPScore (Hessel et al., "CLIPScore: A Reference-free Evaluation Metric for Image Captioning", EMNLP 2021):
    w * max(cos(E_image, E_prompt), 0) with CLIP's image and text embeddings and w = 2.5 as in the paper (the
    torchmetrics CLIPScore is 100 * the same cosine: set reward.weight=100). Differentiable in the images."""

    name: str = knob("clip_score", "reward registry key (reward=<name>)")
    clip_model: str = knob("openai/clip-vit-large-patch14", "CLIP Hub id or folder (CLIPModel + tokenizer + image "
                           "processor)")  # fmt: skip
    weight: float = knob(2.5, "w in w * max(cos, 0): 2.5 as in the paper, 100 as in torchmetrics", gt=0)
    revision: str | None = knob(None, "Hub revision (branch, tag or commit) that clip_model is pinned to")

    def accepts(self) -> Accepts:
        return Accepts(**PROMPT_INPUTS)

    def check(self) -> None:
        what = "CLIP model of the clip_score reward"
        check_available(self.clip_model, "config.json", what, "reward.clip_model", revision=self.revision)
        check_processor(self.clip_model, f"tokenizer and image processor of the {what}", "reward.clip_model",
                        self.revision)  # fmt: skip

    def build(self, device: str | torch.device = "cpu") -> Reward:
        pair = ClipPair(self.clip_model, self.clip_model, "CLIP model of the clip_score reward", "reward.clip_model",
                        "reward.clip_model", self.revision, self.revision)  # fmt: skip
        return clip_pair_reward(self.name, pair, self.weight, True, device)


@register_reward
@dataclass
class PickScoreReward(RewardConfig):
    """PickScore (Kirstain et al., "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image Generation",
    NeurIPS 2023): a CLIP ViT-H/14 fine-tuned on human preferences; the score is exp(logit_scale) * cos(E_image,
    E_prompt) (about 20-23 for real images; the learned scale is about 100). Differentiable in the images."""

    name: str = knob("pickscore", "reward registry key (reward=<name>)")
    model: str = knob("yuvalkirstain/PickScore_v1", "PickScore CLIPModel: Hub id or folder")
    processor: str = knob("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "Hub id or folder of its tokenizer and image "
                          "processor (those of the CLIP-H it was fine-tuned from)")  # fmt: skip
    revision: str | None = knob(None, "Hub revision (branch, tag or commit) that model is pinned to")
    processor_revision: str | None = knob(None, "Hub revision (branch, tag or commit) that processor is pinned to")

    def accepts(self) -> Accepts:
        return Accepts(**PROMPT_INPUTS)

    def check(self) -> None:
        check_available(self.model, "config.json", "PickScore model", "reward.model", revision=self.revision)
        check_processor(self.processor, "PickScore tokenizer and image processor", "reward.processor",
                        self.processor_revision)  # fmt: skip

    def build(self, device: str | torch.device = "cpu") -> Reward:
        pair = ClipPair(self.model, self.processor, "PickScore model", "reward.model", "reward.processor",
                        self.revision, self.processor_revision)  # fmt: skip
        return clip_pair_reward(self.name, pair, pair.clip.logit_scale.exp().item(), False, device)


# ImageReward standardises its head's output with these statistics (the ImageReward package's mean and std)
IMAGE_REWARD_MEAN, IMAGE_REWARD_STD = 0.16717362830052426, 1.0333394966054072
# BLIP's ViT (ImageReward's visual encoder) -> transformers' BlipVisionModel
BLIP_VISION_KEYS = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
]


def split_image_reward_state(state: dict[str, torch.Tensor], source: str) -> tuple[dict, dict, dict]:
    """ImageReward.pt's state dict (blip.visual_encoder.*, blip.text_encoder.*, mlp.layers.*) -> the state dicts of
    transformers' BlipVisionModel and BlipTextModel, and of the head. Keys it does not use (BLIP's projections for
    contrastive training, the position_ids buffer) are left out; an unknown visual-encoder key is an error."""
    vision, text, head = {}, {}, {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith("blip.visual_encoder."):
            rest = key.removeprefix("blip.visual_encoder.")
            for pattern, target in BLIP_VISION_KEYS:
                if re.fullmatch(pattern, rest):
                    vision[re.sub(pattern, target, rest)] = value.float()
                    break
            else:
                raise ValueError(f"{source}: unknown key {key} of BLIP's visual encoder")
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            text[key.removeprefix("blip.text_encoder.")] = value.float()  # BLIP's med BERT = BlipTextModel's names
        elif key.startswith("mlp."):
            head[key.removeprefix("mlp.")] = value.float()
    if not vision or not text or not head:
        raise ValueError(f"{source} is not an ImageReward checkpoint: it needs blip.visual_encoder.*, "
                         f"blip.text_encoder.* and mlp.layers.* keys; got {sorted(state)[:6]}")  # fmt: skip
    return vision, text, head


def blip_configs(vision: dict[str, torch.Tensor], med: dict):
    """BlipVisionConfig and BlipTextConfig for the checkpoint: the ViT's sizes from its weights (BLIP's ViTs have
    64-d attention heads and LayerNorm eps 1e-6), the BERT's from ImageReward's med_config.json."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width, _, patch, _ = vision["embeddings.patch_embedding.weight"].shape
    tokens = vision["embeddings.position_embedding"].shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"ImageReward's ViT has {tokens} patch positions, which is no square grid")
    depth = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
    vision_config = BlipVisionConfig(
        hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth, num_attention_heads=max(1, width // 64), image_size=side * patch, patch_size=patch,
        layer_norm_eps=1e-6, hidden_act="gelu",
    )  # fmt: skip
    # is_decoder=True builds the cross-attention layers; BlipTextModel's call is still bidirectional
    text_config = BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], encoder_hidden_size=width,
        intermediate_size=med["intermediate_size"], num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"], max_position_embeddings=med["max_position_embeddings"],
        layer_norm_eps=med.get("layer_norm_eps", 1e-12), hidden_act=med.get("hidden_act", "gelu"),
        pad_token_id=med.get("pad_token_id", 0), bos_token_id=None, sep_token_id=None, is_decoder=True,
    )  # fmt: skip
    return vision_config, text_config


class ImageRewardModel(nn.Module):
    """ImageReward in transformers' BLIP classes: the prompt's [CLS] state of BLIP's text encoder, attending to the
    ViT's image tokens, through the MLP head (linear layers, no activations), standardised."""

    def __init__(self, state: dict[str, torch.Tensor], med: dict, source: str) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        vision_state, text_state, head_state = split_image_reward_state(state, source)
        vision_config, text_config = blip_configs(vision_state, med)
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        for module, part_state, part in ((self.vision, vision_state, "visual encoder"),
                                         (self.text, text_state, "text encoder")):  # fmt: skip
            missing, unexpected = module.load_state_dict(part_state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{source}: BLIP's {part} does not match transformers' BLIP (missing "
                                 f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})")  # fmt: skip
        self.head = LinearStack(head_state, f"{source} (its MLP head)")
        self.image_size = vision_config.image_size

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state  # [B, 1 + patches, width]
        ones = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                           encoder_attention_mask=ones).last_hidden_state[:, 0]  # fmt: skip
        return ((self.head(hidden.float()) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).squeeze(-1)  # [B]


@register_reward
@dataclass
class ImageRewardReward(RewardConfig):
    """ImageReward (Xu et al., "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
    Generation", NeurIPS 2023; the default reward of Adjoint Matching's text-to-image experiments): BLIP (ViT-L/16
    at 224 px + a BERT whose [CLS] state attends to the image) and an MLP head trained on human rankings,
    standardised to mean 0 and std 1 over its training data. Loaded from the published ImageReward.pt (+
    med_config.json) into transformers' BLIP classes: the `image-reward` package is not needed. Differentiable."""

    name: str = knob("image_reward", "reward registry key (reward=<name>)")
    model: str = knob("THUDM/ImageReward", "Hub repo or folder holding the checkpoint and med_config.json, or the "
                      "checkpoint file itself (med_config.json beside it)")  # fmt: skip
    model_file: str = knob("ImageReward.pt", "the checkpoint's file name in a model folder or Hub repo")
    tokenizer: str = knob("bert-base-uncased", "Hub id or folder of BLIP's BERT tokenizer")
    max_prompt_tokens: int = knob(35, "prompts are padded / truncated to this many tokens (35 in ImageReward)", ge=2)
    revision: str | None = knob(None, "Hub revision (branch, tag or commit) that model is pinned to")
    tokenizer_revision: str | None = knob(None, "Hub revision (branch, tag or commit) that tokenizer is pinned to")

    def accepts(self) -> Accepts:
        return Accepts(**PROMPT_INPUTS)

    def med_config_path(self) -> Path:
        local = Path(self.model).expanduser()
        if local.is_file() or local.is_dir():
            path = (local.parent if local.is_file() else local) / "med_config.json"
            if not path.is_file():
                raise ModelUnavailableError(f"reward.model={self.model}: {path} is missing (ImageReward's BERT config, "
                                            "med_config.json of the THUDM/ImageReward repo)")  # fmt: skip
            return path
        return resolve_file(self.model, "med_config.json", "ImageReward model", "reward.model", "reward.model_file",
                            self.revision, suffixes=(".json",))  # fmt: skip

    def check(self) -> None:
        self.med_config_path()  # the small config only; the 1.7 GB checkpoint is fetched when the reward is built
        if Path(self.model).expanduser().is_dir():
            resolve_file(self.model, self.model_file, "ImageReward checkpoint", "reward.model", "reward.model_file")
        check_available(self.tokenizer, "tokenizer_config.json", "ImageReward's BERT tokenizer", "reward.tokenizer",
                        revision=self.tokenizer_revision)  # fmt: skip

    def build(self, device: str | torch.device = "cpu") -> Reward:
        from transformers import AutoTokenizer, CLIPImageProcessor

        med = json.loads(self.med_config_path().read_text())
        checkpoint = resolve_file(self.model, self.model_file, "ImageReward checkpoint", "reward.model",
                                  "reward.model_file", self.revision)  # fmt: skip
        model = ImageRewardModel(load_state(checkpoint), med, str(checkpoint)).to(device).eval().requires_grad_(False)
        tokenizer = from_pretrained(AutoTokenizer, self.tokenizer, "ImageReward's BERT tokenizer", "reward.tokenizer",
                                    self.tokenizer_revision)  # fmt: skip
        if len(tokenizer) > med["vocab_size"]:
            raise ValueError(f"reward.tokenizer={self.tokenizer} has {len(tokenizer)} tokens, more than ImageReward's "
                             f"{med['vocab_size']}; use BLIP's BERT tokenizer (bert-base-uncased)")  # fmt: skip
        side = model.image_size  # ImageReward: bicubic resize of the short side, centre crop, CLIP's mean and std
        preprocess = ImagePreprocess(CLIPImageProcessor(size={"shortest_edge": side},
                                                        crop_size={"height": side, "width": side})).to(device)
        max_tokens, name = self.max_prompt_tokens, self.name

        def score(images: torch.Tensor, prompts=None, **_) -> torch.Tensor:
            tokens = tokenizer(prompts_for(images, prompts, name), padding="max_length", truncation=True,
                               max_length=max_tokens, return_tensors="pt").to(images.device)  # fmt: skip
            return model(preprocess(images), tokens.input_ids, tokens.attention_mask)

        @torch.no_grad()
        def features(images: torch.Tensor) -> torch.Tensor:
            return model.vision(pixel_values=preprocess(images)).pooler_output  # the ViT's normalised [CLS] state

        return Reward(name, score, True, features=features)


# ---- perceptual similarity (DRaFT + STED-FM: similarity of foundation-model embeddings to target images) ----
class HFVisionEncoder(torch.nn.Module):
    """A Hugging Face vision model as an embedding: [B, C, H, W] in [-1, 1] -> [B, D], differentiable.

    Images are resized to the model's input size, given its channel count and normalised with its processor's
    mean and std, all in torch, so gradients reach the pixels. The embedding is the pooled output when the model
    has one, else the mean of its last hidden states over tokens (or space).
    """

    def __init__(self, spec: str, revision: str | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        try:
            self.model = AutoModel.from_pretrained(spec, trust_remote_code=False, revision=revision)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"reward.encoder={spec!r} is neither 'digits_classifier' nor a loadable Hugging Face vision model (a "
                "local folder, or a hub id already in the HF cache; models that need trust_remote_code are refused)"
            ) from error
        config = AutoConfig.from_pretrained(spec, trust_remote_code=False, revision=revision)
        mean, std, size = [0.5], [0.5], getattr(config, "image_size", None)
        try:
            processor = AutoImageProcessor.from_pretrained(spec, trust_remote_code=False, revision=revision)
            mean, std = processor.image_mean, processor.image_std
            size = processor.size.get("height") or processor.size.get("shortest_edge") or size
        except (OSError, ValueError, AttributeError):
            pass  # no processor saved: [-1, 1] inputs as they are, at the config's image size
        self.channels = getattr(config, "num_channels", 3)
        self.size = int(size) if size else None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.float() + 1) / 2  # [B, C, H, W] in [0, 1]
        if pixels.shape[1] != self.channels:
            pixels = pixels.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        if self.size and pixels.shape[-1] != self.size:
            pixels = F.interpolate(pixels, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.model(pixel_values=(pixels - self.mean) / self.std)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.flatten(2).mean(-1)  # [B, D]


class DigitFeatures(torch.nn.Module):
    """The shipped digit classifier's 128-d penultimate features."""

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        from rlft.envs.digits import load_classifier

        self.classifier = load_classifier(device=device)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())


SIMILARITIES = ("cosine", "mse")


def perceptual_reward(
    encoder: torch.nn.Module, targets: torch.Tensor, similarity: str = "cosine", name: str = "perceptual"
) -> Reward:
    """r(x) = mean_j sim(f(x), f(y_j)) over target images y_j, with a frozen encoder f (any torch module).

    sim is the cosine similarity, or minus the mean squared distance between embeddings ("mse").
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"reward.similarity={similarity} is not one of {', '.join(SIMILARITIES)}")
    encoder = encoder.eval().requires_grad_(False)
    with torch.no_grad():
        target_embeddings = encoder(targets).float()  # [M, D]
    if target_embeddings.dim() != 2 or target_embeddings.shape[0] != targets.shape[0]:
        raise ValueError(f"the encoder must map [M, C, H, W] images to [M, D] embeddings, got "
                         f"{tuple(target_embeddings.shape)} for {tuple(targets.shape)}")  # fmt: skip
    unit_targets = F.normalize(target_embeddings, dim=-1)

    def similarity_to_targets(images: torch.Tensor, **_) -> torch.Tensor:
        embeddings = encoder(images).float()  # [B, D]
        if similarity == "cosine":
            return (F.normalize(embeddings, dim=-1) @ unit_targets.T).mean(dim=1)
        return -((embeddings[:, None, :] - target_embeddings[None]) ** 2).mean(dim=(1, 2))

    @torch.no_grad()
    def describe(images: torch.Tensor, **_) -> dict[str, float]:
        return {f"{similarity}_similarity": similarity_to_targets(images).mean().item()}

    return Reward(name, similarity_to_targets, True, describe)


def load_target_images(spec: str, num_targets: int) -> torch.Tensor:
    """ "digits:<class>" (held-out digits of that class) or a safetensors file with an "images" tensor in [-1, 1]."""
    if spec.startswith("digits:"):
        from rlft.envs.digits import NUM_CLASSES, load_digits

        label = int(spec.split(":", 1)[1])
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"reward.targets={spec}: the digit class must lie in 0..{NUM_CLASSES - 1}")
        images, labels = load_digits("heldout")
        return images[labels == label][:num_targets]
    from safetensors.torch import load_file

    try:
        return load_file(spec)["images"].float()[:num_targets]
    except (OSError, KeyError) as error:
        raise FileNotFoundError(
            f"reward.targets={spec!r}: give 'digits:<class>' or a safetensors file with an 'images' tensor "
            "[M, C, H, W] in [-1, 1]"
        ) from error


def load_encoder(spec: str, device: str | torch.device, revision: str | None = None) -> torch.nn.Module:
    """The perceptual reward's frozen encoder: the digit classifier's features, any torch module by import path
    (`package.module:factory`, called without arguments: e.g. a timm model in its own package), or a Hugging Face
    vision model (Hub id or folder)."""
    if spec == "digits_classifier":
        return DigitFeatures(device)
    if ":" in spec:
        from rlft.envs.rewards import import_object

        module = import_object(spec, "reward.encoder")()
        if not isinstance(module, torch.nn.Module):
            raise RewardError(f"reward.encoder={spec!r} returned a {type(module).__name__}, not a torch module")
        return module.to(device)
    return HFVisionEncoder(spec, revision).to(device)


@register_reward
@dataclass
class PerceptualReward(RewardConfig):
    """Perceptual similarity of x_0 to target images through a frozen encoder; differentiable."""

    name: str = knob("perceptual", "reward registry key (reward=<name>)")
    encoder: str = knob("digits_classifier", "digits_classifier (its penultimate features), package.module:factory "
                        "(any torch module, e.g. a timm model), or a Hugging Face vision model id / folder")
    targets: str = knob("digits:3", "digits:<class> (held-out digits of that class) or a safetensors file with "
                        "\"images\" in [-1, 1]")  # fmt: skip
    similarity: str = knob("cosine", "cosine, or mse (minus the mean squared distance between embeddings)",
                           choices=SIMILARITIES)  # fmt: skip
    num_targets: int = knob(64, "at most this many target images", ge=1)
    revision: str | None = knob(None, "Hub revision (branch, tag or commit) that a Hugging Face encoder is pinned to")

    def accepts(self) -> Accepts:
        if self.encoder == "digits_classifier":
            from rlft.envs.digits import IMAGE_SIZE

            return Accepts(channels=(1,), sizes=(IMAGE_SIZE, IMAGE_SIZE), differentiable=True)
        return Accepts(differentiable=True)  # the encoder decides; a mismatch fails when it first scores

    def check(self) -> None:
        if self.encoder != "digits_classifier" and ":" not in self.encoder:
            check_available(self.encoder, "config.json", "vision model of the perceptual reward", "reward.encoder",
                            revision=self.revision)  # fmt: skip

    def build(self, device: str | torch.device = "cpu") -> Reward:
        module = load_encoder(self.encoder, device, self.revision)
        targets = load_target_images(self.targets, self.num_targets).to(device)
        return perceptual_reward(module, targets, self.similarity)
