"""Shared test helpers: composed configs on the tiny random DDPM."""

from rlft.config import compose, to_container


def tiny_cfg(model_dir, *overrides: str) -> dict:
    """A resolved run config on a tiny random UNet, small enough for unit tests."""
    return to_container(compose("config", [
        f"env.base_model={model_dir}", "env.num_inference_steps=5", "trainer.rollout_batch_size=8",
        "trainer.samples_per_epoch=16", "algo.minibatch_size=8", "eval.num_samples=8",
        "ray.rollout_threads=1", "ray.learner_threads=1",
        "logging.wandb=disabled", "logging.progress=false", *overrides,
    ]))  # fmt: skip
