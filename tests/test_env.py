"""The denoising MDP: gymnasium registration, the env checker, batching, devices and autograd."""

import gymnasium
import pytest
import rlft.envs  # noqa: F401  (registers rlft/Digits-v0)
import torch
from gymnasium.utils.env_checker import check_env

from rlft.policy import DiffusionPolicy, load_base_model


def test_single_env_passes_gymnasiums_checker():
    env = gymnasium.make("rlft/Digits-v0", num_inference_steps=4)
    check_env(env.unwrapped, skip_render_check=True)


def test_episode_rewards_only_at_the_end_and_then_requires_reset():
    env = gymnasium.make_vec("rlft/Digits-v0", num_envs=3, vectorization_mode="vector_entry_point",
                             num_inference_steps=4)  # fmt: skip
    obs, _ = env.reset(seed=0)
    assert obs["x_t"].shape == (3, 1, 16, 16) and isinstance(obs["x_t"], torch.Tensor)
    assert obs["context"].shape == (3, 0)
    timesteps = [int(obs["timestep"][0])]
    for k in range(4):
        obs, reward, terminated, truncated, info = env.step(torch.zeros(3, 1, 16, 16))
        timesteps.append(int(obs["timestep"][0]))
        assert bool(terminated.all()) == (k == 3) and not truncated.any()
        if k < 3:
            assert torch.equal(reward, torch.zeros(3))
    assert reward.shape == (3,) and (reward < 0).all()  # log-probabilities of the target class
    assert timesteps[:4] == env.unwrapped.schedule.timesteps.tolist()
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(torch.zeros(3, 1, 16, 16))


def test_reset_with_a_seed_is_reproducible_and_a_wrong_action_shape_is_explained():
    env = gymnasium.make_vec("rlft/Digits-v0", num_envs=2, vectorization_mode="vector_entry_point")
    a, _ = env.reset(seed=5)
    a = a["x_t"].clone()
    b, _ = env.reset(seed=5)
    assert torch.equal(a, b["x_t"])
    with pytest.raises(ValueError, match=r"action has shape \(2, 16, 16\); this env expects x_\(t-1\) of shape"):
        env.step(torch.zeros(2, 16, 16))


def test_a_differentiable_action_keeps_the_graph_to_the_reward():
    env = gymnasium.make_vec("rlft/Digits-v0", num_envs=2, vectorization_mode="vector_entry_point",
                             num_inference_steps=2, eta=0.0)  # fmt: skip
    unet, _ = load_base_model("builtin:digits")
    policy = DiffusionPolicy(unet, env.unwrapped.schedule)
    obs, _ = env.reset(seed=0)
    for k in range(2):
        out = policy.step(obs["x_t"], k, obs["context"], noise=torch.zeros_like(obs["x_t"]))
        obs, reward, *_ = env.step(out.prev_sample)
    reward.sum().backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
