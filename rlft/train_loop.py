"""The Ray Train entry point of the learners, in a module that imports nothing heavy.

Ray Train's controller process unpickles the train function and its config; keeping this module light (rlft's
layers are imported inside the function, and the run's spec travels pickled as bytes) spares the controller the
seconds of CPU that importing torch, diffusers and tensordict costs every process on a small machine.
"""

from __future__ import annotations

import pickle
from pathlib import Path


def learner_loop(config: dict) -> None:
    """`train_loop_per_worker` of the TorchTrainer: one learner replica with its own rollout actors. An error the
    user can fix is reported to the driver and the loop returns, so Ray Train does not retry what cannot succeed."""
    import ray.train
    import ray.train.torch
    import torch

    from rlft.learner import train
    from rlft.pipeline import RUN_ERRORS, RayCall, check_shared_run_dir, error_message, share_weights
    from rlft.rollout import RolloutGroup

    spec, checkpointer, stop_file, run_token = pickle.loads(config["job"])
    stop_file = Path(stop_file)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    actors, queue = config["actors"], config["queue"]
    per_learner = len(actors) // world_size
    r = spec.ray

    def report(kind: str, payload: dict) -> None:
        queue.put((kind, payload))

    call = RayCall(r.collect_timeout_s, r.max_rollout_restarts,
                   warn=lambda message: report("warning", {"message": message}))  # fmt: skip
    rollouts = RolloutGroup(actors[rank * per_learner : (rank + 1) * per_learner], call, share_weights)
    device = ray.train.torch.get_device() if r.gpus_per_learner else torch.device("cpu")
    try:
        check_shared_run_dir(stop_file.parent, run_token)
        train(spec, rollouts, report, device, rank, world_size, checkpointer, stop_requested=stop_file.exists)
    except RUN_ERRORS as error:
        queue.put(("error", {"message": error_message(error)}))
