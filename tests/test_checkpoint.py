"""Checkpoints and resume without Ray: atomic layout, exact resumption after SIGKILL, damaged and unsafe files."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlft.checkpoint import COMMIT_MARKER, Checkpoint, CheckpointError, adopt, committed, join_tensors, split_tensors
from rlft.run import main
from tests.conftest import save_tiny_ddpm

TINY = ["env.num_inference_steps=4", "trainer.rollout_batch_size=8", "trainer.samples_per_epoch=16",
        "algo.minibatch_size=8", "eval.num_samples=8", "eval.every=2", "ray.rollout_threads=1",
        "ray.learner_threads=1", "ray.enabled=false", "logging.wandb=disabled", "logging.progress=false",
        "trainer.checkpoint_every=1"]  # fmt: skip


def run(model_dir, run_dir, *overrides) -> Path:
    return main([f"env.base_model={model_dir}", f"logging.run_dir={run_dir}", *TINY, *overrides])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "policy.safetensors"))


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_optimizer_state_round_trips_through_plain_data_and_tensors():
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.randn(3, 2)
    optimizer.step()
    tensors = {}
    plain = split_tensors(optimizer.state_dict(), tensors)
    json.dumps(plain)  # plain data only
    restored = join_tensors(json.loads(json.dumps(plain)), tensors)
    fresh = torch.optim.AdamW([torch.nn.Parameter(param.detach().clone())], lr=1e-3)
    fresh.load_state_dict(restored)
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg_sq"], optimizer.state_dict()["state"][0]["exp_avg_sq"])
    with pytest.raises(TypeError, match="only tensors and plain data"):
        split_tensors({"callback": print}, {})


@pytest.mark.slow
def test_killed_driver_resumes_and_ends_with_the_weights_of_an_uninterrupted_run(tiny_model_dir, tmp_path):
    epochs = 8
    reference = run(tiny_model_dir, tmp_path / "uninterrupted", f"trainer.epochs={epochs}")
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "rlft.run", f"env.base_model={tiny_model_dir}", f"logging.run_dir={killed}",
               *TINY, f"trainer.epochs={epochs}"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 240
    while not committed(killed / "checkpoints") and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    stopped_at = Checkpoint.open(committed(killed / "checkpoints")[-1]).epoch
    assert 1 <= stopped_at < epochs and not (killed / "final").exists()

    resumed = run(tiny_model_dir, killed, f"trainer.epochs={epochs}", f"resume={killed}")
    assert resumed == killed
    assert_same_weights(final_weights(killed), final_weights(reference))
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines if "policy_version" in m] == list(range(1, epochs + 1))  # appended, no repeats
    assert [m["epoch"] for m in lines if "eval/reward_mean" in m] == [0, 2, 4, 6, 8]
    # the per-replica weight checksums of the resumed epochs equal the uninterrupted run's
    checksums = {json.loads(x)["epoch"]: json.loads(x)["weights_sha256"]
                 for x in (reference / "replicas.jsonl").read_text().splitlines()}  # fmt: skip
    resumed_checksums = [json.loads(x) for x in (killed / "replicas.jsonl").read_text().splitlines()]
    assert all(r["weights_sha256"] == checksums[r["epoch"]] for r in resumed_checksums)
    assert len(committed(killed / "checkpoints")) == 3  # keep_checkpoints


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    return run(tiny_model_dir, tmp_path_factory.mktemp("finished") / "run", "trainer.epochs=3")


@pytest.fixture
def three_checkpoints(finished_run, tmp_path) -> Path:
    """A private copy of a finished 3-epoch run with a checkpoint after each epoch."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def test_checkpoints_are_committed_folders_of_safetensors_and_json(three_checkpoints):
    folders = committed(three_checkpoints / "checkpoints")
    assert [p.name for p in folders] == ["epoch_000001", "epoch_000002", "epoch_000003"]
    assert not list((three_checkpoints / "checkpoints").glob(".*.tmp"))
    newest = Checkpoint.open(folders[-1])
    assert {p.name for p in folders[-1].iterdir()} == {"policy.safetensors", "optimizer.safetensors",
        "rank_0.safetensors", "rank_0.json", "state.json", COMMIT_MARKER}  # fmt: skip
    assert (newest.state["epoch"], newest.state["policy_version"]) == (3, 3)
    assert_same_weights(newest.shared()[0], final_weights(three_checkpoints))
    replica = newest.replica(0)
    # 3 epochs of 16 trajectories, from 2 rollout workers (one batch uid each per epoch)
    assert replica["buffer"]["stats"]["added"] == 3 * 16 and len(replica["buffer"]["seen"]) == 3 * 2
    assert replica["torch_rng"].dtype == torch.uint8 and replica["generator"].dtype == torch.uint8


