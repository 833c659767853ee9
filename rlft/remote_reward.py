"""A reward in its own Ray actor (`ray.remote_reward=true`): heavy reward models stay out of the rollout loop.

The driver starts one `RewardServer` actor per run (named, so rollout workers find it); the env keeps calling a
plain `Reward` whose function sends the whole batch to the actor and waits for the scores. `envs/` never sees Ray.
The actor scores in chunks of `ray.reward_batch_size` images (memory bound on its device). A crashed actor is
restarted by Ray and the call retried; one that does not answer within `ray.reward_timeout_s` is killed and
replaced the same way (`ray.max_reward_restarts` times in all). A remote reward carries no gradients, so
algorithms that backpropagate through the reward refuse it.
"""

from __future__ import annotations

import dataclasses
import uuid

import torch

from rlft.envs.rewards import Reward, RewardError


class RewardServer:
    """The reward model on its own device; `score` and `describe` take CPU tensors and return CPU results."""

    def __init__(self, reward_cfg, device: str, batch_size: int):
        self.device = torch.device(device)
        self.reward = reward_cfg.build(self.device)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def score(self, images: torch.Tensor, context: dict) -> torch.Tensor:
        scores = []
        for start in range(0, len(images), self.batch_size):
            rows = slice(start, start + self.batch_size)
            chunk = {k: v[rows] if isinstance(v, torch.Tensor | list) else v for k, v in context.items()}
            chunk = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in chunk.items()}
            scores.append(self.reward(images[rows].to(self.device), **chunk).float().cpu())
        return torch.cat(scores)

    @torch.no_grad()
    def describe(self, images: torch.Tensor, context: dict) -> dict[str, float]:
        return self.reward.describe(images.to(self.device), **context)


def start_reward_server(spec):
    """Start the run's reward actor; returns the spec with `ray.reward_actor` naming it, and the actor handle."""
    import ray

    r = spec.ray
    name = f"rlft-reward-{uuid.uuid4().hex[:12]}"
    actor = ray.remote(num_cpus=1, num_gpus=r.reward_gpus, max_restarts=r.max_reward_restarts,
                       max_task_retries=r.max_reward_restarts)(RewardServer).options(name=name).remote(
        spec.reward, "cuda" if r.reward_gpus else "cpu", r.reward_batch_size)  # fmt: skip
    ray.get(actor.__ray_ready__.remote(), timeout=r.reward_timeout_s)  # a loading error surfaces here
    return dataclasses.replace(spec, ray=dataclasses.replace(r, reward_actor=name)), actor


# a replaced actor starts a new process and builds its model again before it retries the call; that is not the
# call's time, so the call's timeout starts once the new actor is up (waiting for that at most this long)
RESTART_LIMIT_S = 600.0


def actor_restarts(actor) -> tuple[str, int] | None:
    """(state, restarts so far) of an actor, from Ray's actor table; None where this Ray version lacks the table."""
    try:
        from ray._private import state

        info = state.actors(actor._actor_id.hex())
        return info["State"], int(info.get("NumRestarts", 0))
    except Exception:  # noqa: BLE001 (a private API: without it, a restart is timed with the retried call)
        return None


def wait_for_restart(actor, before: tuple[str, int] | None, limit_s: float = RESTART_LIMIT_S) -> None:
    """Wait until a killed actor is alive again (restarted since `before`, its `actor_restarts`) or dead for good."""
    import time

    deadline = time.monotonic() + limit_s
    while before is not None and time.monotonic() < deadline:
        now = actor_restarts(actor)
        if now is None or now[0] == "DEAD" or (now[0] == "ALIVE" and now[1] > before[1]):
            return
        time.sleep(0.1)


def call_with_replacement(actor, method: str, args: tuple, timeout_s: float, restarts: int):
    """`actor.method(*args)`, waiting at most `timeout_s` per attempt: an actor that does not answer in time counts
    as hung and is killed, Ray restarts it and retries the call (timed from when the new actor is up), up to
    `restarts` times."""
    import ray

    future = getattr(actor, method).remote(*args)
    for attempt in range(restarts + 1):
        try:
            return ray.get(future, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            if attempt == restarts:
                raise RewardError(f"the reward actor did not answer within ray.reward_timeout_s={timeout_s:g} s, "
                                  f"{restarts + 1} times; raise ray.reward_timeout_s if the reward is this slow, "
                                  "or check the reward model") from None  # fmt: skip
            before = actor_restarts(actor)
            ray.kill(actor, no_restart=False)  # Ray restarts it; the pending call is retried on the new actor
            wait_for_restart(actor, before)
    raise AssertionError("unreachable")


def remote_reward(spec) -> Reward:
    """A plain `Reward` whose scores come from the run's reward actor (found by the name the driver gave it)."""
    import ray

    r = spec.ray
    actor = ray.get_actor(r.reward_actor)

    def on_cpu(context: dict) -> dict:
        return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in context.items()}

    def score(images: torch.Tensor, **context) -> torch.Tensor:
        values = call_with_replacement(actor, "score", (images.detach().cpu(), on_cpu(context)), r.reward_timeout_s,
                                       r.max_reward_restarts)  # fmt: skip
        return values.to(images.device)

    def describe(images: torch.Tensor, **context) -> dict[str, float]:
        return call_with_replacement(actor, "describe", (images.detach().cpu(), on_cpu(context)), r.reward_timeout_s,
                                     r.max_reward_restarts)  # fmt: skip

    return Reward(spec.reward.name, score, False, describe)
