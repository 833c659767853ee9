"""A reward in its own Ray actor (`ray.remote_reward=true`): heavy reward models stay out of the rollout loop.

The driver starts a pool of `ray.reward_actors` named `RewardServer` actors per run (rollout worker i calls actor
i mod the pool's size, and each actor scores the calls that arrive together as one batch); the env keeps calling a
plain `Reward` whose function sends the whole batch to its actor and waits for the scores. `envs/` never sees Ray.
The actor scores in chunks of `ray.reward_batch_size` images (memory bound on its device). A crashed actor is
restarted by Ray and the call retried; one that does not answer within `ray.reward_timeout_s` is killed and
replaced the same way (`ray.max_reward_restarts` times in all). A remote reward carries no gradients, so
algorithms that backpropagate through the reward refuse it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import torch

from rlft.envs.rewards import Reward, RewardError


class RewardServer:
    """The reward model on its own device; `score` and `describe` take CPU tensors and return CPU results.

    An async actor: the `score` calls that arrive within `window_s` of the first (from the rollout workers it
    serves) are scored as one batch, and the calls that arrive while it scores form the next one, so a pool of few
    actors serves many workers without scoring each worker's batch alone."""

    def __init__(self, reward_cfg, device: str, batch_size: int, window_s: float = 0.0):
        self.device = torch.device(device)
        self.reward = reward_cfg.build(self.device)
        self.batch_size, self.window_s = int(batch_size), float(window_s)
        self.waiting: list[tuple[torch.Tensor, dict, asyncio.Future]] = []
        self.counts = {"calls": 0, "batches": 0}

    async def score(self, images: torch.Tensor, context: dict) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.append((images, context, future))
        self.counts["calls"] += 1
        if len(self.waiting) == 1:  # the first of a batch: score once the calls of the next window_s have joined it
            loop.call_later(self.window_s, self._score_waiting)
        return await future

    def _score_waiting(self) -> None:
        waiting, self.waiting = self.waiting, []
        self.counts["batches"] += 1
        try:
            images = torch.cat([images for images, _, _ in waiting])
            scores = self._score(images, join_contexts([context for _, context, _ in waiting]))
        except Exception as error:  # noqa: BLE001 (every caller gets the error, as a plain call would)
            for _, _, future in waiting:
                future.set_exception(error)
            return
        for (_, _, future), part in zip(waiting, scores.split([len(i) for i, _, _ in waiting]), strict=True):
            future.set_result(part)

    @torch.no_grad()
    def _score(self, images: torch.Tensor, context: dict) -> torch.Tensor:
        scores = []
        for start in range(0, len(images), self.batch_size):
            rows = slice(start, start + self.batch_size)
            chunk = {k: v[rows] if isinstance(v, torch.Tensor | list) else v for k, v in context.items()}
            chunk = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in chunk.items()}
            scores.append(self.reward(images[rows].to(self.device), **chunk).float().cpu())
        return torch.cat(scores)

    async def describe(self, images: torch.Tensor, context: dict) -> dict[str, float]:
        with torch.no_grad():
            return self.reward.describe(images.to(self.device), **context)

    async def stats(self) -> dict[str, int]:
        """How many score calls arrived and in how many batches they were scored."""
        return dict(self.counts)


def join_contexts(contexts: list[dict]) -> dict:
    """The context keywords of several calls as one call's: per-row tensors and lists joined, the rest the first's."""
    joined = {}
    for key, value in contexts[0].items():
        values = [context[key] for context in contexts]
        joined[key] = (torch.cat(values) if isinstance(value, torch.Tensor) else
                       [row for part in values for row in part] if isinstance(value, list) else value)  # fmt: skip
    return joined


def reward_actor_name(spec, worker_index: int) -> str:
    """The pool's actor that rollout worker `worker_index` calls."""
    return f"{spec.ray.reward_actor}-{worker_index % spec.ray.reward_actors}"


def start_reward_server(spec):
    """Start the run's pool of reward actors; returns the spec with `ray.reward_actor` naming it, and the actors."""
    import ray

    r = spec.ray
    prefix = f"rlft-reward-{uuid.uuid4().hex[:12]}"
    spec = dataclasses.replace(spec, ray=dataclasses.replace(r, reward_actor=prefix))
    actor_class = ray.remote(num_cpus=1, num_gpus=r.reward_gpus, max_restarts=r.max_reward_restarts,
                             max_task_retries=r.max_reward_restarts)(RewardServer)  # fmt: skip
    device = "cuda" if r.reward_gpus else "cpu"
    actors = [actor_class.options(name=reward_actor_name(spec, k)).remote(spec.reward, device, r.reward_batch_size,
                                                                          r.reward_batch_window_s)
              for k in range(r.reward_actors)]  # fmt: skip
    ray.get([actor.__ray_ready__.remote() for actor in actors], timeout=r.reward_timeout_s)  # loading errors here
    return spec, actors


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


def remote_reward(spec, worker_index: int = 0) -> Reward:
    """A plain `Reward` whose scores come from the pool's actor for rollout worker `worker_index` (found by the
    name the driver gave it)."""
    import ray

    r = spec.ray
    actor = ray.get_actor(reward_actor_name(spec, worker_index))

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
