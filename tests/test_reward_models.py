"""Reward models through their real loaders (tiny random CLIP / ViT / BLIP saved to a folder) against hand
computations with the transformers classes."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTForImageClassification

from rlft.envs.models import ImagePreprocess, ModelUnavailableError
from rlft.envs.reward_models import LinearStack
from rlft.envs.rewards import REWARDS, RewardError, make_reward
from tests.tiny_models import (
    save_tiny_age_classifier,
    save_tiny_clip,
    save_tiny_clip_with_tokenizer,
    save_tiny_image_reward,
    save_tiny_pickscore,
)

PROMPTS = ["a cat", "a dog on a hill", "abstract art", "a cat"]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"), image_size=24, projection_dim=16)


@pytest.fixture(scope="module")
def tiny_age(tmp_path_factory):
    return save_tiny_age_classifier(tmp_path_factory.mktemp("age"), image_size=24)


@pytest.fixture(scope="module")
def tiny_clip_pair(tmp_path_factory):
    return save_tiny_clip_with_tokenizer(tmp_path_factory.mktemp("clip_pair"), image_size=24, projection_dim=16)


@pytest.fixture(scope="module")
def tiny_pickscore(tmp_path_factory):
    return save_tiny_pickscore(tmp_path_factory.mktemp("pickscore"), image_size=24, logit_scale=50.0)


@pytest.fixture(scope="module")
def tiny_image_reward(tmp_path_factory):
    return save_tiny_image_reward(tmp_path_factory.mktemp("image_reward"))


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


def linear_stack(x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The LAION / ImageReward MLP by hand: its linear layers in order, no activations."""
    for index in sorted({int(k.split(".")[1]) for k in state}):
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    return x


def gradient_reaches_the_pixels(reward, images: torch.Tensor, **context) -> bool:
    leaf = images.clone().requires_grad_(True)
    reward(leaf, **context).sum().backward()
    return bool(leaf.grad.abs().sum() > 0)


# ---- preprocessing ----
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


# ---- aesthetic ----
def expected_aesthetic(clip_dir, state, pixels) -> torch.Tensor:
    clip = CLIPModel.from_pretrained(clip_dir)
    processor = AutoImageProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        embedding = clip.get_image_features(**processor(images=list(pixels), return_tensors="pt")).pooler_output
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        return linear_stack(embedding, state).squeeze(-1)  # no activations between the layers, as in LAION's


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_aesthetic_score_is_the_head_on_normalised_clip_embeddings(tiny_clip, tmp_path, head):
    state = laion_mlp_state(16) if head == "mlp" else {"weight": torch.randn(1, 16), "bias": torch.randn(1)}
    head_path = tmp_path / "head.pth"
    torch.save(state, head_path)  # the published head is a plain state dict saved with torch.save
    reward = make_reward("aesthetic", clip_model=str(tiny_clip), head_path=str(head_path))
    pixels, images = uint8_images(4, 24, seed=1)
    expected = expected_aesthetic(tiny_clip, state if head == "mlp" else {f"layers.0.{k}": v for k, v in
                                                                          state.items()}, pixels)  # fmt: skip
    torch.testing.assert_close(reward(images), expected, atol=1e-5, rtol=1e-4)
    assert reward.differentiable and reward.features(images).shape == (4, 16)
    assert gradient_reaches_the_pixels(reward, images)  # DRaFT


