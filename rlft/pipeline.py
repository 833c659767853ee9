"""The Ray pipeline: rollout actors, Ray Train learners (DDP), and a queue that carries reports to the driver.

    driver (rlft.run) --- Recorder <- Queue <- learner rank 0
       |                                         |  collect / set_weights / evaluate
       +-- TorchTrainer: learners 0..L-1 (DDP) --+--> rollout actors (each learner feeds from its own)

Each learner keeps its own buffer shard, so trajectories stay on the node that made them; only weights
(and the reports of rank 0) cross process boundaries.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from rlft.checkpoint import Checkpointer
from rlft.config import resolve_device
from rlft.learner import Report, train
from rlft.rollout import RolloutGroup, RolloutWorker, local_call

# Rollout workers and learners take turns on the same cores. After each parallel region libgomp busy-waits
# for a long while by default, so the idle process's OpenMP threads steal the cores of the busy one (measured
# on 2 cores: a rollout actor ran 5-7x slower beside an idle learner). A short spin keeps back-to-back ops
# fast and releases the cores within microseconds; a value the user exported wins.
WORKER_ENV = {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "10000")}


def quiet_worker_logs() -> None:
    """Runs in every Ray worker: without the dashboard (off here) Ray Train's placement-group cleaner cannot use
    the state API and warns about it every few seconds; that warning says nothing about the run."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def init_ray(cfg: dict) -> None:
    """Join `ray.address` or $RAY_ADDRESS if given, else start a local Ray with the dashboard off."""
    start_ray(cfg["ray"]["address"], cfg["ray"]["num_cpus"])


def start_ray(address: str | None, num_cpus: int | None, env_vars: dict[str, str] | None = None) -> None:
    """Join `address` or $RAY_ADDRESS if given, else start a local Ray with `num_cpus` logical CPUs (default: the
    cores, at least 4) and the dashboard off; `env_vars` reach every worker. Used by runs and by sweeps."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {**WORKER_ENV, **(env_vars or {})},
                   "worker_process_setup_hook": "rlft.pipeline.quiet_worker_logs"}  # fmt: skip
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
        return
    num_cpus = num_cpus or max(4, os.cpu_count() or 1)  # logical CPUs: Train inside Tune needs headroom
    # Ray starts workers at nice 15, below its own service threads. Every wake-up of those then preempts a
    # learner's OpenMP thread and stalls the whole parallel region at its barrier: measured on 2 cores, the DDPO
    # update ran 20-30% slower in Ray Train than in a plain process. Here the workers are the job, so they run
    # at the driver's priority (a value the user exported wins; a cluster joined above keeps its own setting).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env)


def ray_call(calls: list[tuple[Any, str, tuple]]) -> list[Any]:
    """Run actor methods concurrently; a dict argument (weights) goes to the object store once, not per actor."""
    stored: dict[int, ray.ObjectRef] = {}
    futures = []
    for actor, method, args in calls:
        args = tuple(stored.setdefault(id(a), ray.put(a)) if isinstance(a, dict) else a for a in args)
        futures.append(getattr(actor, method).remote(*args))
    return ray.get(futures)


def share_weights(weights: dict) -> list:
    """Weights into the object store once; the list keeps Ray from resolving the reference in task arguments."""
    return [ray.put(weights)]


def start_rollout_actors(cfg: dict, worker_class: type = RolloutWorker) -> list[Any]:
    """Rollout actors; a crashed one is restarted and its unfinished call retried (it then fetches the weights)."""
    r = cfg["ray"]
    restarts = r["max_rollout_restarts"]
    actor_class = ray.remote(
        num_cpus=r["cpus_per_rollout_worker"], num_gpus=r["gpus_per_rollout_worker"], max_restarts=restarts,
        max_task_retries=restarts,
    )(worker_class)
    return [actor_class.remote(cfg, i) for i in range(r["num_rollout_workers"])]


def _learner_loop(config: dict) -> None:
    """`train_loop_per_worker` of the TorchTrainer: one learner replica with its own rollout actors."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    cfg, actors, queue = config["cfg"], config["actors"], config["queue"]
    per_learner = len(actors) // world_size
    rollouts = RolloutGroup(actors[rank * per_learner : (rank + 1) * per_learner], ray_call, share_weights)
    device = ray.train.torch.get_device() if cfg["ray"]["gpus_per_learner"] else torch.device("cpu")
    train(cfg, rollouts, lambda kind, payload: queue.put((kind, payload)), device, rank, world_size,
          config.get("checkpointer"))  # fmt: skip


