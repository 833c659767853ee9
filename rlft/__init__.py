"""rlft: reward / RL fine-tuning of pretrained diffusion models on Ray.

Importing rlft never imports Ray: only `rlft.pipeline`, `rlft.run` and the sweep tools do, so `algorithms/`
and `envs/` can use the policy and the buffer without it.
"""

__version__ = "0.1.0"
