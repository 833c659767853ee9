"""reward.remote=true: the reward scores in its own Ray actor; envs keep calling a plain Reward."""

import pytest
import torch
from rlft.envs.rewards import evaluate_reward, make_reward

from rlft.config import ConfigError, compose, validate


def test_a_remote_reward_needs_ray():
    with pytest.raises(ConfigError, match="reward.remote=true .* needs ray.enabled=true"):
        validate(compose("config", ["reward.remote=true", "ray.enabled=false"]))


@pytest.mark.slow
def test_the_reward_actor_scores_like_the_local_reward(tiny_model_dir):
    import ray

    from rlft.remote_reward import remote_reward, start_reward_server
    from rlft.rollout import RolloutWorker
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(tiny_model_dir, "reward.target=7", "reward.remote=true", "reward.remote_batch_size=3")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg, actor = start_reward_server(cfg)
        remote = remote_reward(cfg["reward"])
        images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        local = make_reward("digit", target=7)
        expected, _ = evaluate_reward(local, images, torch.zeros(8, 0))
        values, finite = evaluate_reward(remote, images, torch.zeros(8, 0))  # scored in chunks of 3 in the actor
        torch.testing.assert_close(values, expected)
        assert finite.all() and not remote.differentiable
        assert remote.describe(images) == pytest.approx(local.describe(images))
        # a rollout worker's env calls the actor: its reward is the remote one, with the local one's values
        worker = RolloutWorker(cfg)
        assert not worker.env.reward.differentiable
        batch = worker.collect(0, seed=0, n=8)
        torch.testing.assert_close(batch["reward"], local.fn(batch["latents"][:, -1], batch["context"]))
    finally:
        ray.shutdown()