def test_a_truncated_checkpoint_is_named_and_the_previous_one_is_used(three_checkpoints, tiny_model_dir, capsys):
    newest = committed(three_checkpoints / "checkpoints")[-1] / "policy.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"policy.safetensors has 1000 bytes, \d+ were written; .*truncated"):
        Checkpoint.open(newest.parent)
    run(tiny_model_dir, three_checkpoints, "trainer.epochs=4", f"resume={three_checkpoints}")
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "epoch_000003" in out
    assert "resuming" in out and "from epoch_000002 (epoch 2)" in out
    lines = [json.loads(line) for line in (three_checkpoints / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines if "policy_version" in m] == [1, 2, 3, 4]


def test_a_checkpoint_of_another_model_is_refused_naming_the_fields(three_checkpoints, tiny_model_dir, tmp_path):
    other = tmp_path / "other_model"
    from diffusers import UNet2DModel

    save_tiny_ddpm(other)
    config = UNet2DModel.load_config(other)
    config["block_out_channels"] = [16, 16]
    UNet2DModel.from_config(config).save_pretrained(other, safe_serialization=True)
    with pytest.raises(SystemExit) as error:
        run(other, three_checkpoints, "trainer.epochs=4", f"resume={three_checkpoints}")
    message = str(error.value)
    assert "was made for another model; refusing to resume" in message
    assert "model.block_out_channels: checkpoint [8, 16], this run [16, 16]" in message
    assert f"env.base_model: checkpoint '{tiny_model_dir}', this run '{other}'" in message


class RunsCode:
    """Unpickling this creates a file: the proof that a loader executed code from a checkpoint."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_a_checkpoint_holding_a_pickle_is_refused_and_never_unpickled(three_checkpoints, tiny_model_dir, capsys):
    sentinel = three_checkpoints / "code_ran"
    newest = committed(three_checkpoints / "checkpoints")[-1]
    # an attacker replaces the replica file by a pickle and fixes the manifest so sizes and hashes match
    torch.save({"torch_rng": RunsCode(sentinel)}, newest / "rank_0.safetensors")
    state = json.loads((newest / "state.json").read_text())
    data = (newest / "rank_0.safetensors").read_bytes()
    import hashlib

    state["files"]["rank_0.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (newest / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="holds a pickle .* could run code .* refused"):
        Checkpoint.open(newest)
    pickle.loads(pickle.dumps(RunsCode(tmp := three_checkpoints / "control")))  # the payload does work when unpickled
    assert tmp.exists()
    run(tiny_model_dir, three_checkpoints, "trainer.epochs=3", f"resume={three_checkpoints}")
    assert "from epoch_000002" in capsys.readouterr().out
    assert not sentinel.exists()


def test_a_resumed_learner_takes_its_configs_lr_and_the_checkpoints_optimizer_moments(tiny_model_dir, tmp_path):
    from rlft.checkpoint import Checkpointer
    from rlft.config import to_dict
    from rlft.learner import Learner, lr_factor
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(tiny_model_dir, "trainer.lr_schedule=cosine", "trainer.epochs=10")
    learner = Learner(cfg, torch.device("cpu"))
    for _ in range(3):  # three epochs' worth of optimizer steps and schedule steps
        for param in learner.policy.parameters():
            param.grad = torch.ones_like(param)
        learner.ctx.optimizer.step()
        learner.lr_scheduler.step()
    checkpointer = Checkpointer(str(tmp_path), every=1, keep=1, config_hash="h", config=to_dict(cfg),
                                signature={})  # fmt: skip
    checkpointer.save(learner, 3)
    new_cfg = tiny_cfg(tiny_model_dir, "trainer.lr_schedule=cosine", "trainer.epochs=10", "algo.lr=5e-4",
                       "algo.weight_decay=0.5")  # fmt: skip
    resumed = Learner(new_cfg, torch.device("cpu"))
    assert checkpointer.restore(resumed) == 3
    group = resumed.ctx.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(5e-4 * lr_factor(new_cfg.trainer, 3)) and group["weight_decay"] == 0.5
    assert group["lr"] != learner.ctx.optimizer.param_groups[0]["lr"]
    resumed.lr_scheduler.step()  # the schedule goes on from the checkpoint's position, from the new base lr
    assert group["lr"] == pytest.approx(5e-4 * lr_factor(new_cfg.trainer, 4))
    before, after = learner.ctx.optimizer.state_dict()["state"], resumed.ctx.optimizer.state_dict()["state"]
    assert all(torch.equal(before[i][k], after[i][k]) for i in before for k in ("step", "exp_avg", "exp_avg_sq"))


def test_a_checkpoint_adopted_from_another_run_becomes_the_only_one_in_its_folder(three_checkpoints, tmp_path):
    other = Path(shutil.copytree(three_checkpoints, tmp_path / "other")) / "checkpoints"
    source = committed(three_checkpoints / "checkpoints")[1]
    adopted = adopt(source, other)
    assert adopted.epoch == 2 and sorted(p.name for p in other.iterdir()) == ["epoch_000002"]
    assert adopted.state["files"] == Checkpoint.open(source).state["files"] and (adopted.path / COMMIT_MARKER).exists()
    (source / "rank_0.json").write_text("{}")
    with pytest.raises(CheckpointError, match="rank_0.json has 2 bytes"):
        adopt(source, other)
    (source / COMMIT_MARKER).unlink()
    with pytest.raises(CheckpointError, match="is not a committed checkpoint"):
        adopt(source, other)
    assert Checkpoint.open(committed(other)[-1]).state["files"] == adopted.state["files"]  # refused: left as it was


def test_a_new_run_does_not_silently_take_over_a_folder_with_checkpoints(three_checkpoints, tiny_model_dir):
    with pytest.raises(SystemExit, match="already holds checkpoints of a run; continue it with resume="):
        run(tiny_model_dir, three_checkpoints, "trainer.epochs=3")


def test_resume_auto_finds_the_run_with_the_same_config(three_checkpoints, tiny_model_dir, capsys):
    run(tiny_model_dir, three_checkpoints, "trainer.epochs=3", "resume=auto")
    assert f"resuming {three_checkpoints} from epoch_000003" in capsys.readouterr().out


def test_a_resumed_run_continues_its_wandb_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    overrides = ["logging.wandb=offline", "trainer.checkpoint_every=2"]
    run(tiny_model_dir, run_dir, "trainer.epochs=2", *overrides)
    run_id = Checkpoint.open(committed(run_dir / "checkpoints")[-1]).state["wandb_run_id"]
    run(tiny_model_dir, run_dir, "trainer.epochs=3", f"resume={run_dir}", *overrides)
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs)


def test_a_save_killed_before_its_commit_leaves_the_previous_checkpoints_intact(tiny_model_dir, tmp_path, monkeypatch):
    from rlft.checkpoint import Checkpointer, latest_valid
    from rlft.config import to_dict
    from rlft.learner import Learner
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(tiny_model_dir)
    learner = Learner(cfg, torch.device("cpu"))
    checkpointer = Checkpointer(str(tmp_path), every=1, keep=2, config_hash="h", config=to_dict(cfg),
                                signature={})  # fmt: skip
    folder = checkpointer.folder
    checkpointer.save(learner, 1)

    def killed(*args):
        raise KeyboardInterrupt("killed between writing the files and the rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(learner, 2)
    monkeypatch.undo()
    assert [p.name for p in committed(folder)] == ["epoch_000001"] and (folder / ".epoch_000002.tmp").exists()
    checkpointer.save(learner, 2)
    checkpointer.save(learner, 3)
    assert [p.name for p in committed(folder)] == ["epoch_000002", "epoch_000003"]  # keep=2
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000002", "epoch_000003"]  # no temporary left over
    (folder / "epoch_000003" / COMMIT_MARKER).unlink()  # renamed but not yet marked: not a checkpoint
    assert latest_valid(folder).epoch == 2


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (folders as None) with its bytes: what 'touches nothing' compares."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def test_a_safetensors_file_whose_header_length_starts_with_0x80_is_accepted_and_a_pickle_is_not(tmp_path):
    """A safetensors file starts with its header's length (u64, little-endian), whose first byte is 0x80 for one
    header length in 32, the same byte as a pickle's protocol opcode: such a file is a checkpoint, a pickle is not."""
    import pickle as pickle_module

    from safetensors.torch import save_file

    from rlft.checkpoint import _check_safetensors, _read_tensors

    weights = tmp_path / "weights.safetensors"
    for length in range(1, 600):  # the header (JSON, padded to 8 bytes) grows with the tensor's name
        tensors = {"w" * length: torch.arange(6.0).reshape(2, 3)}
        save_file(tensors, str(weights))
        if weights.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no name length gave a header length whose first byte is 0x80")
    data = weights.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    assert data[0] == 0x80 and header_length % 256 == 0x80 and json.loads(data[8 : 8 + header_length])
    _check_safetensors(weights)  # accepted
    loaded = _read_tensors(weights)
    assert loaded.keys() == tensors.keys() and torch.equal(loaded["w" * length], tensors["w" * length])

    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle_module.dumps({"w": [1.0, 2.0]}))  # protocol >= 2: its first byte is 0x80 too
    assert pickled.read_bytes()[0] == 0x80
    archive = tmp_path / "archive.safetensors"
    torch.save({"w": torch.zeros(2)}, archive)  # a zip archive holding a pickle
    legacy = tmp_path / "legacy.safetensors"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)  # a bare pickle stream
    for refused in (pickled, archive, legacy):
        with pytest.raises(CheckpointError, match="holds a pickle .* could run code when loaded; refused"):
            _check_safetensors(refused)


