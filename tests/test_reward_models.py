"""Reward models through their real loaders (tiny random CLIP / ViT saved to a folder) against hand computations."""

import numpy as np
import pytest
import torch
from rlft.envs.models import ImagePreprocess, ModelUnavailableError
from rlft.envs.reward_models import LinearStack
from rlft.envs.rewards import make_reward
from transformers import AutoImageProcessor, CLIPModel, ViTForImageClassification

from tests.tiny_models import save_tiny_age_classifier, save_tiny_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=24, projection_dim=16)


@pytest.fixture(scope="module")
def tiny_age(tmp_path_factory):
    return save_tiny_age_classifier(tmp_path_factory.mktemp("age"), image_size=24)


def uint8_images(n: int, size: int, seed: int = 0, smooth: bool = False) -> tuple[np.ndarray, torch.Tensor]:
    """Random uint8 RGB images and the same images as a [-1, 1] tensor (exactly representable both ways)."""
    generator = torch.Generator().manual_seed(seed)
    if smooth:  # photographs are smooth at the pixel scale; noise is the worst case of any resampling filter
        coarse = torch.rand(n, 3, 5, 5, generator=generator) * 255
        values = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True)
    else:
        values = torch.randint(0, 256, (n, 3, size, size), generator=generator).float()
    pixels = values.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return pixels, torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def laion_mlp_state(dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random head in the layout of sac+logos+ava1-l14-linearMSE.pth (Linear layers at 0, 2, 4, 6, 7)."""
    torch.manual_seed(seed)
    widths = [(0, dim, 32), (2, 32, 16), (4, 16, 8), (6, 8, 4), (7, 4, 1)]
    state = {}
    for index, n_in, n_out in widths:
        layer = torch.nn.Linear(n_in, n_out)
        state[f"layers.{index}.weight"], state[f"layers.{index}.bias"] = layer.weight.data, layer.bias.data
    return state


@pytest.mark.parametrize("size", [24, 40])
def test_torch_preprocessing_matches_the_transformers_processor(tiny_clip, tiny_age, size):
    pixels, images = uint8_images(3, size, smooth=size != 24)
    for folder in (tiny_clip, tiny_age):
        processor = AutoImageProcessor.from_pretrained(folder)
        expected = processor(images=list(pixels), return_tensors="pt").pixel_values
        ours = ImagePreprocess(processor)(images)
        # identical at the model's size; with a resize, PIL rounds the resized image to uint8 (1/255 / std ~ 0.015)
        # and its bicubic filter differs slightly from torch's antialiased one
        torch.testing.assert_close(ours, expected, atol=1e-5 if size == 24 else 0.05, rtol=0)


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_aesthetic_score_is_the_head_on_normalised_clip_embeddings(tiny_clip, tmp_path, head):
    state = laion_mlp_state(16) if head == "mlp" else {"weight": torch.randn(1, 16), "bias": torch.randn(1)}
    head_path = tmp_path / "head.pth"
    torch.save(state, head_path)  # the published head is a plain state dict saved with torch.save
    reward = make_reward("aesthetic", clip_model=str(tiny_clip), head_path=str(head_path))
    pixels, images = uint8_images(4, 24, seed=1)
    clip = CLIPModel.from_pretrained(tiny_clip)
    processor = AutoImageProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        embedding = clip.get_image_features(**processor(images=list(pixels), return_tensors="pt")).pooler_output
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        if head == "mlp":  # no activations between the layers, as in the LAION predictor
            expected = embedding
            for index in (0, 2, 4, 6, 7):
                expected = expected @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
        else:
            expected = embedding @ state["weight"].T + state["bias"]
    torch.testing.assert_close(reward.fn(images, torch.zeros(4, 0)), expected.squeeze(-1), atol=1e-5, rtol=1e-4)
    assert reward.differentiable and reward.features(images).shape == (4, 16)
    leaf = images.clone().requires_grad_(True)
    reward.fn(leaf, torch.zeros(4, 0)).sum().backward()
    assert leaf.grad.abs().sum() > 0  # gradients reach the pixels (DRaFT)


def test_aesthetic_head_problems_are_named(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="reward.head_path="):
        make_reward("aesthetic", clip_model=str(tiny_clip))
    with pytest.raises(FileNotFoundError, match="reward.head_path=/no/head.pth does not exist"):
        make_reward("aesthetic", clip_model=str(tiny_clip), head_path="/no/head.pth")
    torch.save(laion_mlp_state(768), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="takes 768-d embeddings but .* makes 16-d ones"):
        make_reward("aesthetic", clip_model=str(tiny_clip), head_path=str(tmp_path / "l14.pth"))
    with pytest.raises(ValueError, match="is not an aesthetic head"):
        LinearStack({"fc.weight": torch.zeros(1, 4)}, "odd.pth")


def test_a_relu_head_applies_relu_between_its_linear_layers():
    state = {"layers.0.weight": torch.randn(8, 4), "layers.0.bias": torch.randn(8),
             "layers.3.weight": torch.randn(1, 8), "layers.3.bias": torch.randn(1)}  # fmt: skip
    x = torch.randn(5, 4)
    hidden = x @ state["layers.0.weight"].T + state["layers.0.bias"]
    relu = LinearStack(state, "relu.pth", "relu")(x)
    plain = LinearStack(state, "linear.pth")(x)
    torch.testing.assert_close(relu, hidden.relu() @ state["layers.3.weight"].T + state["layers.3.bias"])
    torch.testing.assert_close(plain, hidden @ state["layers.3.weight"].T + state["layers.3.bias"])
    with pytest.raises(ValueError, match="reward.head_activation=gelu"):
        LinearStack(state, "x.pth", "gelu")


def test_over50_is_the_probability_of_the_ages_from_fifty(tiny_age):
    reward = make_reward("over50", classifier=str(tiny_age))
    pixels, images = uint8_images(6, 24, seed=2)
    model = ViTForImageClassification.from_pretrained(tiny_age)
    processor = AutoImageProcessor.from_pretrained(tiny_age)
    with torch.no_grad():
        probs = model(**processor(images=list(pixels), return_tensors="pt")).logits.softmax(-1)
    # classes 6, 7, 8 of nateraw/vit-age-classifier are "50-59", "60-69", "more than 70"
    torch.testing.assert_close(reward.fn(images, torch.zeros(6, 0)), probs[:, 6:].sum(-1), atol=1e-5, rtol=1e-4)
    everyone = make_reward("over50", classifier=str(tiny_age), min_age=0)
    torch.testing.assert_close(everyone.fn(images, torch.zeros(6, 0)), torch.ones(6), atol=1e-5, rtol=0)
    assert reward.describe(images)["over_fraction"] == pytest.approx((probs.argmax(-1) >= 6).float().mean().item())
    with pytest.raises(ValueError, match="min_age=90"):
        make_reward("over50", classifier=str(tiny_age), min_age=90)


def test_a_missing_reward_model_names_the_key(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelUnavailableError, match=r"'openai/clip-vit-large-patch14'.*reward.clip_model="):
        make_reward("aesthetic", head_path=str(tmp_path / "x.pth"))
