"""The perceptual-similarity reward: the formula by hand, the digit features, a Hugging Face encoder from a folder."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rlft.config import compose, validate
from rlft.envs.digits import load_digits
from rlft.envs.reward_models import perceptual_reward
from rlft.envs.rewards import REWARDS, evaluate_reward, make_reward


def test_cosine_and_mse_match_a_hand_computation_with_any_torch_encoder():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    targets, images = torch.randn(3, 1, 4, 4), torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        e, t = encoder(images), encoder(targets)
    cosine = perceptual_reward(encoder, targets, "cosine")(images)
    expected = torch.stack([torch.stack([F.cosine_similarity(e[i], t[j], dim=0) for j in range(3)]).mean()
                            for i in range(2)])  # fmt: skip
    torch.testing.assert_close(cosine, expected)
    mse = perceptual_reward(encoder, targets, "mse")(images)
    expected = torch.stack([-torch.stack([((e[i] - t[j]) ** 2).mean() for j in range(3)]).mean() for i in range(2)])
    torch.testing.assert_close(mse, expected)
    assert not any(p.requires_grad for p in encoder.parameters())  # the encoder is frozen
    with pytest.raises(ValueError, match="reward.similarity=l1 is not one of cosine, mse"):
        perceptual_reward(encoder, targets, "l1")


def test_digit_features_prefer_the_target_class_and_pass_gradients():
    reward = make_reward("perceptual", targets="digits:3", similarity="cosine", num_targets=32)
    images, labels = load_digits("train")
    threes, sevens = images[labels == 3][:32], images[labels == 7][:32]
    assert reward(threes).mean() > reward(sevens).mean() + 0.1
    pixels = sevens[:4].clone().requires_grad_(True)
    values, finite = evaluate_reward(reward, pixels, {})
    values.sum().backward()
    assert finite.all() and pixels.grad.abs().sum() > 0
    assert reward.describe(threes)["cosine_similarity"] == pytest.approx(reward(threes).mean().item(), abs=1e-5)
    assert REWARDS["perceptual"]().accepts().differentiable
    validate(compose(["algo=draft", "reward=perceptual", "reward.similarity=mse"]))


def test_a_hugging_face_vision_model_loads_from_a_folder_without_remote_code(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=64)  # fmt: skip
    ViTModel(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    targets, _ = load_digits("heldout")
    save_file({"images": targets[:5].contiguous()}, str(tmp_path / "targets.safetensors"))
    reward = make_reward("perceptual", encoder=str(tmp_path / "vit"), targets=str(tmp_path / "targets.safetensors"))
    pixels = torch.randn(3, 1, 16, 16, requires_grad=True)  # grey 16x16 in, resized to 32x32 RGB inside
    values, finite = evaluate_reward(reward, pixels, {})
    values.sum().backward()
    assert values.shape == (3,) and finite.all() and pixels.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="trust_remote_code are refused"):
        make_reward("perceptual", encoder=str(tmp_path / "missing"))
