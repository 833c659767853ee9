"""Atomic checkpoints and resumable runs: everything a run needs to continue exactly where it stopped.

    <run_dir>/checkpoints/epoch_000040/
        policy.safetensors      the trainable weights (the same layout as final/policy.safetensors)
        optimizer.safetensors   optimizer tensors (AdamW moments, step counts)
        rank_<r>.safetensors    per learner replica: torch RNG, the learner's generator, buffer shard tensors
        rank_<r>.json           per learner replica: the algorithm's state (e.g. DDPO's per-context statistics),
                                buffer uids / cursor / stats, and where each tensor above belongs
        state.json              counters (epoch, policy_version), optimizer and lr-scheduler settings, config,
                                config hash, model signature, wandb run id, and the size and sha256 of every file
        COMMITTED               written last: a folder without it is not a checkpoint

A checkpoint is written into `.epoch_XXXXXX.tmp/` (every replica writes its own rank files, each fsynced),
renamed into place, and only then marked COMMITTED; a run killed at any moment leaves either the previous
checkpoint or the new one, never half of one. Tensors go through safetensors and everything else through
JSON, so loading a checkpoint never unpickles anything: a file that is not what it claims (a pickle in place
of safetensors, a truncated file) is refused with an error, and the previous checkpoint is used instead.
A run continues another run's checkpoint once `adopt` has copied it into its folder (a Ray Tune trial given a
checkpoint does: PBT copying a better trial's into it, or Tune restoring it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rlft.config import ConfigError
from rlft.fsdp import full_state, shard_optimizer_state

FORMAT_VERSION = 1
COMMIT_MARKER = "COMMITTED"
# keys that change how a run is operated, not what it computes: they may differ between a run and its resumption
OPERATIONAL_KEYS = ("logging", "resume", "trainer.checkpoint_every", "trainer.keep_checkpoints", "ray.address",
                    "ray.num_cpus", "ray.max_rollout_restarts", "ray.max_learner_failures", "ray.collect_timeout_s",
                    "ray.reward_timeout_s", "ray.max_reward_restarts", "ray.rollout_resources",
                    "ray.learner_resources", "ray.reward_actors",
                    "ray.reward_batch_window_s",
                    # DDP and FSDP learners write the same checkpoint (full weights, full optimizer state)
                    "ray.learner_parallelism")  # fmt: skip
PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol 2+ opcode, zip (torch.save's container)
# what state.json holds besides its format (Checkpointer._commit writes them all)
STATE_KEYS = ("epoch", "policy_version", "world_size", "config_hash", "wandb_run_id", "signature", "optimizer",
              "lr_scheduler", "config", "files")  # fmt: skip


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: damaged, unsafe, or made for another model."""


# ---- config identity ----
def _without(cfg: dict, dotted: tuple[str, ...]) -> dict:
    out = json.loads(json.dumps(cfg))
    for key in dotted:
        *parents, leaf = key.split(".")
        node = out
        for parent in parents:
            node = node.get(parent, {})
        node.pop(leaf, None)
    return out


def config_hash(cfg: dict) -> str:
    """sha256 (16 hex digits) of the resolved config without its operational keys."""
    return hashlib.sha256(json.dumps(_without(cfg, OPERATIONAL_KEYS), sort_keys=True).encode()).hexdigest()[:16]


def flatten(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_signature(spec) -> dict[str, Any]:
    """What fixes the shapes and meaning of the weights: algorithm, base model and its architecture."""
    try:
        config = spec.env.network_config()
    except (OSError, ValueError):  # a missing model is reported, with the fix, when it is checked
        config = {}
    architecture = {f"model.{k}": v for k, v in config.items() if not k.startswith("_")}
    return {"algo.name": spec.algo.name, "env.base_model": spec.env.base_model, **architecture}


def signature_mismatch(saved: dict, current: dict) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint {saved.get(k)!r}, this run {current.get(k)!r}" for k in keys
            if json.dumps(saved.get(k)) != json.dumps(current.get(k))]  # fmt: skip


