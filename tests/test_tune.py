"""Ray Tune sweeps: sweep files are checked before Ray starts, each trial reports once per epoch, and a two-trial
sweep runs through real Ray Tune, writes its table and best config, and resumes (Tuner.restore) when rerun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from ray import tune

import rlft.tune as rlft_tune
from rlft.config import compose, to_dict
from rlft.tune import SweepError, TuneReport, check_sweep, load_sweep, make_scheduler, search_space

SWEEPS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))
TINY_TRIALS = [  # on the tiny random DDPM: seconds per epoch, an evaluation after each
    "env.num_inference_steps=4", "trainer.rollout_batch_size=8", "trainer.samples_per_epoch=16",
    "algo.minibatch_size=8", "eval.num_samples=8", "ray.rollout_threads=1", "ray.learner_threads=1",
    "ray.num_rollout_workers=1", "eval.every=1", "logging.wandb=disabled",
]  # fmt: skip


def write_sweep(path: Path, **fields) -> Path:
    base = {"search_space": {"algo.lr": {"grid": [1.0e-4, 1.0e-3]}}, "metric": "eval/target_fraction",
            "mode": "max"}  # fmt: skip
    path.write_text(yaml.safe_dump({**base, **fields}))
    return path


@pytest.mark.parametrize("name", SWEEPS)
def test_every_shipped_sweep_composes_and_validates_at_every_probe_value(name):
    check_sweep(load_sweep(name, []))


def test_there_is_a_ddpo_digits_sweep_with_a_scheduler():
    sweep = load_sweep("ddpo_digits", [])
    assert "algo=ddpo" in sweep["overrides"] and "env=digits" in sweep["overrides"]
    assert sweep["scheduler"]["name"] == "asha" and sweep["metric"] == "eval/judge/target_fraction"


def test_command_line_sets_sweep_keys_and_passes_the_rest_to_the_rlft_config():
    sweep = load_sweep("ddpo_digits", ["num_samples=3", "scheduler.grace_period=4", "trainer.epochs=7", "name=x"])
    assert sweep["num_samples"] == 3 and sweep["scheduler"] == {"name": "asha", "grace_period": 4,
                                                                 "reduction_factor": 2}  # fmt: skip
    assert sweep["name"] == "x" and sweep["overrides"][-1] == "trainer.epochs=7"


def test_sweep_mistakes_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(SweepError, match="no sweep 'ddpo_digit' .*did you mean 'ddpo_digits'"):
        load_sweep("ddpo_digit", [])
    with pytest.raises(SweepError, match="unknown config key 'algo.lrr'; did you mean 'algo.lr'"):
        check_sweep(load_sweep(str(write_sweep(tmp_path / "a.yaml", search_space={"algo.lrr": {"choice": [1]}})), []))
    bad_value = write_sweep(tmp_path / "b.yaml", search_space={"trainer.samples_per_epoch": {"choice": [64, 100]}})
    with pytest.raises(SweepError, match=r"trainer.samples_per_epoch: the value 100 .*rollout_batch_size=32"):
        check_sweep(load_sweep(str(bad_value), []))
    with pytest.raises(SweepError, match="search_space.algo.lr must be one of"):
        check_sweep(load_sweep(str(write_sweep(tmp_path / "c.yaml", search_space={"algo.lr": {"normal": [0, 1]}})), []))
    with pytest.raises(SweepError, match="unknown sweep key 'num_sample'; did you mean 'num_samples'"):
        load_sweep(str(write_sweep(tmp_path / "e.yaml", num_sample=2)), [])
    with pytest.raises(SweepError, match="scheduler asha: .*'grace_perod'"):
        make_scheduler(load_sweep("ddpo_digits", ["scheduler.grace_perod=2"]), epochs=30)
    with pytest.raises(SweepError, match="mode=best is not one of min, max"):
        check_sweep(load_sweep("ddpo_digits", ["mode=best"]))
    with pytest.raises(Exception, match="unknown config key 'trainer.epoch'; did you mean 'trainer.epochs'"):
        check_sweep(load_sweep("ddpo_digits", ["trainer.epoch=3"]))


def test_pbt_sweep_mistakes_name_the_key_and_the_fix(tmp_path):
    def pbt(search_space: dict | None = None, **scheduler):
        space = {} if search_space is None else {"search_space": search_space}
        return load_sweep(str(write_sweep(tmp_path / "pbt.yaml", scheduler={"name": "pbt", **scheduler}, **space)), [])

    with pytest.raises(SweepError, match="perturbation_interval=None must be a whole number of epochs"):
        check_sweep(pbt())
    with pytest.raises(SweepError, match="burn_in_period=3 must be a multiple of perturbation_interval=2"):
        check_sweep(pbt(perturbation_interval=2, burn_in_period=3))
    with pytest.raises(SweepError, match="hyperparam_mutations: unknown config key 'algo.clip_rang'; did you mean "
                                         "'algo.clip_range'"):  # fmt: skip
        check_sweep(pbt(perturbation_interval=2, hyperparam_mutations={"algo.clip_rang": {"choice": [0.1]}}))
    with pytest.raises(SweepError, match=r"hyperparam_mutations.algo.lr must be one of \{choice\|grid"):
        check_sweep(pbt(perturbation_interval=2, hyperparam_mutations={"algo.lr": [1e-4, 1e-3]}))
    with pytest.raises(SweepError, match="PBT cannot mutate policy.lora_rank: a trial continues another trial's"):
        check_sweep(pbt(perturbation_interval=2, hyperparam_mutations={"policy.lora_rank": {"choice": [4, 8]}}))
    with pytest.raises(SweepError, match="pbt has nothing to mutate"):
        check_sweep(pbt(search_space={}, perturbation_interval=2))
    with pytest.raises(SweepError, match="scheduler pbt: unknown option 'perturbation_intervall'; did you mean "
                                         "'perturbation_interval'"):  # fmt: skip
        make_scheduler(pbt(perturbation_intervall=2), epochs=4)


def test_pbt_mutates_what_the_sweep_says_in_search_space_syntax_or_else_the_search_space():
    sweep = load_sweep("ddpo_pbt", [])
    assert f"eval.every={sweep['scheduler']['perturbation_interval']}" in sweep["overrides"]  # ranked by fresh evals
    mutations = make_scheduler(sweep, epochs=30)._hyperparam_mutations
    assert mutations["algo.clip_range"] == [1.0e-4, 1.0e-3, 1.0e-2]  # a list: PBT steps to a neighbouring value
    assert (mutations["algo.lr"].lower, mutations["algo.lr"].upper) == (3.0e-5, 1.0e-3)  # a domain: PBT scales it
    sweep["search_space"] = {"algo.lr": {"grid": [1.0e-4, 1.0e-3]}}
    del sweep["scheduler"]["hyperparam_mutations"]
    assert rlft_tune.mutations(sweep) == {"algo.lr": [1.0e-4, 1.0e-3]}
    sweep["scheduler"]["hyperparam_mutations"] = {"algo.clip_range": {"uniform": [0.001, 0.01]}}
    assert rlft_tune.tuned_keys(sweep) == ["algo.lr", "algo.clip_range"]  # the results table's columns


def test_search_space_becomes_tune_domains():
    space = search_space({"search_space": {"a": {"grid": [1, 2]}, "b": {"choice": [3, 4]},
                                           "c": {"loguniform": [1e-5, 1e-3]}, "d": {"randint": [1, 5]}}})  # fmt: skip
    assert space["a"] == tune.grid_search([1, 2])
    assert space["b"].categories == [3, 4]
    samples = np.array(space["c"].sample(size=4000))
    assert samples.min() >= 1e-5 and samples.max() <= 1e-3
    assert abs((samples < 1e-4).mean() - 0.5) < 0.05  # log-uniform: half below the geometric mean (uniform: 9%)
    assert (space["d"].lower, space["d"].upper) == (1, 5)


def test_a_trial_reports_once_per_epoch_after_its_evaluation_and_checkpoint(monkeypatch, tmp_path):
    sent = []
    monkeypatch.setattr(tune, "report", lambda metrics, checkpoint=None: sent.append((metrics, checkpoint)))
    hook = TuneReport("eval/target_fraction", epochs=5, eval_every=2, checkpoint_every=3)
    hook("eval", {"epoch": 0, "metrics": {"eval/target_fraction": 0.1}})
    for epoch in range(1, 6):
        hook("metrics", {"epoch": epoch, "reward/mean": float(epoch)})
        hook("replica", {"epoch": epoch})
        if epoch % 2 == 0 or epoch == 5:
            assert len(sent) == epoch - 1  # held back until the evaluation of this epoch arrives
            hook("eval", {"epoch": epoch, "metrics": {"eval/target_fraction": epoch / 10}})
        if epoch % 3 == 0 or epoch == 5:
            assert len(sent) == epoch - 1  # and until its checkpoint is committed
            (tmp_path / f"epoch_{epoch:06d}").mkdir()
            hook("checkpoint", {"epoch": epoch, "path": str(tmp_path / f"epoch_{epoch:06d}")})
        assert len(sent) == epoch
    metrics = [m for m, _ in sent]
    assert [r["epoch"] for r in metrics] == [1, 2, 3, 4, 5]
    assert [r["eval/epoch"] for r in metrics] == [0, 2, 2, 4, 5]
    assert [r["eval/target_fraction"] for r in metrics] == [0.1, 0.2, 0.2, 0.4, 0.5]
    assert [c and Path(c.path).name for _, c in sent] == [None, None, "epoch_000003", None, "epoch_000005"]
    assert not any("tune/restored_from" in r for r in metrics)

    sent.clear()
    restored = TuneReport("reward/mean", epochs=5, eval_every=5, checkpoint_every=5, restored_from="b/checkpoint_1")
    restored("start", {"epoch": 3, "policy_version": 3})
    restored("metrics", {"epoch": 4, "reward/mean": 0.4})
    restored("metrics", {"epoch": 5, "reward/mean": 0.5})
    restored("start", {"epoch": 4, "policy_version": 4})  # learners restarted before epoch 5's checkpoint: redone
    restored("eval", {"epoch": 5, "metrics": {}})
    assert [(m["epoch"], m["tune/restored_from"]) for m, _ in sent] == [(4, "b/checkpoint_1")]
    with pytest.raises(SweepError, match="metric 'eval/typo' is not among this run's metrics"):
        TuneReport("eval/typo", epochs=5, eval_every=2, checkpoint_every=5)("metrics", {"epoch": 1, "reward/mean": 0.0})


def run_tune(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "",
           "PYTHONPATH": os.pathsep.join([str(Path(rlft_tune.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "rlft.tune", *args], capture_output=True, text=True, timeout=400,
                          env=env, cwd=cwd)  # fmt: skip


@pytest.mark.slow
def test_a_two_trial_sweep_through_real_ray_tune_then_resumes_without_rerunning(tiny_model_dir, tmp_path):
    sweep_file = write_sweep(tmp_path / "tiny.yaml", overrides=[
        f"env.base_model={tiny_model_dir}", *TINY_TRIALS, "trainer.epochs=2",
    ], scheduler={"name": "fifo"}, max_concurrent_trials=2, resources_per_trial={"cpu": 0.5}, num_cpus=6)  # fmt: skip
    args = [str(sweep_file), "storage_path=sweeps"]
    first = run_tune(args, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    sweep_dir = tmp_path / "sweeps" / "tiny"
    table = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(table["algo.lr"]) == [1.0e-4, 1.0e-3]
    assert list(table["status"]) == ["done", "done"], first.stderr[-8000:]  # a failed trial's error is in stderr
    assert list(table["epochs"]) == [2, 2]
    assert table["eval/target_fraction"].is_monotonic_decreasing  # ranked best first (mode max)
    assert json.loads((sweep_dir / "results.json").read_text())[0]["trial"] == table["trial"][0]
    for row in table.to_dict(orient="records"):  # each trial is a whole rlft run in its own folder
        run_dir = Path(row["run_dir"])
        lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["epoch"] for m in lines if "reward/mean" in m] == [1, 2]
        evaluations = [m["eval/target_fraction"] for m in lines if "eval/target_fraction" in m]
        assert evaluations[-1] == pytest.approx(row["eval/target_fraction"])  # Tune saw the run's last evaluation
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["algo"]["lr"] == row["algo.lr"]
    best = yaml.safe_load((sweep_dir / "best_config.yaml").read_text())
    assert best["value"] == table["eval/target_fraction"].max() and best["run_dir"] == table["run_dir"][0]
    assert best["command"].startswith("python -m rlft.run ") and f"algo.lr={best['config']['algo']['lr']}" in best[
        "command"]  # fmt: skip
    reproduced = to_dict(compose(best["overrides"]))
    assert {k: v for k, v in reproduced.items() if k != "logging"} == {
        k: v for k, v in best["config"].items() if k != "logging"}  # fmt: skip
    assert "eval/target_fraction" in first.stdout and "best config in" in first.stdout

    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/run/metrics.jsonl")}
    again = run_tune(args, tmp_path)  # the same sweep name: Tuner.restore, and every trial is already finished
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "resuming the sweep" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/run/metrics.jsonl")} == stamps
    assert pd.read_csv(sweep_dir / "results.csv").equals(table)


@pytest.mark.slow
def test_a_failed_trial_fails_the_sweep_and_a_rerun_retries_it(tiny_model_dir, tmp_path):
    # the trial runs without Ray inside it (as in the PBT test below): this is about Tune's handling of its failure
    from diffusers import UNet2DModel

    # the model folder passes the checks before Ray starts (its configs, a weights file that parses), but its weights
    # are another architecture's, so loading the network fails inside the trial (a missing weights file is caught
    # before Ray starts now)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = next(model_dir.glob("*.safetensors"))
    weights.rename(tmp_path / weights.name)
    other = UNet2DModel.load_config(model_dir)
    other["block_out_channels"] = [16, 16]
    UNet2DModel.from_config(other).save_pretrained(tmp_path / "other", safe_serialization=True)
    shutil.copy(tmp_path / "other" / weights.name, weights)
    sweep_file = write_sweep(tmp_path / "broken.yaml", overrides=[
        f"env.base_model={model_dir}", *TINY_TRIALS, "trainer.epochs=1", "ray.enabled=false",
    ], search_space={"algo.lr": {"grid": [1.0e-4]}})  # fmt: skip
    args = [str(sweep_file), "storage_path=sweeps"]
    first = run_tune(args, tmp_path)
    assert first.returncode == 1, first.stdout[-4000:] + first.stderr[-4000:]
    assert "1 of 1 trial(s) failed" in first.stderr and "retries them from their newest checkpoints" in first.stderr
    assert "conv_in.bias expected shape" in first.stderr  # the trial's own error, not only Tune's summary of it
    sweep_dir = tmp_path / "sweeps" / "broken"
    assert list(pd.read_csv(sweep_dir / "results.csv")["status"]) == ["error"]

    (tmp_path / weights.name).replace(weights)  # the user fixes the cause and reruns the same command
    again = run_tune(args, tmp_path)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    table = pd.read_csv(sweep_dir / "results.csv")
    assert list(table["status"]) == ["done"] and list(table["epochs"]) == [1]
    assert [json.loads(line)["epoch"] for line in (Path(table["run_dir"][0]) / "metrics.jsonl").open()][-1] == 1


@pytest.mark.slow
def test_asha_stops_the_trials_below_the_rungs_cutoff_after_the_grace_period(tiny_model_dir, tmp_path):
    # the metric is the trial's own learning rate (reported every epoch, known before it runs), so which trials ASHA
    # must stop is decided in advance: one trial at a time, in grid order; the first sets the rungs (epochs 1 and 2),
    # every later one is below the rung's cutoff (its 50th percentile, reduction factor 2) at epoch 1
    sweep_file = write_sweep(tmp_path / "asha.yaml", overrides=[
        f"env.base_model={tiny_model_dir}", *TINY_TRIALS, "trainer.epochs=3", "ray.enabled=false",
    ], search_space={"algo.lr": {"grid": [1.0e-3, 1.0e-4, 1.0e-5]}}, metric="train/lr",
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2}, max_concurrent_trials=1)  # fmt: skip
    result = run_tune([str(sweep_file), "storage_path=sweeps"], tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    table = pd.read_csv(tmp_path / "sweeps" / "asha" / "results.csv")
    assert list(table["algo.lr"]) == [1.0e-3, 1.0e-4, 1.0e-5]  # ranked by the metric
    assert list(table["status"]) == ["done", "stopped", "stopped"] and list(table["epochs"]) == [3, 1, 1]
    for row in table.to_dict(orient="records"):  # a stopped trial's run ends where ASHA stopped it
        assert list(metric_lines(Path(row["run_dir"]), "policy_version")) == list(range(1, row["epochs"] + 1))
    assert "rlft.tune: 2 trial(s) stopped before their last epoch" in result.stdout


def metric_lines(run_dir: Path, key: str) -> dict:
    """epoch -> `key` in a run's metrics.jsonl"""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["epoch"]: m[key] for m in lines if key in m}


