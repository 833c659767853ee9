"""The shipped digits DDPM makes digits: the shipped classifier is far more confident on its samples."""

import torch

from rlft.rollout import RolloutWorker
from tests.helpers import tiny_cfg


def test_shipped_base_model_samples_look_like_digits():
    cfg = tiny_cfg("builtin:digits", "env.num_inference_steps=20", "trainer.rollout_batch_size=64",
                   "eval.num_samples=64")  # fmt: skip
    worker = RolloutWorker(cfg)
    result = worker.evaluate(0, seed=0, n=64)
    noise = torch.randn(64, 1, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    on_noise = worker.env.reward.describe(noise)
    assert result["metrics"]["eval/confidence"] > 0.8
    assert result["metrics"]["eval/confidence"] > on_noise["confidence"] + 0.3
    # roughly a tenth are the target digit before any fine-tuning
    assert 0.02 <= result["metrics"]["eval/target_fraction"] <= 0.3
