"""The Ray pipeline: rollout actors, Ray Train learners (DDP), and a queue that carries reports to the driver.

    driver (rlft.run) --- Recorder <- Queue <- learner rank 0
       |                                         |  collect / set_weights / evaluate
       +-- TorchTrainer: learners 0..L-1 (DDP) --+--> rollout actors (each learner feeds from its own)

Each learner keeps its own buffer shard, so trajectories stay on the node that made them; only weights
(and the reports of rank 0) cross process boundaries. Every blocking call has a timeout: a rollout actor that does
not answer within `ray.collect_timeout_s` counts as hung and is replaced (Ray restarts it and retries its call). An
error the user can fix (a reward of the wrong shape, a full disk) ends the run with one line, not a traceback.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from rlft.checkpoint import Checkpointer, CheckpointError
from rlft.config import ConfigError, resolve_device
from rlft.envs.rewards import RewardError
from rlft.learner import Report, train
from rlft.remote_reward import actor_restarts, wait_for_restart
from rlft.rollout import RolloutGroup, RolloutWorker, local_call
from rlft.train_loop import learner_loop

# Rollout workers and learners take turns on the same cores. After each parallel region libgomp busy-waits
# for a long while by default, so the idle process's OpenMP threads steal the cores of the busy one (measured
# on 2 cores: a rollout actor ran 5-7x slower beside an idle learner). A short spin keeps back-to-back ops
# fast and releases the cores within microseconds; a value the user exported wins.
WORKER_ENV = {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", "10000")}
# errors a user can act on: they end the run with their message alone (the learners report them to the driver)
RUN_ERRORS = (ConfigError, CheckpointError, RewardError, FileNotFoundError)


RUN_TOKEN_FILE = ".driver-token"  # written by the driver in the run folder, read back by every learner


def check_shared_run_dir(run_dir: Path, token: str) -> None:
    """Raise a ConfigError when this process does not see the driver's run folder (another node's local disk)."""
    path = run_dir / RUN_TOKEN_FILE
    if not path.is_file() or path.read_text() != token:
        raise ConfigError(f"the learner on node {os.uname().nodename} does not see the run folder {run_dir} that the "
                          "driver writes (its checkpoints go there): on a multi-node cluster, put logging.run_dir on "
                          "storage every node mounts at the same path (NFS, EFS, a cluster file system)")


class StopRun(Exception):
    """Raised in the driver to end a run with one line: an error the learners reported."""


def error_message(error: BaseException) -> str:
    """The message of an error, also when Ray wrapped it (a RayTaskError's own text holds the remote traceback)."""
    cause = getattr(error, "cause", None)
    return " ".join(str(cause if isinstance(cause, BaseException) else error.args[0] if error.args else error).split())


def init_ray(spec) -> None:
    """Join `ray.address` or $RAY_ADDRESS if given, else start a local Ray with the dashboard off."""
    start_ray(spec.ray.address, spec.ray.num_cpus)


def start_ray(address: str | None, num_cpus: int | None, env_vars: dict[str, str] | None = None) -> None:
    """Join `address` or $RAY_ADDRESS if given, else start a local Ray with `num_cpus` logical CPUs (default: the
    cores, at least 4) and the dashboard off; `env_vars` reach every worker. Used by runs and by sweeps."""
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": {**WORKER_ENV, **(env_vars or {})}}
    # Ray turns on token authentication for the local cluster it starts and says so on every start; that is Ray's
    # default, not news about the run
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    # log_to_driver=False: the workers' logs (Ray Train's controller chatter, Ray's own warnings) stay in Ray's log
    # files; what a run has to say reaches the terminal through its reports (rlft.recorder)
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env, log_to_driver=False)
        return
    num_cpus = num_cpus or max(4, os.cpu_count() or 1)  # logical CPUs: Train inside Tune needs headroom
    # Ray starts workers at nice 15, below its own service threads. Every wake-up of those then preempts a
    # learner's OpenMP thread and stalls the whole parallel region at its barrier: measured on 2 cores, the DDPO
    # update ran 20-30% slower in Ray Train than in a plain process. Here the workers are the job, so they run
    # at the driver's priority (a value the user exported wins; a cluster joined above keeps its own setting).
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env,
             log_to_driver=False)  # fmt: skip