@pytest.mark.slow
def test_pbt_continues_the_worse_trial_from_the_better_ones_checkpoint_with_a_new_lr(tiny_model_dir, tmp_path):
    # trials run without Ray inside them (ray.enabled=false; the sweep test above has Ray Train in Tune trials), so
    # this is about PBT and checkpoints. synch: both trials stop at epoch 2, the worse one continues from the better
    # one's checkpoint with a mutated lr, the better one from its own, and both train epoch 3.
    sweep_file = write_sweep(tmp_path / "pbt.yaml", overrides=[
        f"env.base_model={tiny_model_dir}", *TINY_TRIALS, "trainer.epochs=3", "ray.enabled=false",
    ], scheduler={"name": "pbt", "perturbation_interval": 2, "synch": True,
                  "hyperparam_mutations": {"algo.lr": {"loguniform": [1.0e-5, 1.0e-2]}}},
        max_concurrent_trials=2, resources_per_trial={"cpu": 0.5}, num_cpus=6)  # fmt: skip
    result = run_tune([str(sweep_file), "storage_path=sweeps"], tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    sweep_dir = tmp_path / "sweeps" / "pbt"
    # Tune's record of the exploit: [trial, cloned trial, iterations, the clone's config, the new config]
    [exploit] = [json.loads(line) for line in (sweep_dir / "pbt_global.txt").read_text().splitlines()]
    restored_from = {trial.name: json.loads((trial / "result.json").read_text().splitlines()[-1])["tune/restored_from"]
                     for trial in sweep_dir.glob("run_trial_*")}  # fmt: skip
    [(trial, source)] = [(t, s) for t, s in restored_from.items() if not s.startswith(f"{t}/")]
    donor = source.split("/")[0]
    assert exploit[0] in trial and exploit[1] in donor

    trial_run, donor_run = sweep_dir / trial / "run", sweep_dir / donor / "run"
    copied = json.loads((trial_run / "checkpoints" / "epoch_000002" / "state.json").read_text())
    original = json.loads((donor_run / "checkpoints" / "epoch_000002" / "state.json").read_text())
    assert copied["files"] == original["files"]  # the donor's weights, optimizer moments and RNG, byte for byte
    assert Path(copied["config"]["logging"]["run_dir"]) == donor_run
    new_lr = exploit[5]["algo.lr"]
    assert new_lr != exploit[4]["algo.lr"] == metric_lines(donor_run, "train/lr")[3]
    lr = metric_lines(trial_run, "train/lr")
    assert lr[1] == lr[2] != lr[3] == pytest.approx(new_lr)  # the optimizer's lr is the mutated one
    assert yaml.safe_load((trial_run / "config.yaml").read_text())["algo"]["lr"] == pytest.approx(new_lr)
    assert metric_lines(trial_run, "policy_version") == {1: 1, 2: 2, 3: 3}  # epoch 3 continued the donor's epoch 2
    reward, donor_reward = metric_lines(trial_run, "reward/mean"), metric_lines(donor_run, "reward/mean")
    assert reward[2] != donor_reward[2] and reward[3] == donor_reward[3]  # epoch 3 sampled the donor's weights
    table = pd.read_csv(sweep_dir / "results.csv")
    assert list(table["status"]) == ["done", "done"] and list(table["epochs"]) == [3, 3]
    assert table.set_index("run_dir")["algo.lr"][str(trial_run)] == pytest.approx(new_lr)


class RunsCode:
    """Unpickling this creates a file: the proof that something unpickled a sweep's state."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def test_a_sweep_folder_others_could_write_is_refused_before_tune_unpickles_it(tmp_path, monkeypatch):
    import pickle

    import ray

    sweep_file = write_sweep(tmp_path / "shared.yaml", overrides=[*TINY_TRIALS, "trainer.epochs=1"])
    sweep = load_sweep(str(sweep_file), [f"storage_path={tmp_path / 'sweeps'}"])
    sweep_dir = tmp_path / "sweeps" / "shared"
    sweep_dir.mkdir(parents=True)
    sentinel = tmp_path / "code_ran"
    state = sweep_dir / "tuner.pkl"  # what Tuner.restore unpickles; here a pickle that runs code when loaded
    state.write_bytes(pickle.dumps(RunsCode(sentinel)))
    state.chmod(0o644)
    assert tune.Tuner.can_restore(str(sweep_dir))  # a rerun would restore this folder
    rlft_tune.check_owner(sweep_dir)  # our own file, writable by us alone: accepted

    state.chmod(0o646)  # o+w: anyone on the machine could have replaced it
    with pytest.raises(SweepError, match=r"tuner.pkl belongs to another user or is writable by others .*mode "
                                         r"0o646.* will not restore"):  # fmt: skip
        rlft_tune.run_sweep(sweep, make_scheduler(sweep, epochs=1), keep_checkpoints=1)
    # through the command line: one line, and Tune never starts (Ray is not even needed to refuse it)
    monkeypatch.setattr(rlft_tune, "init_ray", lambda sweep: None)
    with pytest.raises(SystemExit, match="^rlft.tune: .*tuner.pkl belongs to another user or is writable by others"):
        rlft_tune.main([str(sweep_file), f"storage_path={tmp_path / 'sweeps'}"])

    state.chmod(0o644)
    if os.getuid() == 0:  # owned by another uid (CI and the dev machines run the tests as root, which may chown)
        os.chown(state, 4242, -1)
        with pytest.raises(SweepError, match="owner uid 4242"):
            rlft_tune.run_sweep(sweep, make_scheduler(sweep, epochs=1), keep_checkpoints=1)
    assert not sentinel.exists() and not ray.is_initialized()
