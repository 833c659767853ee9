"""Task constructors: a base model's scheduler config + a reward + a context sampler -> a denoising env."""

from __future__ import annotations

import json

import torch

from envs.denoising import DenoisingEnv, SingleDenoisingEnv
from envs.digits import BASE_MODEL_DIR, IMAGE_SIZE
from envs.rewards import make_reward
from envs.schedule import DDIMSchedule


def make_env(
    num_envs: int,
    sample_shape: tuple[int, ...],
    scheduler_config: dict,
    num_inference_steps: int,
    eta: float,
    reward: dict,
    device: str | torch.device = "cpu",
) -> DenoisingEnv:
    """The batched env for an unconditional base model; `reward` is a reward config ({"name": ..., kwargs})."""
    reward_kwargs = {k: v for k, v in reward.items() if k != "name"}
    return DenoisingEnv(
        num_envs=num_envs,
        sample_shape=sample_shape,
        schedule=DDIMSchedule.from_scheduler_config(scheduler_config, num_inference_steps, eta),
        reward=make_reward(reward["name"], device=device, **reward_kwargs),
        device=device,
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