def run_with_ray(cfg: dict, report: Report, run_dir: Path, checkpointer: Checkpointer | None = None,
                 worker_class: type = RolloutWorker) -> None:  # fmt: skip
    """Learners in Ray Train; when one dies, Ray Train restarts the group (up to ray.max_learner_failures times)
    and every replica resumes from the newest checkpoint."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    init_ray(cfg)
    reward_server = None
    if cfg["reward"].get("remote"):  # the reward model in its own actor, started before the actors that call it
        from rlft.remote_reward import start_reward_server

        cfg, reward_server = start_reward_server(cfg)
    actors = start_rollout_actors(cfg, worker_class)
    queue = Queue()
    r = cfg["ray"]
    use_gpu = bool(r["gpus_per_learner"])

    def make_trainer() -> TorchTrainer:
        return TorchTrainer(
            _learner_loop,
            train_loop_config={"cfg": cfg, "actors": actors, "queue": queue, "checkpointer": checkpointer},
            scaling_config=ScalingConfig(
                num_workers=r["num_learners"], use_gpu=use_gpu,
                resources_per_worker={"CPU": 1, **({"GPU": r["gpus_per_learner"]} if use_gpu else {})},
            ),
            run_config=RunConfig(name="learners", storage_path=str((run_dir / "ray").resolve()),
                                 failure_config=FailureConfig(max_failures=r["max_learner_failures"])),
        )  # fmt: skip

    failure: list[BaseException] = []

    def fit() -> None:
        try:
            fit_learners(make_trainer)
        except BaseException as error:  # re-raised in the driver's thread below
            failure.append(error)
        finally:
            queue.put(("done", {}))

    thread = threading.Thread(target=fit, name="rlft-trainer", daemon=True)
    thread.start()
    while True:
        kind, payload = queue.get()
        if kind == "done":
            break
        report(kind, payload)
    thread.join()
    for actor in actors + ([reward_server] if reward_server else []):
        ray.kill(actor)
    if failure:
        raise failure[0]


# Ray Train chooses the learners' rendezvous port by binding a free port and closing it again; torch binds it
# later, and on a busy node another process can take it in between (EADDRINUSE: once in ~440 Ray sessions of this
# project's test suite on 2 cores, which failed a sweep's trial). Ray reports that as a controller error, which its
# FailureConfig never retries, so the learners start again here, from the newest checkpoint as after any restart.
PORT_RACE_RETRIES = 3


def fit_learners(make_trainer: Callable[[], Any], retries: int = PORT_RACE_RETRIES) -> None:
    """`make_trainer().fit()`; a new trainer when the learners' process group lost the race for its port."""
    for attempt in range(retries + 1):
        try:
            make_trainer().fit()
            return
        except Exception as error:
            if attempt == retries or not lost_port_race(error):
                raise
            print(f"rlft: the learners' process group could not bind its port (another process took it after Ray "
                  f"Train chose it); starting the learners again ({attempt + 1} of {retries})", flush=True)  # fmt: skip


def lost_port_race(error: BaseException) -> bool:
    from ray.train import ControllerError

    return isinstance(error, ControllerError) and "EADDRINUSE" in str(error)


def run_local(cfg: dict, report: Report, checkpointer: Checkpointer | None = None) -> None:
    """The same loop in this process, no Ray: rollout workers as plain objects, one learner."""
    workers = [RolloutWorker(cfg, i) for i in range(cfg["ray"]["num_rollout_workers"])]
    train(cfg, RolloutGroup(workers, local_call), report, resolve_device(cfg["device"]), checkpointer=checkpointer)
