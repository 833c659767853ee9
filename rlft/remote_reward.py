"""A reward in its own Ray actor (`reward.remote=true`): heavy reward models stay out of the rollout loop.

The driver starts one `RewardServer` actor per run (named, so rollout workers and learners find it); the env
keeps calling a plain `Reward` whose function sends the whole batch to the actor and waits for the scores.
`envs/` never sees Ray. The actor scores in chunks of `reward.remote_batch_size` images (memory bound on its
device). A remote reward carries no gradients, so algorithms that backpropagate through the reward refuse it.
"""

from __future__ import annotations

import uuid

import torch

from rlft.envs.rewards import Reward, make_reward_from_config


class RewardServer:
    """The reward model on its own device; `score` and `describe` take CPU tensors and return CPU results."""

    def __init__(self, reward_cfg: dict, device: str):
        self.device = torch.device(device)
        self.reward = make_reward_from_config(reward_cfg, self.device)
        self.batch_size = int(reward_cfg["remote_batch_size"])

    @torch.no_grad()
    def score(self, images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        scores = [
            self.reward.fn(x.to(self.device), c.to(self.device)).float().cpu()
            for x, c in zip(images.split(self.batch_size), context.split(self.batch_size), strict=True)
        ]
        return torch.cat(scores)

    @torch.no_grad()
    def describe(self, images: torch.Tensor) -> dict[str, float]:
        return self.reward.describe(images.to(self.device))


def start_reward_server(cfg: dict) -> tuple[dict, object]:
    """Start the run's reward actor; returns the config with `reward.actor` naming it, and the actor handle."""
    import ray

    r = cfg["reward"]
    gpus = r["remote_gpus"]
    name = f"rlft-reward-{uuid.uuid4().hex[:12]}"
    actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(RewardServer).options(name=name).remote(
        r, "cuda" if gpus else "cpu"
    )  # fmt: skip
    ray.get(actor.__ray_ready__.remote())  # a loading error surfaces here, before any rollout starts
    return {**cfg, "reward": {**r, "actor": name}}, actor


def remote_reward(reward_cfg: dict) -> Reward:
    """A plain `Reward` whose scores come from the run's reward actor (found by the name the driver gave it)."""
    import ray

    actor = ray.get_actor(reward_cfg["actor"])

    def score(images: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        values = ray.get(actor.score.remote(images.detach().cpu(), context.detach().cpu()))
        return values.to(images.device)

    def describe(images: torch.Tensor) -> dict[str, float]:
        return ray.get(actor.describe.remote(images.detach().cpu()))

    return Reward(reward_cfg["name"], score, False, describe)
