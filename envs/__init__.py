"""Denoising MDPs and their rewards. Registers a gymnasium id rlft/<Task>-v0 for every env preset on import.

    gymnasium.make("rlft/Digits-v0")                                             one sample, numpy arrays
    gymnasium.make_vec("rlft/CelebAHQ-v0", 8, vectorization_mode="vector_entry_point",
                       base_model="/models/celebahq", reward={"name": "jpeg_compressibility"})   batched torch tensors

Keyword arguments change the preset's keys (envs/tasks.py) or choose the reward.
"""

import gymnasium

from rlft.envs import (
    inverse,  # noqa: F401  (registers the "measurement" reward)
    judge,  # noqa: F401  (registers the digit judge)
    reward_models,  # noqa: F401  (registers the model-based rewards)
)
from rlft.envs.tasks import ENV_PRESETS, make_preset_env, make_preset_vector_env

GYMNASIUM_IDS = {"digits": "Digits", "digits_flow": "DigitsFlow", "flow": "Flow", "digits_sr": "DigitsSR",
                 "digits_inpaint": "DigitsInpaint",
                 "celebahq": "CelebAHQ", "church": "Church", "cifar10": "CIFAR10", "ddpm": "DDPM",
                 "flowers102_sr": "Flowers102SR", "sd15": "SD15", "sd35_medium": "SD35Medium"}  # fmt: skip
assert set(GYMNASIUM_IDS) == set(ENV_PRESETS), "every env preset has a gymnasium id"

for _preset, _name in GYMNASIUM_IDS.items():
    gymnasium.register(id=f"rlft/{_name}-v0", entry_point=make_preset_env, vector_entry_point=make_preset_vector_env,
                       kwargs={"preset_name": _preset}, max_episode_steps=None)  # fmt: skip

__all__ = ["GYMNASIUM_IDS", "make_preset_env", "make_preset_vector_env"]