class RayCall:
    """Run actor methods concurrently, each within `timeout_s`: an actor that has not answered by then is killed,
    Ray restarts it and retries the call (the actors' max_task_retries), up to `restarts` times. A call whose actor
    became unreachable (its node lost: Ray restarts the actor elsewhere but does not retry a call that may have run)
    is sent again, within the same budget: every rollout call is idempotent (a collection is a pure function of its
    arguments and lands in the buffer once by its uid). A dict argument (weights) goes to the object store once, not
    per actor. `submit` starts the calls and `wait` collects them (the learner's asynchronous collection trains in
    between); calling the object does both."""

    def __init__(self, timeout_s: float = float("inf"), restarts: int = 0, warn: Callable[[str], None] = print):
        self.timeout_s, self.restarts, self.warn = timeout_s, restarts, warn

    def __call__(self, calls: list[tuple[Any, str, tuple]]) -> list[Any]:
        return self.wait(self.submit(calls))

    def submit(self, calls: list[tuple[Any, str, tuple]]) -> tuple[list, list[ray.ObjectRef]]:
        stored: dict[int, ray.ObjectRef] = {}
        sent = [(actor, method, tuple(stored.setdefault(id(a), ray.put(a)) if isinstance(a, dict) else a
                                      for a in args)) for actor, method, args in calls]  # fmt: skip
        return sent, [getattr(actor, method).remote(*args) for actor, method, args in sent]

    def wait(self, submitted: tuple[list, list[ray.ObjectRef]]) -> list[Any]:
        """The results of submitted calls, in order; the timeout counts from now."""
        calls, futures = submitted[0], list(submitted[1])
        timeout = None if self.timeout_s == float("inf") else self.timeout_s
        for attempt in range(self.restarts + 1):
            _, pending = ray.wait(futures, num_returns=len(futures), timeout=timeout)
            if not pending:
                results, lost = [], []
                for index, future in enumerate(futures):
                    try:
                        results.append(ray.get(future))
                    except ray.exceptions.ActorUnavailableError:
                        results.append(None)
                        lost.append(index)
                if not lost:
                    return results
                if attempt == self.restarts:
                    raise RuntimeError(f"{len(lost)} rollout worker(s) stayed unreachable after {self.restarts} "
                                       "retries (their nodes lost, and none with their resources came back); raise "
                                       "ray.max_rollout_restarts or check the cluster's nodes")  # fmt: skip
                self.warn(f"{len(lost)} rollout worker(s) became unreachable (a node lost?); Ray restarts them on "
                          "another node and their calls are sent again")  # fmt: skip
                for index in lost:
                    actor, method, args = calls[index]
                    futures[index] = getattr(actor, method).remote(*args)
                continue
            if attempt == self.restarts:
                break
            replaced = []
            for actor, future in zip((actor for actor, _, _ in calls), futures, strict=True):
                if future in pending:
                    self.warn(f"a rollout worker did not answer within ray.collect_timeout_s={self.timeout_s:g} s; "
                              "replacing it and retrying its call")  # fmt: skip
                    replaced.append((actor, actor_restarts(actor)))
                    ray.kill(actor, no_restart=False)
            for actor, before in replaced:  # the retried calls are timed from when their new actors are up
                wait_for_restart(actor, before)
        raise RuntimeError(f"rollout workers did not answer within ray.collect_timeout_s={self.timeout_s:g} s, "
                           f"{self.restarts + 1} times; raise ray.collect_timeout_s for slow rollouts")


def share_weights(weights: dict) -> list:
    """Weights into the object store once; the list keeps Ray from resolving the reference in task arguments."""
    return [ray.put(weights)]