def test_an_aesthetic_head_loads_from_a_file_or_a_folder(tiny_clip, tmp_path):
    state = laion_mlp_state(16, seed=3)
    pixels, images = uint8_images(3, 24, seed=4)
    expected = expected_aesthetic(tiny_clip, state, pixels)
    (tmp_path / "single").mkdir()  # a folder holding one head, in safetensors
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "single" / "head.safetensors"))
    (tmp_path / "repo").mkdir()  # a downloaded copy of trl-lib/ddpo-aesthetic-predictor: head_file picks the head
    torch.save(state, tmp_path / "repo" / "aesthetic-model.pth")
    torch.save(laion_mlp_state(16, seed=5), tmp_path / "repo" / "another-head.pth")
    torch.save(state, tmp_path / "repo" / "renamed.pth")
    for head_path, head_file in [(tmp_path / "single", "aesthetic-model.pth"), (tmp_path / "repo", None),
                                 (tmp_path / "repo", "renamed.pth"), (tmp_path / "repo" / "renamed.pth", None)]:
        keys = {"head_file": head_file} if head_file else {}
        reward = make_reward("aesthetic", clip_model=str(tiny_clip), head_path=str(head_path), **keys)
        torch.testing.assert_close(reward(images), expected, atol=1e-5, rtol=1e-4)
    REWARDS["aesthetic"](clip_model=str(tiny_clip), head_path=str(tmp_path / "repo")).check()  # passes
    with pytest.raises(ModelUnavailableError, match=r"without missing.pth \(reward.head_file\), and it holds "
                       r"aesthetic-model.pth, another-head.pth, renamed.pth; set reward.head_file="):  # fmt: skip
        make_reward("aesthetic", clip_model=str(tiny_clip), head_path=str(tmp_path / "repo"), head_file="missing.pth")


def test_aesthetic_head_problems_are_named(tiny_clip, tmp_path):
    with pytest.raises(FileNotFoundError, match="reward.head_path=/no/head.pth does not exist"):
        make_reward("aesthetic", clip_model=str(tiny_clip), head_path="/no/head.pth")
    with pytest.raises(FileNotFoundError, match="reward.head_path=/no/head.pth does not exist"):
        REWARDS["aesthetic"](clip_model=str(tiny_clip), head_path="/no/head.pth").check()
    torch.save(laion_mlp_state(768), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="takes 768-d embeddings but .* makes 16-d ones"):
        make_reward("aesthetic", clip_model=str(tiny_clip), head_path=str(tmp_path / "l14.pth"))
    with pytest.raises(ValueError, match="is not an aesthetic head"):
        LinearStack({"fc.weight": torch.zeros(1, 4)}, "odd.pth")
    # a .pth is read with torch.load(weights_only=True): a pickle that needs arbitrary classes is refused
    torch.save({"layers.0.weight": torch.zeros(1, 16), "layers.0.bias": torch.zeros(1), "extra": ValueError("x")},
               tmp_path / "pickled.pth")  # fmt: skip
    with pytest.raises(ValueError, match=r"weights_only=True"):
        make_reward("aesthetic", clip_model=str(tiny_clip), head_path=str(tmp_path / "pickled.pth"))


def test_a_hub_head_offline_names_the_repo_and_the_key(tiny_clip, empty_hf_cache):
    pattern = (r"aesthetic head \(aesthetic-model.pth\) 'trl-lib/ddpo-aesthetic-predictor'.*HF_HUB_OFFLINE"
               r".*reward.head_path=")
    with pytest.raises(ModelUnavailableError, match=pattern):
        REWARDS["aesthetic"](clip_model=str(tiny_clip)).check()  # the default head: TRL's DDPO example's
    with pytest.raises(ModelUnavailableError, match=pattern):
        make_reward("aesthetic", clip_model=str(tiny_clip))
    with pytest.raises(ModelUnavailableError, match=r"\(sac.pth\) 'someone/heads'.*reward.head_path="):
        make_reward("aesthetic", clip_model=str(tiny_clip), head_path="someone/heads", head_file="sac.pth")


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


# ---- over50 / under30 (ddpo-celebahq) ----
# classes of nateraw/vit-age-classifier: 0-2, 3-9, 10-19, 20-29 (indices 0-3, under 30); 50-59, 60-69, more than 70
# (indices 6-8, over 50)
AGE_CLASSES = {"over50": [6, 7, 8], "under30": [0, 1, 2, 3]}


