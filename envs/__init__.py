"""Denoising MDPs and their rewards. Registers the gymnasium ids rlft/<Task>-v0 on import."""

import gymnasium

from envs import inverse  # noqa: F401  (registers the "measurement" reward)
from envs.tasks import (
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

# inverse problems (envs/inverse.py): the context is the measurement y; the reward its log-likelihood
gymnasium.register(id="rlft/DigitsSR-v0", entry_point=make_digits_sr_env, vector_entry_point=make_digits_sr_vector_env)
gymnasium.register(
    id="rlft/DigitsInpaint-v0", entry_point=make_digits_inpaint_env, vector_entry_point=make_digits_inpaint_vector_env
)

__all__ = [
    "make_digits_env",
    "make_digits_inpaint_env",
    "make_digits_inpaint_vector_env",
    "make_digits_sr_env",
    "make_digits_sr_vector_env",
    "make_digits_vector_env",
]