def test_a_resume_that_finds_checkpoints_but_can_use_none_stops_and_touches_nothing(three_checkpoints, tiny_model_dir,
                                                                                     capsys):  # fmt: skip
    first, second, third = committed(three_checkpoints / "checkpoints")
    weights = first / "policy.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    (second / "rank_0.json").unlink()  # incomplete
    (third / "state.json").write_text("{not json")  # damaged manifest
    before = snapshot(three_checkpoints)
    with pytest.raises(SystemExit) as stopped:
        run(tiny_model_dir, three_checkpoints, "trainer.epochs=4", f"resume={three_checkpoints}")
    message = str(stopped.value)
    assert message.startswith("rlft: ") and "holds 3 checkpoint(s) and none can be used" in message
    assert f"{first}: policy.safetensors has 1000 bytes" in message
    assert f"{second}: rank_0.json is missing" in message
    assert f"{third / 'state.json'} is not readable JSON" in message
    assert "Nothing was changed" in message
    assert snapshot(three_checkpoints) == before  # metrics, checkpoints, samples: byte for byte as they were
    assert "Traceback" not in capsys.readouterr().err


def test_retention_keeps_the_newest_checkpoints_by_epoch_number(tiny_model_dir, tmp_path):
    from rlft.checkpoint import Checkpointer, latest_valid
    from rlft.config import to_dict
    from rlft.learner import Learner
    from tests.helpers import tiny_cfg

    cfg = tiny_cfg(tiny_model_dir)
    learner = Learner(cfg, torch.device("cpu"))
    checkpointer = Checkpointer(str(tmp_path), every=1, keep=10, config_hash="h", config=to_dict(cfg),
                                signature={})  # fmt: skip
    folder = checkpointer.folder

    def names() -> list[str]:
        return sorted(p.name for p in folder.iterdir())

    checkpointer.save(learner, 10)
    checkpointer.save(learner, 9)  # written after epoch 10: the newer folder on disk, the older epoch
    assert names() == ["epoch_000009", "epoch_000010"]
    checkpointer.keep = 2
    checkpointer.save(learner, 11)
    assert names() == ["epoch_000010", "epoch_000011"]  # epoch 9 went, not the older folder of epoch 10
    checkpointer.keep = 10
    checkpointer.save(learner, 200000)
    checkpointer.keep = 1
    checkpointer.save(learner, 1000000)  # seven digits: by name "epoch_1000000" sorts before "epoch_200000"
    assert names() == ["epoch_1000000"]
    assert latest_valid(folder).epoch == 1000000


