"""Rollout workers: step the denoising env with the current policy and return TensorDict trajectories.

A `RolloutWorker` is a plain class; `rlft.pipeline` makes it a Ray actor, the single-process loop uses it
as it is. `collect(policy_version, seed, n)` is a pure function of its arguments (given the weights of that
version), so a retried call reproduces the same trajectories and the same batch uid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from tensordict import TensorDict

from rlft.algorithms import load_algorithm
from rlft.config import resolve_device
from rlft.lora import configure_policy, scale_adapters
from rlft.policy import DiffusionPolicy

NETWORK_DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # policy.dtype -> autocast dtype (None: plain fp32)


def derive_seed(*keys: int) -> int:
    """A stable 63-bit seed from integer keys (run seed, epoch, worker, chunk...)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))


def set_torch_threads(spec, role: str) -> None:
    """Threads for a "rollout" or "learner" process: `ray.<role>_threads`, else this node's cores shared by the
    processes of that role, which work at the same time (rollout workers collect together, then learners update
    together). Small convolutions scale poorly over threads, so two 1-thread actors beat one 2-thread process."""
    import os

    r = spec.ray
    threads = r.rollout_threads if role == "rollout" else r.learner_threads
    if not threads:
        cores = len(os.sched_getaffinity(0))
        sharing = (r.num_rollout_workers if role == "rollout" else r.num_learners) if r.enabled else 1
        threads = max(1, cores // sharing)
    torch.set_num_threads(int(threads))


def make_reward(spec, device: torch.device, worker_index: int = 0):
    """The run's reward: built here, or a handle on the pool's reward actor for this worker (ray.remote_reward)."""
    if spec.ray.remote_reward:
        from rlft.remote_reward import remote_reward

        return remote_reward(spec, worker_index)
    return spec.reward.build(device)


def build_policy(spec, device: torch.device, role: str = "learner", evaluation: bool = False, worker_index: int = 0):
    """(policy, env, eval_env) for a "learner" or a "rollout" worker: the base network as a policy, a batched env
    of `rollout_batch_size` samples sharing its schedule, and the env evaluations run in (held-out cases or prompts).

    An algorithm with a correction (DEFT) adds its trainable module to the frozen base network; one that needs the
    frozen base model in this role keeps a reference (rlft.policy). With `policy.compile`, the compiled network is
    checked against eager on the env's first observation (and, for learners, so are the gradients)."""
    algorithm = load_algorithm(spec.algo.name)
    reward = make_reward(spec, device, worker_index)
    batch = spec.trainer.rollout_batch_size
    env = spec.env.make_env(reward, batch, device)
    eval_env = spec.env.make_env(reward, batch, device, evaluation=True) if evaluation else None
    fast = spec.policy
    policy = DiffusionPolicy(
        spec.env.load_network().to(device), env.schedule, autocast_dtype=NETWORK_DTYPES[fast.dtype],
        correction=algorithm.make_correction(spec.algo, env), null_context=env.null_context,
        guidance_scale=getattr(spec.env, "guidance_scale", 1.0),
    )  # fmt: skip
    policy = configure_policy(policy, fast, algorithm.GRADIENT_CHECKPOINTING).to(device)  # LoRA, checkpointing
    if role in algorithm.reference_roles(spec.algo):
        policy.keep_reference()
    if role == "rollout" and fast.lora_sampling_scale != 1.0:
        scale_adapters(policy.unet, fast.lora_sampling_scale)
    if fast.channels_last:
        policy.use_channels_last()
    if fast.compile:
        observation, _ = env.reset(seed=spec.seed)
        probe = (observation["x_t"], observation["timestep"], observation["context"])
        policy.compile_network(probe, role == "learner", fused_norm_silu=fast.fused_norm_silu)
    return policy, env, eval_env


class RolloutWorker:
    def __init__(self, spec, worker_index: int = 0):
        set_torch_threads(spec, "rollout")
        self.device = resolve_device(spec.device)
        self.worker_index = worker_index
        self.spec = spec
        self.algorithm = load_algorithm(spec.algo.name)
        self.policy, self.env, self.eval_env = build_policy(spec, self.device, "rollout", evaluation=True,
                                                                   worker_index=worker_index)
        self.policy.eval().requires_grad_(False)
        # the evaluation judge: a scorer the update never sees (rlft.envs.judge for digits), or none
        self.judge = None if spec.judge.name == "none" else spec.judge.build(self.device)
        self.policy_version = 0
        self.record_noise = "noise" in self.algorithm.ROLLOUT_KEYS
        self.record_base_output = "base_output" in self.algorithm.ROLLOUT_KEYS

    def set_weights(self, weights: dict[str, torch.Tensor], policy_version: int) -> None:
        self.policy.load_trainable_state_dict(weights)
        self.policy_version = policy_version

    def _check_version(self, policy_version: int) -> None:
        if policy_version != self.policy_version:
            raise RuntimeError(
                f"rollout worker {self.worker_index} holds policy version {self.policy_version} but was asked to "
                f"collect with version {policy_version}; publish those weights first"
            )

    @torch.no_grad()
    def _rollout(self, seed: int, env, options: dict | None = None) -> TensorDict:
        """One env batch: reset with `seed` (and the env's reset `options`), step it with the policy to the end,
        return the trajectories. The env draws x_T and the contexts; the policy's step noise comes from a stream of
        the same seed, so one seed is one trajectory batch."""
        policy = self.policy
        obs, _ = env.reset(seed=seed, options=options)
        generator = torch.Generator().manual_seed(derive_seed(seed, 1))
        latents, log_probs, noises, base_outputs = [obs["x_t"]], [], [], []
        for k in range(env.horizon):
            noise = torch.randn(obs["x_t"].shape, generator=generator).to(self.device)
            base_output = None
            if self.record_base_output:  # the frozen base network's prediction, kept so learners need not redo it
                base_output = policy.base_forward(obs["x_t"], obs["timestep"], obs["context"]).float()
                base_outputs.append(base_output)
            out = policy.step(obs["x_t"], k, obs["context"], noise=noise, base_output=base_output)
            obs, reward, terminated, _, info = env.step(out.prev_sample)
            latents.append(obs["x_t"])
            log_probs.append(out.log_prob)
            noises.append(noise)
        assert bool(terminated.all()), "the env must terminate after the schedule's last step"
        n = env.num_envs
        extra = {"noise": torch.stack(noises, dim=1)} if self.record_noise else {}  # [n, T, C, H, W]
        if self.record_base_output:
            extra["base_output"] = torch.stack(base_outputs, dim=1)  # [n, T, C, H, W]
        return TensorDict(
            {
                **extra,
                "latents": torch.stack(latents, dim=1),  # [n, T+1, C, H, W]: x_T ... x_0
                "log_prob": torch.stack(log_probs, dim=1),  # [n, T]
                "context": obs["context"],  # [n, *ctx]
                "reward": reward,  # [n]
                "reward_finite": info["reward_finite"],  # [n] bool
                "policy_version": torch.full((n,), self.policy_version, dtype=torch.int64),  # [n]
            },
            batch_size=[n],
        )

    def collect(
        self, policy_version: int, seed: int, n: int, published: Published | None = None, postprocess: bool = True,
        env=None,
    ) -> TensorDict:  # fmt: skip
        """`n` trajectories (a multiple of the env batch) from the policy of `policy_version`, on CPU; the
        algorithm's `postprocess_rollout(worker, batch, cfg)` runs on each chunk unless `postprocess` is false.

        `published` is where the current weights can be fetched: a worker restarted after a crash (which
        comes back with the base weights) loads them before it collects, so a retried call gives the same batch.
        `env` is the training env unless given (evaluations use the evaluation env).
        """
        if published is not None and self.policy_version != policy_version == published.policy_version:
            self.set_weights(published.fetch(), policy_version)
        self._check_version(policy_version)
        env = env or self.env
        if n % env.num_envs:
            raise ValueError(f"collect(n={n}) must be a multiple of the rollout batch size {env.num_envs}")
        # batch_index: an evaluation env of fixed cases (inverse problems) moves on to the next cases per batch;
        # group_size: an algorithm whose Config has one (GRPO) trains on groups of samples sharing a context
        options = {"group_size": getattr(self.spec.algo, "group_size", 1)} if env is self.env else {}
        chunks = [self._rollout(derive_seed(seed, chunk), env, {"batch_index": chunk, **options})
                  for chunk in range(n // env.num_envs)]  # fmt: skip
        if postprocess:
            chunks = [self.algorithm.postprocess_rollout(self, chunk, self.spec.algo) for chunk in chunks]
        return torch.cat(chunks).to("cpu")

    def evaluate(self, policy_version: int, seed: int, n: int) -> dict:
        """Final samples from fixed noise (`seed`) in the evaluation env: their rewards, the env's metrics, the judge's
        scores and metrics (eval/judge/...), and their diversity in pixels (eval/diversity/...), which does not
        depend on any reward. The images are the samples, or the env's panel (inverse problems: measurement,
        samples, ground truth)."""
        from rlft.evaluate import diversity_metrics, score_metrics

        batch = self.collect(policy_version, seed, n, postprocess=False, env=self.eval_env)
        with torch.no_grad():  # latent models decode x_0 to the images the reward saw
            final = batch["latents"][:, -1].split(8)
            images = torch.cat([self.eval_env.decode(x.to(self.device)).cpu() for x in final])
        context = batch["context"].to(self.device)
        described = self.eval_env.describe(images.to(self.device), context)
        shown = described.pop("panel", images).cpu()
        metrics = {f"eval/{k}": v for k, v in described.items()}
        metrics.update(score_metrics("eval/reward", batch["reward"], batch["reward_finite"]))
        reward_context = self.eval_env.reward_context(context)
        result = {"images": shown, "samples": images, "reward": batch["reward"], "context": batch["context"]}
        if self.judge is not None:
            from rlft.envs.rewards import evaluate_reward

            with torch.no_grad():
                judged, finite = evaluate_reward(self.judge, images.to(self.device), reward_context)
                metrics.update({f"eval/judge/{k}": v for k, v in self.judge.describe(images.to(self.device),
                                                                                     **reward_context).items()})
            metrics.update(score_metrics("eval/judge/score", judged.cpu(), finite.cpu()))
            result["judge"] = judged.cpu()
        metrics.update(diversity_metrics(images, reward_context.get("prompts")))
        return {**result, "metrics": metrics}


@dataclass
class Published:
    """The latest published weights, by reference: the dict itself in one process, a Ray ObjectRef in a list
    (so Ray passes the reference, not the weights, and only a worker that lacks them fetches them)."""

    policy_version: int
    weights: dict | list

    def fetch(self) -> dict[str, torch.Tensor]:
        if isinstance(self.weights, dict):
            return self.weights
        import ray

        return ray.get(self.weights[0])


class Call(Protocol):
    """Runs [(worker, method, args)] and returns the results in order: at once (`__call__`), or started by `submit`
    and collected by `wait`."""

    def __call__(self, calls: list[tuple[Any, str, tuple]]) -> list[Any]: ...

    def submit(self, calls: list[tuple[Any, str, tuple]]) -> Any: ...

    def wait(self, submitted: Any) -> list[Any]: ...


class LocalCall:
    """In-process workers: `submit` runs the calls there and then (one process has nothing to overlap them with),
    so an asynchronous collection sees the same weights as through Ray."""

    def __call__(self, calls: list[tuple[Any, str, tuple]]) -> list[Any]:
        return [getattr(worker, method)(*args) for worker, method, args in calls]

    def submit(self, calls: list[tuple[Any, str, tuple]]) -> list[Any]:
        return self(calls)

    def wait(self, submitted: list[Any]) -> list[Any]:
        return submitted


local_call = LocalCall()


@dataclass
class PendingCollection:
    """A collection in flight: the policy version that samples it, its batches' uids, and the submitted calls."""

    policy_version: int
    uids: list[str]
    submitted: Any


class RolloutGroup:
    """The rollout workers one learner feeds from, behind one calling convention (in-process or Ray)."""

    def __init__(self, workers: list[Any], call: Call = local_call, share: Callable[[dict], Any] = lambda w: w):
        self.workers, self.call, self.share = workers, call, share  # share: weights -> what `Published` holds
        self.published: Published | None = None

    def collect(self, policy_version: int, seed: int, n: int) -> list[tuple[str, TensorDict]]:
        """`n` trajectories split evenly over the workers; each batch comes with its uid."""
        return self.receive(self.start_collect(policy_version, seed, n))

    def start_collect(self, policy_version: int, seed: int, n: int) -> PendingCollection:
        """Start collecting `n` trajectories with the workers' current weights (version `policy_version`); weights
        published afterwards reach each worker after its collection (an actor runs its calls in order)."""
        per_worker = n // len(self.workers)
        seeds = [derive_seed(seed, i) for i in range(len(self.workers))]
        calls = [(w, "collect", (policy_version, s, per_worker, self.published))
                 for w, s in zip(self.workers, seeds, strict=True)]  # fmt: skip
        uids = [f"v{policy_version}-s{s}-n{per_worker}" for s in seeds]
        return PendingCollection(policy_version, uids, self.call.submit(calls))

    def receive(self, pending: PendingCollection) -> list[tuple[str, TensorDict]]:
        return list(zip(pending.uids, self.call.wait(pending.submitted), strict=True))

    def publish(self, weights: dict[str, torch.Tensor], policy_version: int) -> None:
        stored = self.share(weights)
        self.published = Published(policy_version, stored)
        weights_arg = stored if isinstance(stored, dict) else stored[0]  # Ray resolves an ObjectRef argument
        self.call([(w, "set_weights", (weights_arg, policy_version)) for w in self.workers])

    def evaluate(self, policy_version: int, seed: int, n: int) -> dict:
        return self.call([(self.workers[0], "evaluate", (policy_version, seed, n))])[0]