@pytest.mark.parametrize("name", ["over50", "under30"])
def test_age_rewards_sum_the_logits_or_the_probabilities_of_their_classes(tiny_age, name):
    pixels, images = uint8_images(6, 24, seed=2)
    model = ViTForImageClassification.from_pretrained(tiny_age)
    processor = AutoImageProcessor.from_pretrained(tiny_age)
    with torch.no_grad():
        logits = model(**processor(images=list(pixels), return_tensors="pt")).logits
    classes = AGE_CLASSES[name]
    logit_reward = make_reward(name, classifier=str(tiny_age))  # the default: reward.form=logits (the seed's)
    torch.testing.assert_close(logit_reward(images), logits[:, classes].sum(-1), atol=1e-4, rtol=1e-4)
    probability = make_reward(name, classifier=str(tiny_age), form="probability")
    torch.testing.assert_close(probability(images), logits.softmax(-1)[:, classes].sum(-1), atol=1e-5, rtol=1e-4)
    fraction = torch.isin(logits.argmax(-1), torch.tensor(classes)).float().mean().item()
    assert logit_reward.describe(images)["age_class_fraction"] == pytest.approx(fraction)
    assert logit_reward.features(images).shape == (6, 16)  # the CLS state the classifier's head reads
    assert logit_reward.differentiable and gradient_reaches_the_pixels(logit_reward, images)
    assert gradient_reaches_the_pixels(probability, images)


def test_age_ranges_choose_the_classes_and_an_empty_range_is_named(tiny_age):
    _, images = uint8_images(3, 24, seed=3)
    everyone = make_reward("over50", classifier=str(tiny_age), min_age=0, form="probability")
    torch.testing.assert_close(everyone(images), torch.ones(3), atol=1e-5, rtol=0)
    adults = make_reward("over50", classifier=str(tiny_age), min_age=20, form="logits")
    children = make_reward("under30", classifier=str(tiny_age), max_age=20, form="logits")
    everyone_logits = make_reward("over50", classifier=str(tiny_age), min_age=0, form="logits")
    torch.testing.assert_close(adults(images) + children(images), everyone_logits(images), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"reward=over50 reward.min_age=90: .* no age class in that range"):
        make_reward("over50", classifier=str(tiny_age), min_age=90)


# ---- prompt-image rewards: clip_score, pickscore ----
def clip_reference(model_dir, processor_dir, pixels, prompts):
    """CLIP's own path: CLIPProcessor (PIL resizing, the tokenizer) and CLIPModel's forward."""
    model, processor = CLIPModel.from_pretrained(model_dir), CLIPProcessor.from_pretrained(processor_dir)
    with torch.no_grad():
        out = model(**processor(text=prompts, images=list(pixels), padding=True, return_tensors="pt"))
    cosine = (out.image_embeds * out.text_embeds).sum(-1)  # both unit vectors
    return cosine, out.logits_per_image.diagonal(), model.logit_scale.exp().item()


def test_clip_score_is_w_times_the_clipped_cosine_of_clip_embeddings(tiny_clip_pair):
    pixels, images = uint8_images(4, 24, seed=5)
    cosine, _, _ = clip_reference(tiny_clip_pair, tiny_clip_pair, pixels, PROMPTS)
    reward = make_reward("clip_score", clip_model=str(tiny_clip_pair))
    scores = reward(images, prompts=PROMPTS)
    torch.testing.assert_close(scores, 2.5 * cosine.clamp(min=0), atol=1e-5, rtol=1e-4)  # w = 2.5 (Hessel et al.)
    hundred = make_reward("clip_score", clip_model=str(tiny_clip_pair), weight=100.0)  # torchmetrics' scale
    torch.testing.assert_close(hundred(images, prompts=PROMPTS), 100 * cosine.clamp(min=0), atol=1e-3, rtol=1e-4)
    assert reward.describe(images, prompts=PROMPTS)["clip_cosine"] == pytest.approx(cosine.mean().item(), abs=1e-5)
    assert reward.features(images).shape == (4, 16)
    positive = cosine > 0  # max(cos, 0) passes gradients only where the cosine is positive
    prompts = [p for p, keep in zip(PROMPTS, positive, strict=True) if keep]
    assert positive.any() and gradient_reaches_the_pixels(reward, images[positive], prompts=prompts)
    other = reward(images, prompts=["zzz"] * 4)
    assert not torch.allclose(other, scores)  # the prompt matters
    assert REWARDS["clip_score"]().accepts().needs == ("prompts",)
    REWARDS["clip_score"](clip_model=str(tiny_clip_pair)).check()


