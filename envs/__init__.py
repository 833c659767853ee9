"""Denoising MDPs and their rewards. Registers the gymnasium ids rlft/<Task>-v0 on import."""

import gymnasium
from rlft.envs import (
    inverse,  # noqa: F401  (registers the "measurement" reward)
    reward_models,  # noqa: F401  (registers the aesthetic and over50 rewards)
)
from rlft.envs.tasks import (
    make_ddpm_vector_env,
    make_digits_env,
    make_digits_inpaint_env,
    make_digits_inpaint_vector_env,
    make_digits_sr_env,
    make_digits_sr_vector_env,
    make_digits_vector_env,
)

gymnasium.register(
    id="rlft/Digits-v0",
    entry_point=make_digits_env,
    vector_entry_point=make_digits_vector_env,
    max_episode_steps=None,
)

# the google/ddpm-* base models: `gymnasium.make_vec("rlft/CelebAHQ-v0", 8, vectorization_mode="vector_entry_point")`
# (the env reads the model's configs from the Hub id or `base_model=/folder`; the policy loads the weights)
for _id, _model in [("CelebAHQ", "google/ddpm-celebahq-256"), ("Church", "google/ddpm-church-256"),
                    ("CIFAR10", "google/ddpm-cifar10-32")]:  # fmt: skip
    gymnasium.register(
        id=f"rlft/{_id}-v0", vector_entry_point=make_ddpm_vector_env, kwargs={"base_model": _model},
        max_episode_steps=None,
    )  # fmt: skip

# inverse problems (envs/inverse.py): the context is the measurement y; the reward its log-likelihood
gymnasium.register(id="rlft/DigitsSR-v0", entry_point=make_digits_sr_env, vector_entry_point=make_digits_sr_vector_env)
gymnasium.register(
    id="rlft/DigitsInpaint-v0", entry_point=make_digits_inpaint_env, vector_entry_point=make_digits_inpaint_vector_env
)

__all__ = [
    "make_ddpm_vector_env",
    "make_digits_env",
    "make_digits_inpaint_env",
    "make_digits_inpaint_vector_env",
    "make_digits_sr_env",
    "make_digits_sr_vector_env",
    "make_digits_vector_env",
]
