"""Task constructors: a base model's scheduler config + a reward + a context sampler -> a denoising env."""

from __future__ import annotations

import json

import torch

from envs.denoising import ContextSampler, Decoder, DenoisingEnv, SingleDenoisingEnv, no_context
from envs.digits import BASE_MODEL_DIR, IMAGE_SIZE
from envs.rewards import Reward, make_reward_from_config
from envs.schedule import DDIMSchedule


def make_env(
    num_envs: int,
    sample_shape: tuple[int, ...],
    scheduler_config: dict,
    num_inference_steps: int,
    eta: float,
    reward: dict | Reward,
    device: str | torch.device = "cpu",
    context_sampler: ContextSampler = no_context,
    context_shape: tuple[int, ...] = (0,),
    decoder: Decoder | None = None,
) -> DenoisingEnv:
    """The batched env for a base model; `reward` is a reward config ({"name": ..., kwargs}) or a built Reward."""
    return DenoisingEnv(
        num_envs=num_envs,
        sample_shape=sample_shape,
        schedule=DDIMSchedule.from_scheduler_config(scheduler_config, num_inference_steps, eta),
        reward=reward if isinstance(reward, Reward) else make_reward_from_config(reward, device),
        device=device,
        context_sampler=context_sampler,
        context_shape=context_shape,
        decoder=decoder,
    )


def _digits_kwargs(num_inference_steps: int, eta: float, reward: dict | None, device) -> dict:
    return dict(
        sample_shape=(1, IMAGE_SIZE, IMAGE_SIZE),
        scheduler_config=json.loads((BASE_MODEL_DIR / "scheduler_config.json").read_text()),
        num_inference_steps=num_inference_steps,
        eta=eta,
        reward=reward or {"name": "digit", "target": 3},
        device=device,
    )


def make_digits_vector_env(
    num_envs: int = 16, num_inference_steps: int = 20, eta: float = 1.0, reward: dict | None = None, device="cpu"
) -> DenoisingEnv:
    """`gymnasium.make_vec("rlft/Digits-v0", num_envs, vectorization_mode="vector_entry_point")`."""
    return make_env(num_envs=num_envs, **_digits_kwargs(num_inference_steps, eta, reward, device))


def make_digits_env(
    num_inference_steps: int = 20, eta: float = 1.0, reward: dict | None = None, device="cpu"
) -> SingleDenoisingEnv:
    """`gymnasium.make("rlft/Digits-v0")`: one sample at a time, numpy arrays."""
    env = make_digits_vector_env(1, num_inference_steps, eta, reward, device)
    return SingleDenoisingEnv(env)


def make_ddpm_vector_env(
    base_model: str, num_envs: int = 16, num_inference_steps: int = 20, eta: float = 1.0,
    reward: dict | None = None, device="cpu",
) -> DenoisingEnv:
    """The env of a diffusers DDPM (Hub id or folder), e.g. rlft/CelebAHQ-v0: it reads the model's configs
    (sample shape, noise schedule), never its weights, since the network belongs to the policy."""
    from envs.models import load_ddpm_configs

    unet_config, scheduler_config = load_ddpm_configs(base_model, "base_model")
    size = unet_config["sample_size"]
    return make_env(
        num_envs=num_envs, sample_shape=(unet_config["in_channels"], size, size), scheduler_config=scheduler_config,
        num_inference_steps=num_inference_steps, eta=eta, reward=reward or {"name": "jpeg_compressibility"},
        device=device,
    )  # fmt: skip