def test_pickscore_is_the_learned_logit_scale_times_the_cosine(tiny_pickscore):
    model_dir, processor_dir = tiny_pickscore
    pixels, images = uint8_images(4, 24, seed=6)
    cosine, logits, scale = clip_reference(model_dir, processor_dir, pixels, PROMPTS)
    assert scale == pytest.approx(50.0)  # the model's learned scale, not CLIP's initial 1/0.07
    reward = make_reward("pickscore", model=str(model_dir), processor=str(processor_dir))
    scores = reward(images, prompts=PROMPTS)
    torch.testing.assert_close(scores, logits, atol=1e-4, rtol=1e-4)  # = CLIPModel's logits_per_image, per pair
    torch.testing.assert_close(scores, scale * cosine, atol=1e-4, rtol=1e-4)
    # a prompt's score does not depend on the other prompts of the batch (each pair is scored alone)
    torch.testing.assert_close(reward(images[:1], prompts=PROMPTS[:1]), scores[:1], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(reward(images, prompts=["a bird"] * 4), scores)
    assert reward.differentiable and gradient_reaches_the_pixels(reward, images, prompts=PROMPTS)
    assert REWARDS["pickscore"]().accepts().needs == ("prompts",)
    REWARDS["pickscore"](model=str(model_dir), processor=str(processor_dir)).check()


def test_prompt_rewards_need_one_prompt_per_image(tiny_clip_pair):
    reward = make_reward("clip_score", clip_model=str(tiny_clip_pair))
    _, images = uint8_images(2, 24)
    with pytest.raises(RewardError, match=r"reward 'clip_score' scores each image against its prompt; .*prompts="):
        reward(images)
    with pytest.raises(RewardError, match="got 3 prompts for 2 images"):
        reward(images, prompts=["a", "b", "c"])
    torch.testing.assert_close(reward(images, prompts="a cat"), reward(images, prompts=["a cat", "a cat"]))


# ---- image_reward ----
def image_reward_reference(files, pixels, prompts) -> torch.Tensor:
    """ImageReward's score by hand with transformers' BLIP classes: BLIP's image-grounded text encoder's [CLS] state
    (the prompt padded to 35 tokens, attending to all image tokens) through the head, standardised."""
    from transformers import AutoTokenizer, BlipTextModel, BlipVisionModel, CLIPImageProcessor

    vision, text = BlipVisionModel.from_pretrained(files["hf_vision"]), BlipTextModel.from_pretrained(files["hf_text"])
    tokens = AutoTokenizer.from_pretrained(files["tokenizer"])(prompts, padding="max_length", truncation=True,
                                                               max_length=35, return_tensors="pt")  # fmt: skip
    # ImageReward's preprocessing: bicubic resize, centre crop, CLIP's mean and std
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        image_tokens = vision(pixel_values=processor(images=list(pixels), return_tensors="pt").pixel_values)
        hidden = text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                      encoder_hidden_states=image_tokens.last_hidden_state).last_hidden_state[:, 0]  # fmt: skip
        head = torch.load(files["head"], weights_only=True)
        return ((linear_stack(hidden, head) - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


def test_image_reward_is_blips_text_encoder_on_the_image_through_the_head(tiny_image_reward):
    files = tiny_image_reward
    pixels, images = uint8_images(4, 32, seed=7)
    expected = image_reward_reference(files, pixels, PROMPTS)
    reward = make_reward("image_reward", model=str(files["checkpoint"]), tokenizer=str(files["tokenizer"]))
    scores = reward(images, prompts=PROMPTS)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    by_file = make_reward("image_reward", model=str(files["checkpoint"] / "ImageReward.pt"),
                          tokenizer=str(files["tokenizer"]))  # fmt: skip  (med_config.json beside the file)
    torch.testing.assert_close(by_file(images, prompts=PROMPTS), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(reward(images, prompts=["a bird"] * 4), scores)  # the prompt matters
    assert not torch.allclose(reward(images.roll(1, 0), prompts=PROMPTS), scores)  # and the image does
    assert reward.differentiable and gradient_reaches_the_pixels(reward, images, prompts=PROMPTS)
    assert reward.features(images).shape == (4, 128)
    assert REWARDS["image_reward"]().accepts().needs == ("prompts",)
    REWARDS["image_reward"](model=str(files["checkpoint"]), tokenizer=str(files["tokenizer"])).check()


def test_image_reward_checkpoint_problems_are_named(tiny_image_reward, tmp_path):
    (tmp_path / "no_config").mkdir()
    torch.save({}, tmp_path / "no_config" / "ImageReward.pt")
    with pytest.raises(ModelUnavailableError, match=r"reward.model=.*med_config.json is missing"):
        REWARDS["image_reward"](model=str(tmp_path / "no_config")).check()
    (tmp_path / "odd").mkdir()
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "odd" / "ImageReward.pt")
    (tmp_path / "odd" / "med_config.json").write_text((tiny_image_reward["checkpoint"] / "med_config.json").read_text())
    with pytest.raises(ValueError, match="is not an ImageReward checkpoint"):
        make_reward("image_reward", model=str(tmp_path / "odd"), tokenizer=str(tiny_image_reward["tokenizer"]))


# ---- a model that is not to be had ----
@pytest.mark.parametrize(("name", "keys", "model_id", "key"), [
    ("aesthetic", {"head_path": "HEAD"}, "openai/clip-vit-large-patch14", "reward.clip_model"),
    ("over50", {}, "nateraw/vit-age-classifier", "reward.classifier"),
    ("under30", {}, "nateraw/vit-age-classifier", "reward.classifier"),
    ("clip_score", {}, "openai/clip-vit-large-patch14", "reward.clip_model"),
    ("pickscore", {}, "yuvalkirstain/PickScore_v1", "reward.model"),
    ("pickscore", {"model": "PICKSCORE"}, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "reward.processor"),
    ("image_reward", {}, "THUDM/ImageReward", "reward.model"),
    ("image_reward", {"model": "IMAGE_REWARD"}, "bert-base-uncased", "reward.tokenizer"),
])  # fmt: skip
def test_a_missing_reward_model_names_the_id_and_the_key(empty_hf_cache, tmp_path, tiny_pickscore, tiny_image_reward,
                                                          name, keys, model_id, key):  # fmt: skip
    torch.save(laion_mlp_state(16), tmp_path / "head.pth")
    local = {"HEAD": str(tmp_path / "head.pth"), "PICKSCORE": str(tiny_pickscore[0]),
             "IMAGE_REWARD": str(tiny_image_reward["checkpoint"])}  # fmt: skip
    keys = {k: local.get(v, v) for k, v in keys.items()}
    pattern = rf"'{model_id}': it is not a local folder, not in the Hugging Face cache.*{key}="
    with pytest.raises(ModelUnavailableError, match=pattern):
        REWARDS[name](**keys).check()  # before anything runs
    with pytest.raises(ModelUnavailableError, match=pattern):
        make_reward(name, **keys)