# ---- nested state <-> (JSON-able plain data, flat tensor dict) ----
def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Replace every tensor in a nested structure by {"__tensor__": key}, collecting it under that key."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: split_tensors(v, tensors, f"{path}.{k}" if path else k) for k, v in obj.items()}
        if all(isinstance(k, int) for k in obj):  # optimizer state is keyed by parameter index
            return {"__int_keys__": {str(k): split_tensors(v, tensors, f"{path}.{k}") for k, v in obj.items()}}
        raise TypeError(f"cannot checkpoint a dict with keys of mixed or unsupported types at {path!r}")
    if isinstance(obj, list | tuple):
        return [split_tensors(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path!r}: only tensors and plain data are stored")


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__int_keys__"}:
            return {int(k): join_tensors(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


# ---- files ----
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))
    _fsync(path)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def _digest(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _check_safetensors(path: Path) -> None:
    """Refuse anything but a safetensors file. It is parsed first (safe_open reads the header without the tensors):
    a safetensors file starts with its header's length, a little-endian u64, whose first byte can be anything
    (0x80 for 1 header length in 32), so only a file that does not parse is examined for a pickle's signature."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return
    except (SafetensorError, OSError) as error:
        failure = error
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(PICKLE_MAGIC):
        raise CheckpointError(f"{path} holds a pickle (or a torch.save archive), which could run code when loaded; "
                              "refused: checkpoints hold only safetensors and JSON")  # fmt: skip
    raise CheckpointError(f"{path} is not a readable safetensors file ({failure})")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    _check_safetensors(path)
    return load_file(str(path))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not readable JSON ({error}); the checkpoint is damaged") from None


def epoch_of(folder: Path) -> int:
    """The epoch in a checkpoint folder's name (epoch_000040 -> 40); -1 for a name that holds none."""
    digits = folder.name.removeprefix("epoch_")
    return int(digits) if digits.isdigit() else -1


def committed(folder: Path) -> list[Path]:
    """The committed checkpoints in `folder`, oldest first by epoch number (not by name)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("epoch_*") if (p / COMMIT_MARKER).exists() and epoch_of(p) >= 0),
                  key=epoch_of)  # fmt: skip


@dataclasses.dataclass
class Checkpoint:
    """A verified checkpoint: shared state (state.json, weights, optimizer) and one replica's state per rank."""

    path: Path
    state: dict

    @property
    def epoch(self) -> int:
        return self.state["epoch"]

    @classmethod
    def open(cls, path: Path) -> Checkpoint:
        """Check the manifest (every file present, of the recorded size and sha256) before anything is parsed."""
        try:
            return cls._open(path)
        except (KeyError, TypeError, AttributeError) as error:  # a state.json that parses but lacks its fields
            raise CheckpointError(f"{path}: state.json is malformed ({type(error).__name__}: {error})") from None

    @classmethod
    def _open(cls, path: Path) -> Checkpoint:
        state = _read_json(path / "state.json")
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: state.json holds no checkpoint manifest")
        if state.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, expected {FORMAT_VERSION}")
        lacking = [key for key in STATE_KEYS if key not in state]  # each is read when the checkpoint is resumed
        if lacking:
            raise CheckpointError(f"{path}: state.json is malformed (it lacks {', '.join(lacking)}); the checkpoint "
                                  "is damaged")  # fmt: skip
        for name, recorded in state["files"].items():
            file = path / name
            if not file.exists():
                raise CheckpointError(f"{path}: {name} is missing; the checkpoint is incomplete")
            actual = _digest(file)
            if actual["bytes"] != recorded["bytes"]:
                raise CheckpointError(f"{path}: {name} has {actual['bytes']} bytes, {recorded['bytes']} were written; "
                                      "the file is truncated or was overwritten")  # fmt: skip
            if actual["sha256"] != recorded["sha256"]:
                raise CheckpointError(f"{path}: {name} does not match the sha256 recorded when it was written")
        unexpected = sorted({p.name for p in path.iterdir()} - set(state["files"]) - {"state.json", COMMIT_MARKER})
        if unexpected:
            raise CheckpointError(f"{path}: unexpected files {unexpected}; checkpoints hold only the files they list")
        for name in state["files"]:
            if name.endswith(".safetensors"):
                _check_safetensors(path / name)
            else:
                _read_json(path / name)
        return cls(path, state)

    def shared(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(trainable weights, optimizer state dict)."""
        weights = _read_tensors(self.path / "policy.safetensors")
        optimizer = join_tensors(self.state["optimizer"], _read_tensors(self.path / "optimizer.safetensors"))
        return weights, optimizer

    def replica(self, rank: int) -> dict:
        return join_tensors(_read_json(self.path / f"rank_{rank}.json"),
                            _read_tensors(self.path / f"rank_{rank}.safetensors"))  # fmt: skip


def due(epoch: int, every: int, last_epoch: int) -> bool:
    """Whether a periodic event (a checkpoint, an evaluation, a Tune report's wait for them) falls on `epoch`:
    every `every` epochs, and after the last."""
    return epoch % every == 0 or epoch == last_epoch


def _publish(tmp: Path, final: Path, epoch: int) -> None:
    """Rename a checkpoint whose files are all written and fsynced into place, then mark it committed."""
    if final.exists():  # an uncommitted folder of the same epoch from a killed run
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)
    marker = final / COMMIT_MARKER
    marker.write_text(f"epoch {epoch}\n")
    _fsync(marker)
    _fsync(final)


def adopt(source: Path, folder: Path) -> Checkpoint:
    """Make the committed checkpoint in `source` (another run's, or Ray Tune's copy of one) the only checkpoint in
    `folder`, a run's checkpoints folder, so that the run continues from it. It is verified before anything in
    `folder` is removed, and copied in as a temporary folder that is committed last, as a new checkpoint is."""
    if not (source / COMMIT_MARKER).exists():
        raise CheckpointError(f"{source} is not a committed checkpoint (it has no {COMMIT_MARKER} marker)")
    epoch = Checkpoint.open(source).epoch
    tmp, final = folder / f".epoch_{epoch:06d}.tmp", folder / f"epoch_{epoch:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(COMMIT_MARKER))
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    for old in committed(folder):
        (old / COMMIT_MARKER).unlink()  # uncommit first: a half-deleted folder is never taken for a checkpoint
    for old in folder.glob("epoch_*"):
        shutil.rmtree(old)
    _publish(tmp, final, epoch)
    return Checkpoint.open(final)


def latest_valid(folder: Path, warn=print) -> Checkpoint | None:
    """The newest committed checkpoint that passes its checks; damaged ones are named and skipped. When there are
    checkpoints but none can be used, raises CheckpointError naming each and why, and touches nothing: starting the
    run again would overwrite its metrics and let retention delete what is left."""
    found = committed(folder)
    problems = []
    for path in reversed(found):
        try:
            return Checkpoint.open(path)
        except CheckpointError as error:
            warn(f"skipping damaged checkpoint: {error}")
            problems.append(str(error))
    if found:
        raise CheckpointError(f"{folder} holds {len(found)} checkpoint(s) and none can be used: " + "; ".join(problems)
                              + ". Nothing was changed; move the folder aside to start afresh")  # fmt: skip
    return None


# ---- what a learner replica saves and restores ----
def replica_state(learner) -> dict:
    state = {
        "torch_rng": torch.get_rng_state(),
        "generator": learner.ctx.generator.get_state(),
        "algorithm": learner.state.state_dict() if hasattr(learner.state, "state_dict") else None,
        "buffer": learner.buffer.state_dict() if learner.buffer is not None else None,
        "eval_baseline": learner.eval_baseline,  # the base model's evaluation, which hacking gaps compare with
    }
    if torch.cuda.is_available() and learner.device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(learner.device)
    return state


def restore_replica(learner, checkpoint: Checkpoint) -> None:
    weights, optimizer = checkpoint.shared()
    current = {k: tuple(v.shape) for k, v in learner.policy.trainable_state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in weights.items()}
    if current != saved:
        diff = sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))
        named = "; ".join(f"{k}: checkpoint {saved.get(k)}, this run {current.get(k)}" for k in diff[:5])
        raise CheckpointError(f"{checkpoint.path} holds weights of another model: {named}")
    learner.policy.load_trainable_state_dict({k: v.to(learner.device) for k, v in weights.items()})
    # the moments, step counts and the schedule's position come from the checkpoint; the hyperparameters (lr,
    # weight decay) stay this run's, from its config: a resumed run may change them, and a PBT trial continues
    # another trial's checkpoint with mutated ones
    settings = [{k: v for k, v in group.items() if k != "params"} for group in learner.ctx.optimizer.param_groups]
    # new param_groups: the checkpoint's; FSDP learners keep their shard of each moment
    learner.ctx.optimizer.load_state_dict(shard_optimizer_state(optimizer, learner.ctx.optimizer))
    scheduler = learner.lr_scheduler
    scheduler.load_state_dict(checkpoint.state["lr_scheduler"])
    scheduler.base_lrs = [setting["initial_lr"] for setting in settings]
    groups = learner.ctx.optimizer.param_groups
    for group, setting, base, factor in zip(groups, settings, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group.update(setting, lr=base * factor(scheduler.last_epoch))
    learner.policy_version = checkpoint.state["policy_version"]
    replica = checkpoint.replica(learner.rank)
    torch.set_rng_state(replica["torch_rng"])
    learner.ctx.generator.set_state(replica["generator"])
    if "cuda_rng" in replica and learner.device.type == "cuda":
        torch.cuda.set_rng_state(replica["cuda_rng"], learner.device)
    if replica["algorithm"] is not None:
        learner.state.load_state_dict(replica["algorithm"])
    if replica["buffer"] is not None:
        learner.buffer.load_state_dict(replica["buffer"])
    learner.eval_baseline = replica.get("eval_baseline")


@dataclasses.dataclass
class Checkpointer:
    """Writes and finds the checkpoints of one run; plain data, so it travels to Ray Train workers."""

    run_dir: str
    every: int
    keep: int
    config_hash: str
    config: dict
    signature: dict
    wandb_run_id: str | None = None

    @property
    def folder(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def due(self, epoch: int, last_epoch: int) -> bool:
        return due(epoch, self.every, last_epoch)

    def restore(self, learner, warn=print) -> int:
        """Load the newest valid checkpoint into `learner`; returns its epoch (0 when there is none)."""
        checkpoint = latest_valid(self.folder, warn=warn)
        if checkpoint is None:
            return 0
        world_size = checkpoint.state["world_size"]
        if world_size != learner.world_size:
            raise CheckpointError(f"{checkpoint.path} was written by {world_size} learners; resume it with "
                                  f"ray.num_learners={world_size} (this run has {learner.world_size})")  # fmt: skip
        restore_replica(learner, checkpoint)
        return checkpoint.epoch

    def save(self, learner, epoch: int) -> Path:
        """Collective: every replica writes its rank files, then rank 0 writes the manifest and commits. A write
        that fails (a full disk) removes the temporary folder and raises one CheckpointError; the checkpoints
        already committed stay as they were."""
        distributed = learner.world_size > 1
        tmp = self.folder / f".epoch_{epoch:06d}.tmp"
        final = self.folder / f"epoch_{epoch:06d}"
        try:
            if learner.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing (the run folder is locked)
                tmp.mkdir(parents=True)
            if distributed:
                torch.distributed.barrier()
            # the full weights and optimizer state for rank 0 to write: gathering an FSDP learner's is a collective
            # every replica joins; a DDP replica holds them whole, so only rank 0 copies them
            shared = None
            if learner.rank == 0 or learner.ctx.sharded:
                shared = learner.policy.trainable_state_dict(), full_state(learner.ctx.optimizer.state_dict())
            tensors: dict[str, torch.Tensor] = {}
            plain = split_tensors(replica_state(learner), tensors)
            _write_tensors(tmp / f"rank_{learner.rank}.safetensors", tensors)
            _write_json(tmp / f"rank_{learner.rank}.json", plain)
            if distributed:
                torch.distributed.barrier()
            if learner.rank == 0:
                self._commit(learner, epoch, tmp, final, *shared)
        except OSError as error:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = committed(self.folder)
            raise CheckpointError(f"could not write the checkpoint of epoch {epoch} in {self.folder} ({error}); the "
                                  f"temporary folder was removed and {kept[-1].name if kept else 'no checkpoint'} is "
                                  "the newest intact one; free space and resume the run") from None  # fmt: skip
        if distributed:
            torch.distributed.barrier()
        return final

    def _commit(self, learner, epoch: int, tmp: Path, final: Path, weights: dict, optimizer: dict) -> None:
        _write_tensors(tmp / "policy.safetensors", weights)
        optimizer_tensors: dict[str, torch.Tensor] = {}
        optimizer_plain = split_tensors(optimizer, optimizer_tensors)
        _write_tensors(tmp / "optimizer.safetensors", optimizer_tensors)
        files = {p.name: _digest(p) for p in sorted(tmp.iterdir())}
        _write_json(tmp / "state.json", {
            "format": FORMAT_VERSION, "epoch": epoch, "policy_version": learner.policy_version,
            "world_size": learner.world_size, "config_hash": self.config_hash, "wandb_run_id": self.wandb_run_id,
            "signature": self.signature, "optimizer": optimizer_plain,
            "lr_scheduler": split_tensors(learner.lr_scheduler.state_dict(), {}), "config": self.config,
            "files": files,
        })  # fmt: skip
        _fsync(tmp)
        _publish(tmp, final, epoch)
        for old in committed(self.folder)[: -self.keep]:
            (old / COMMIT_MARKER).unlink()  # uncommit first: a half-deleted folder is never taken for a checkpoint
            shutil.rmtree(old)


# ---- the driver side: which folder, which checkpoint, which wandb run ----
@dataclasses.dataclass
class RunPlan:
    run_dir: Path
    checkpointer: Checkpointer
    start_epoch: int  # the epoch the resumed checkpoint ended (0 for a new run)


def _matching_runs(root: Path, wanted: str) -> list[tuple[float, Path]]:
    found = []
    for run in root.glob("*") if root.is_dir() else []:
        checkpoints = committed(run / "checkpoints")  # only state.json is read here: hashing every file is slow
        try:
            state = json.loads((checkpoints[-1] / "state.json").read_text()) if checkpoints else {}
        except (OSError, ValueError):
            continue
        if state.get("config_hash") == wanted:
            found.append(((checkpoints[-1] / COMMIT_MARKER).stat().st_mtime, run))
    return sorted(found)


def plan_run(spec, new_run_dir: Path) -> RunPlan:
    """Resolve `resume` (null, a run folder or "auto") into the run folder and the checkpoint to continue from.

    The run folder is made absolute here, once, so that learners and rollout workers write into it whatever their
    working directory (Ray Train's workers run in Ray's session folder). A checkpoint made for another model
    (algorithm, base model or architecture) is refused with the fields that differ; other config differences are
    reported and the run continues with the new values.
    """
    from rlft.config import to_dict

    cfg = to_dict(spec)
    digest, signature = config_hash(cfg), model_signature(spec)
    resume = spec.resume
    run_dir = new_run_dir.expanduser().resolve()
    if not resume and committed(run_dir / "checkpoints"):
        raise ConfigError(f"{run_dir} already holds checkpoints of a run; continue it with resume={new_run_dir}, or "
                          "choose another logging.run_dir")  # fmt: skip
    if resume == "auto":
        candidates = [run_dir] if spec.logging.run_dir else []
        matches = _matching_runs(run_dir.parent, digest) if not candidates else [
            (0.0, c) for c in candidates if committed(c / "checkpoints")]  # fmt: skip
        if matches:
            run_dir = matches[-1][1]
    elif resume:
        run_dir = Path(resume).expanduser().resolve()
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(f"resume={resume}: not a run folder (no config.yaml there); give the folder a run "
                              "printed at its start, or resume=auto")  # fmt: skip
    try:
        checkpoint = latest_valid(run_dir / "checkpoints", warn=lambda m: print(f"rlft: {m}")) if resume else None
    except CheckpointError as error:
        raise ConfigError(str(error)) from None
    wandb_run_id = None
    start_epoch = 0
    if checkpoint is not None:
        mismatch = signature_mismatch(checkpoint.state["signature"], signature)
        if mismatch:
            raise ConfigError(f"the checkpoint {checkpoint.path} was made for another model; refusing to resume it: "
                              + "; ".join(mismatch))  # fmt: skip
        if checkpoint.state["world_size"] != spec.ray.num_learners:
            raise ConfigError(f"the checkpoint {checkpoint.path} holds {checkpoint.state['world_size']} learner "
                              f"replicas; resume with ray.num_learners={checkpoint.state['world_size']}")
        if checkpoint.state["config_hash"] != digest:
            saved, now = flatten(_without(checkpoint.state["config"], OPERATIONAL_KEYS)), flatten(
                _without(cfg, OPERATIONAL_KEYS))  # fmt: skip
            changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                       if saved.get(k) != now.get(k)]  # fmt: skip
            print("rlft: resuming with a changed config: " + "; ".join(changed), file=sys.stderr, flush=True)
        wandb_run_id, start_epoch = checkpoint.state["wandb_run_id"], checkpoint.epoch
        print(f"rlft: resuming {run_dir} from {checkpoint.path.name} (epoch {start_epoch})", flush=True)
    elif resume and resume != "auto":
        print(f"rlft: {run_dir} has no checkpoint yet; starting it again from epoch 0", flush=True)
    if wandb_run_id is None and spec.logging.wandb != "disabled":
        wandb_run_id = uuid.uuid4().hex[:8]
    trainer = spec.trainer
    checkpointer = Checkpointer(str(run_dir), trainer.checkpoint_every, trainer.keep_checkpoints, digest, cfg,
                                signature, wandb_run_id)  # fmt: skip
    return RunPlan(run_dir, checkpointer, start_epoch)


class RunLock:
    """An exclusive lock on a run folder for the life of the run that writes it: a second run on the same folder
    (two terminals, a sweep retried while its trial still runs) is refused instead of interleaving checkpoints.
    The operating system releases it when the process ends, however it ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.handle = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open for the run)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(f"{self.path.parent} is in use by another rlft run (process {holder}); wait for it to "
                              "end, or choose another logging.run_dir") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.close()  # closing the file releases the lock
            self.handle = None