def test_a_malformed_state_json_is_named_and_skipped(three_checkpoints, tiny_model_dir, capsys):
    newest = committed(three_checkpoints / "checkpoints")[-1]
    state = json.loads((newest / "state.json").read_text())
    for key in ("files", "signature", "world_size"):  # valid JSON without a key the resume reads
        (newest / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != key}))
        with pytest.raises(CheckpointError, match=f"epoch_000003: state.json is malformed \\(it lacks {key}\\)"):
            Checkpoint.open(newest)
    (newest / "state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "epoch"}))
    run(tiny_model_dir, three_checkpoints, "trainer.epochs=3", f"resume={three_checkpoints}")
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint" in out and "epoch_000003: state.json is malformed (it lacks epoch)" in out
    assert "from epoch_000002 (epoch 2)" in out
    lines = [json.loads(line) for line in (three_checkpoints / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines if "policy_version" in m] == [1, 2, 3]


def test_a_second_run_on_a_folder_in_use_is_refused_and_writes_nothing(tiny_model_dir, tmp_path):
    from rlft.checkpoint import RunLock

    run_dir = tmp_path / "run"
    with RunLock(run_dir):  # another rlft run holds the folder
        before = snapshot(run_dir)
        with pytest.raises(SystemExit) as stopped:
            run(tiny_model_dir, run_dir, "trainer.epochs=1")
        assert snapshot(run_dir) == before == {".lock": f"{os.getpid()}\n".encode()}
    assert str(stopped.value) == (f"rlft: {run_dir.resolve()} is in use by another rlft run (process {os.getpid()}); "
                                  "wait for it to end, or choose another logging.run_dir")  # fmt: skip


def test_a_full_disk_during_a_checkpoint_stops_the_run_with_one_line_and_keeps_the_previous_one(
        tiny_model_dir, tmp_path, monkeypatch, capsys):  # fmt: skip
    import errno

    import rlft.checkpoint as checkpoint_module

    write_tensors = checkpoint_module._write_tensors

    def disk_full_at_the_second_checkpoint(path: Path, tensors: dict) -> None:
        if path.parent.name == ".epoch_000002.tmp" and path.name == "policy.safetensors":  # its rank files are written
            raise OSError(errno.ENOSPC, "No space left on device")
        write_tensors(path, tensors)

    monkeypatch.setattr(checkpoint_module, "_write_tensors", disk_full_at_the_second_checkpoint)
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        run(tiny_model_dir, run_dir, "trainer.epochs=3")
    message = str(stopped.value)
    assert message.startswith(f"rlft: could not write the checkpoint of epoch 2 in {run_dir.resolve() / 'checkpoints'}")
    assert "No space left on device" in message and "epoch_000001 is the newest intact one" in message
    output = capsys.readouterr()
    assert "Traceback" not in output.out + output.err and "could not write" not in output.out + output.err
    folder = run_dir / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["epoch_000001"]  # the temporary folder was removed
    assert Checkpoint.open(folder / "epoch_000001").epoch == 1 and not (run_dir / "final").exists()

    monkeypatch.undo()  # space freed: the run resumes from the intact checkpoint and finishes
    run(tiny_model_dir, run_dir, "trainer.epochs=3", f"resume={run_dir}")
    assert "from epoch_000001 (epoch 1)" in capsys.readouterr().out
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines if "policy_version" in m] == [1, 2, 3]
    assert (run_dir / "final" / "policy.safetensors").stat().st_size > 1000