def start_rollout_actors(spec, worker_class: type = RolloutWorker) -> list[Any]:
    """Rollout actors; a crashed one is restarted and its unfinished call retried (it then fetches the weights)."""
    r = spec.ray
    restarts = r.max_rollout_restarts
    actor_class = ray.remote(
        num_cpus=r.cpus_per_rollout_worker, num_gpus=r.gpus_per_rollout_worker, resources=dict(r.rollout_resources),
        max_restarts=restarts, max_task_retries=restarts,
    )(worker_class)  # fmt: skip
    return [actor_class.remote(spec, i) for i in range(r.num_rollout_workers)]


def run_with_ray(spec, report: Report, run_dir: Path, checkpointer: Checkpointer | None = None,
                 worker_class: type = RolloutWorker, stop: threading.Event | None = None) -> None:  # fmt: skip
    """Learners in Ray Train; when one dies, Ray Train restarts the group (up to ray.max_learner_failures times)
    and every replica resumes from the newest checkpoint. Setting `stop` (Ctrl-C) ends the run after the epoch in
    progress, with a checkpoint."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    init_ray(spec)
    reward_actors = []
    if spec.ray.remote_reward:  # the reward model in its own actor, started before the actors that call it
        from rlft.remote_reward import start_reward_server

        spec, reward_actors = start_reward_server(spec)
    actors = start_rollout_actors(spec, worker_class)
    # the reports' queue lives on the driver's node, as Ray Train's controller does: on a cluster, losing a worker
    # node (a spot instance reclaimed) then costs the actors and learners on it, which restart, never the run
    queue = Queue(actor_options={"scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)})  # fmt: skip
    # a stop request travels as a file in the run folder: every learner sees it (on a cluster the run folder is on
    # shared storage), and it costs no extra Ray actor
    stop_file = run_dir / ".stop"
    stop_file.unlink(missing_ok=True)
    # the learners check that they see this run's folder (their checkpoints go there): on a cluster it has to be
    # on storage every node mounts at the same path, and a node-local folder of the same name would lose them
    run_token = os.urandom(8).hex()
    (run_dir / RUN_TOKEN_FILE).write_text(run_token)
    r = spec.ray
    use_gpu = bool(r.gpus_per_learner)

    def make_trainer() -> TorchTrainer:
        return TorchTrainer(
            learner_loop,
            # pickled here and unpickled only in the learners: Ray Train's controller process then never imports
            # rlft's layers (torch, diffusers, tensordict: seconds of CPU per process on a small machine)
            train_loop_config={"job": pickle.dumps((spec, checkpointer, str(stop_file), run_token)), "actors": actors,
                               "queue": queue},
            scaling_config=ScalingConfig(
                num_workers=r.num_learners, use_gpu=use_gpu,
                resources_per_worker={"CPU": 1, **({"GPU": r.gpus_per_learner} if use_gpu else {}),
                                      **r.learner_resources},
            ),
            run_config=RunConfig(name="learners", storage_path=str(run_dir / "ray"),
                                 failure_config=FailureConfig(max_failures=r.max_learner_failures),
                                 logging_config=LoggingConfig(log_level="ERROR")),
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
    errors: list[str] = []
    while True:
        if stop is not None and stop.is_set() and not stop_file.exists():
            stop_file.touch()
        try:
            kind, payload = queue.get(timeout=0.5)
        except Empty:
            continue
        if kind == "done":
            break
        if kind == "error":
            errors.append(payload["message"])
            continue
        report(kind, payload)
    thread.join()
    stop_file.unlink(missing_ok=True)
    (run_dir / RUN_TOKEN_FILE).unlink(missing_ok=True)
    for actor in actors + reward_actors:
        ray.kill(actor)
    if errors:
        raise StopRun(errors[0])
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


def run_local(spec, report: Report, checkpointer: Checkpointer | None = None,
              stop: threading.Event | None = None) -> None:  # fmt: skip
    """The same loop in this process, no Ray: rollout workers as plain objects, one learner."""
    workers = [RolloutWorker(spec, i) for i in range(spec.ray.num_rollout_workers)]
    train(spec, RolloutGroup(workers, local_call), report, resolve_device(spec.device), checkpointer=checkpointer,
          stop_requested=stop.is_set if stop is not None else lambda: False)  # fmt: skip
