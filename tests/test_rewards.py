"""Rewards: registry, checked outputs, JPEG sizes, the digit classifier."""

import re

import pytest
import torch

from rlft.envs.digits import load_digits
from rlft.envs.rewards import REWARDS, Reward, RewardError, evaluate_reward, make_reward


def test_registry_lists_the_rewards():
    assert {"aesthetic", "digit", "jpeg_compressibility", "jpeg_incompressibility", "over50"} <= set(REWARDS)
    listed = re.escape(", ".join(sorted(REWARDS)))
    with pytest.raises(KeyError, match=f"unknown reward .aesthetics.; registered rewards: {listed}"):
        make_reward("aesthetics")


def test_wrong_shape_names_the_reward_and_the_shapes():
    bad = Reward("broken", lambda images, **context: torch.zeros(len(images), 2), False)
    with pytest.raises(RewardError, match=r"reward 'broken' returned \(4, 2\) for images of shape \(4, 1, 16, 16\)"):
        evaluate_reward(bad, torch.zeros(4, 1, 16, 16), {})


def test_integer_rewards_are_refused():
    bad = Reward("counts", lambda images, **context: torch.zeros(len(images), dtype=torch.int64), False)
    with pytest.raises(RewardError, match="reward 'counts' returned dtype torch.int64"):
        evaluate_reward(bad, torch.zeros(4, 1, 16, 16), {})


def test_non_finite_rewards_are_flagged():
    flaky = Reward("flaky", lambda images, **context: torch.tensor([1.0, float("nan"), float("inf"), 2.0]), False)
    values, finite = evaluate_reward(flaky, torch.zeros(4, 1, 16, 16), {})
    assert finite.tolist() == [True, False, False, True]


def test_jpeg_rewards_rank_noise_and_flat_images():
    flat = torch.zeros(2, 1, 16, 16)
    noise = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = torch.cat([flat, noise])
    compressibility = make_reward("jpeg_compressibility")(images)
    incompressibility = make_reward("jpeg_incompressibility")(images)
    assert (compressibility[:2] > compressibility[2:].max()).all()
    torch.testing.assert_close(incompressibility, -compressibility)
    assert incompressibility[2:].min() > 0.3  # kB


def test_digit_reward_prefers_the_target_and_is_differentiable():
    images, labels = load_digits("heldout")
    reward = make_reward("digit", target=3)
    values = reward(images)
    assert values[labels == 3].mean() > values[labels != 3].mean() + 5  # log-probabilities
    held_out = reward.describe(images[labels == 3])
    assert held_out["target_fraction"] > 0.95
    x = images[:4].clone().requires_grad_(True)
    reward(x).sum().backward()
    assert x.grad.abs().sum() > 0
