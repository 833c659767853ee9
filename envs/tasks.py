"""Task constructors: a base model's scheduler config + a reward + a context sampler -> a denoising env."""

from __future__ import annotations

import json

import torch
from rlft.envs.denoising import ContextSampler, Decoder, DenoisingEnv, SingleDenoisingEnv, no_context
from rlft.envs.digits import BASE_MODEL_DIR, IMAGE_SIZE
from rlft.envs.rewards import Reward, make_reward_from_config
from rlft.envs.schedule import DDIMSchedule


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
    from rlft.envs.models import load_ddpm_configs

    unet_config, scheduler_config = load_ddpm_configs(base_model, "base_model")
    size = unet_config["sample_size"]
    return make_env(
        num_envs=num_envs, sample_shape=(unet_config["in_channels"], size, size), scheduler_config=scheduler_config,
        num_inference_steps=num_inference_steps, eta=eta, reward=reward or {"name": "jpeg_compressibility"},
        device=device,
    )  # fmt: skip


# ---- inverse problems (envs/inverse.py): the measurement y of a fixed case is the context ----
def is_inverse_problem(env_cfg: dict) -> bool:
    return "operator" in env_cfg


def load_ground_truths(env_cfg: dict, split: str) -> torch.Tensor:
    """Images in [-1, 1], [N, C, H, W], of the "train" split (training measurements) or "heldout" (evaluation)."""
    dataset = env_cfg["dataset"]
    if dataset == "digits":
        from rlft.envs.digits import load_digits

        return load_digits(split)[0]
    if dataset == "flowers102":
        from rlft.envs.flowers import load_flowers102

        return load_flowers102(split, env_cfg["data_root"], env_cfg["image_size"])
    raise ValueError(f"unknown env.dataset {dataset!r} for an inverse problem; use 'digits' or 'flowers102'")


def make_inverse_env(
    num_envs: int,
    sample_shape: tuple[int, ...],
    schedule: DDIMSchedule,
    env_cfg: dict,
    reward: dict,
    evaluation: bool = False,
    device: str | torch.device = "cpu",
):
    """Training envs draw measurements of the train split at random; evaluation envs (`evaluation=True`) take the
    first held-out cases in order, so every evaluation shows the same cases."""
    from rlft.envs.inverse import InverseProblemEnv, MeasurementCases, make_operator

    operator = make_operator(env_cfg["operator"], env_cfg["scale"], env_cfg["hole_fraction"])
    split = "heldout" if evaluation else "train"
    images = load_ground_truths(env_cfg, split)
    if tuple(images.shape[1:]) != tuple(sample_shape):
        raise ValueError(f"env.dataset={env_cfg['dataset']} gives images of shape {tuple(images.shape[1:])} but the "
                         f"base model samples {tuple(sample_shape)}; match env.image_size to the model")  # fmt: skip
    noise_seed = env_cfg["noise_seed"] + (1 if evaluation else 0)  # each split's measurement noise is fixed
    cases = MeasurementCases.make(images, operator, env_cfg["sigma_y"], noise_seed)
    return InverseProblemEnv(
        num_envs=num_envs,
        sample_shape=sample_shape,
        schedule=schedule,
        reward=reward if isinstance(reward, Reward) else make_reward_from_config(reward, device),
        operator=operator,
        sigma_y=env_cfg["sigma_y"],
        cases=cases,
        evaluation=evaluation,
        samples_per_case=env_cfg["samples_per_case"],
        device=device,
    )


def make_task_env(
    env_cfg: dict, reward: dict, num_envs: int, sample_shape: tuple[int, ...], scheduler_config: dict,
    evaluation: bool = False, device: str | torch.device = "cpu",
) -> DenoisingEnv:  # fmt: skip
    """The env a run config describes: unconditional (env=digits) or an inverse problem (env=digits_sr, ...)."""
    if is_inverse_problem(env_cfg):
        schedule = DDIMSchedule.from_scheduler_config(scheduler_config, env_cfg["num_inference_steps"], env_cfg["eta"])
        return make_inverse_env(num_envs, sample_shape, schedule, env_cfg, reward, evaluation, device)
    return make_env(num_envs, sample_shape, scheduler_config, env_cfg["num_inference_steps"], env_cfg["eta"], reward,
                    device)  # fmt: skip


def _digits_inverse_cfg(operator: str, num_inference_steps: int, eta: float, sigma_y: float) -> dict:
    return dict(dataset="digits", operator=operator, scale=4, hole_fraction=0.5, sigma_y=sigma_y, noise_seed=0,
                samples_per_case=1, num_inference_steps=num_inference_steps, eta=eta)  # fmt: skip


def _make_digits_inverse_vector_env(operator: str):
    def make(num_envs: int = 16, num_inference_steps: int = 20, eta: float = 1.0, sigma_y: float = 0.05,
             evaluation: bool = False, device="cpu") -> DenoisingEnv:  # fmt: skip
        env_cfg = _digits_inverse_cfg(operator, num_inference_steps, eta, sigma_y)
        reward = {"name": "measurement", "operator": operator, "scale": 4, "hole_fraction": 0.5, "sigma_y": sigma_y}
        kwargs = _digits_kwargs(num_inference_steps, eta, reward, device)
        return make_task_env(env_cfg, reward, num_envs, kwargs["sample_shape"], kwargs["scheduler_config"],
                             evaluation, device)  # fmt: skip

    make.__doc__ = f'`gymnasium.make_vec("rlft/Digits{"SR" if operator == "sr" else "Inpaint"}-v0", num_envs, ...)`.'
    return make


make_digits_sr_vector_env = _make_digits_inverse_vector_env("sr")
make_digits_inpaint_vector_env = _make_digits_inverse_vector_env("inpaint")


def make_digits_sr_env(**kwargs) -> SingleDenoisingEnv:
    """`gymnasium.make("rlft/DigitsSR-v0")`: 4x super-resolution of digits, one sample at a time."""
    return SingleDenoisingEnv(make_digits_sr_vector_env(1, **kwargs))


def make_digits_inpaint_env(**kwargs) -> SingleDenoisingEnv:
    """`gymnasium.make("rlft/DigitsInpaint-v0")`: inpainting the central square of digits, one sample at a time."""
    return SingleDenoisingEnv(make_digits_inpaint_vector_env(1, **kwargs))
