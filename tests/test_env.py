"""The denoising MDP: gymnasium registration, the env checker, batching, devices and autograd."""

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import rlft.envs  # noqa: F401  (registers rlft/<Task>-v0)
from rlft.envs.denoising import SingleDenoisingEnv
from rlft.envs.models import load_ddpm
from rlft.policy import DiffusionPolicy

JPEG = {"name": "jpeg_compressibility"}
DDPM_PRESETS = ["CelebAHQ", "Church", "CIFAR10", "DDPM"]  # pixel DDPMs; their real base models are Hub downloads
# Flowers102SR is left out: it needs the Oxford Flowers102 images (env.data_root), whose loader is being rewritten


def single_env(task: str, tiny_rgb_ddpm, tiny_sd) -> gymnasium.Env:
    """gymnasium.make of rlft/<task>-v0 with 4 steps, on tiny models where the preset's own is a Hub download."""
    kwargs = {"num_inference_steps": 4}
    if task in DDPM_PRESETS:
        kwargs.update(base_model=str(tiny_rgb_ddpm), reward=JPEG)
    elif task == "SD15":
        kwargs.update(base_model=str(tiny_sd), resolution=32, reward=JPEG)
    return gymnasium.make(f"rlft/{task}-v0", **kwargs)


def test_every_preset_has_a_gymnasium_id():
    registered = {env_id for env_id in gymnasium.registry if env_id.startswith("rlft/")}
    assert registered == {f"rlft/{name}-v0" for name in rlft.envs.GYMNASIUM_IDS.values()}
    assert {"Digits", "DigitsFlow", "Flow", "DigitsSR", "DigitsInpaint", "SD15", "SD35Medium", "Flowers102SR",
            *DDPM_PRESETS} == set(
        rlft.envs.GYMNASIUM_IDS.values()
    )


@pytest.mark.parametrize("task", ["Digits", "DigitsSR", "DigitsInpaint", *DDPM_PRESETS, "SD15"])
def test_single_env_passes_gymnasiums_checker(task, tiny_rgb_ddpm, tiny_sd):
    env = single_env(task, tiny_rgb_ddpm, tiny_sd)
    assert isinstance(env.unwrapped, SingleDenoisingEnv)
    check_env(env.unwrapped, skip_render_check=True)
    # ... and one whole episode: reward 0 until the last step, then a finite reward
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    for k in range(4):
        obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert terminated == (k == 3) and not truncated
        assert isinstance(reward, float) and (reward == 0.0 if k < 3 else np.isfinite(reward))
    assert info == {"reward_finite": True}


def test_single_env_decodes_what_the_reward_sees(tiny_rgb_ddpm, tiny_sd):
    """decode(x_0) is the image the reward scores: x_0 itself for pixel DDPMs, the VAE's decoding of the latents for
    Stable Diffusion (vae.decode(latents / scaling_factor), computed here with diffusers' AutoencoderKL)."""
    from diffusers import AutoencoderKL

    pixels = single_env("CIFAR10", tiny_rgb_ddpm, tiny_sd).unwrapped
    x_0 = np.random.default_rng(0).standard_normal((3, 16, 16)).astype(np.float32)
    decoded = pixels.decode(x_0)
    assert isinstance(decoded, np.ndarray) and decoded.shape == (3, 16, 16)
    np.testing.assert_array_equal(decoded, x_0)

    latent = single_env("SD15", tiny_rgb_ddpm, tiny_sd).unwrapped
    z = np.random.default_rng(1).standard_normal(latent.action_space.shape).astype(np.float32)
    assert z.shape == (4, 16, 16)
    decoded = latent.decode(z)
    assert isinstance(decoded, np.ndarray) and decoded.shape == (3, 32, 32)
    vae = AutoencoderKL.from_pretrained(tiny_sd / "vae").eval()
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(z)[None] / vae.config.scaling_factor).sample[0].numpy()
    np.testing.assert_allclose(decoded, expected, rtol=1e-5, atol=1e-6)
    # the reward of an episode is the reward of the decoded final sample
    env = latent.vector_env
    obs, _ = latent.reset(seed=3)
    for _ in range(4):
        obs, reward, *_ = latent.step(z)
    assert reward == pytest.approx(env.reward(torch.from_numpy(latent.decode(z))[None])[0].item(), rel=1e-5)


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
    unet, _ = load_ddpm("builtin:digits")
    policy = DiffusionPolicy(unet, env.unwrapped.schedule)
    obs, _ = env.reset(seed=0)
    for k in range(2):
        out = policy.step(obs["x_t"], k, obs["context"], noise=torch.zeros_like(obs["x_t"]))
        obs, reward, *_ = env.step(out.prev_sample)
    reward.sum().backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
