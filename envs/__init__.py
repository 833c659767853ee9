"""Denoising MDPs and their rewards. Registers the gymnasium ids rlft/<Task>-v0 on import."""

import gymnasium

from envs.tasks import make_digits_env, make_digits_vector_env

gymnasium.register(
    id="rlft/Digits-v0",
    entry_point=make_digits_env,
    vector_entry_point=make_digits_vector_env,
    max_episode_steps=None,
)

__all__ = ["make_digits_env", "make_digits_vector_env"]
