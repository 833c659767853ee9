"""Ray Tune sweeps: sweep files are checked before Ray starts, each trial reports once per epoch, and a two-trial
sweep runs through real Ray Tune, writes its table and best config, and resumes (Tuner.restore) when rerun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from ray import tune

import rlft.tune as rlft_tune
from rlft.config import compose, to_container
from rlft.tune import SweepError, TuneReport, check_sweep, load_sweep, make_scheduler, search_space

SWEEPS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))


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
    assert sweep["scheduler"]["name"] == "asha" and sweep["metric"] == "eval/target_fraction"


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
    with pytest.raises(SweepError, match="pbt .*checkpoint"):
        check_sweep(load_sweep(str(write_sweep(tmp_path / "d.yaml", scheduler={"name": "pbt"})), []))
    with pytest.raises(SweepError, match="unknown sweep key 'num_sample'; did you mean 'num_samples'"):
        load_sweep(str(write_sweep(tmp_path / "e.yaml", num_sample=2)), [])
    with pytest.raises(SweepError, match="scheduler asha: .*'grace_perod'"):
        make_scheduler(load_sweep("ddpo_digits", ["scheduler.grace_perod=2"]), epochs=30)
    with pytest.raises(SweepError, match="mode=best is not one of min, max"):
        check_sweep(load_sweep("ddpo_digits", ["mode=best"]))
    with pytest.raises(Exception, match="unknown config key 'trainer.epoch'; did you mean 'trainer.epochs'"):
        check_sweep(load_sweep("ddpo_digits", ["trainer.epoch=3"]))


def test_search_space_becomes_tune_domains():
    space = search_space({"search_space": {"a": {"grid": [1, 2]}, "b": {"choice": [3, 4]},
                                           "c": {"loguniform": [1e-5, 1e-3]}, "d": {"randint": [1, 5]}}})  # fmt: skip
    assert space["a"] == tune.grid_search([1, 2])
    assert space["b"].categories == [3, 4]
    samples = np.array(space["c"].sample(size=4000))
    assert samples.min() >= 1e-5 and samples.max() <= 1e-3
    assert abs((samples < 1e-4).mean() - 0.5) < 0.05  # log-uniform: half below the geometric mean (uniform: 9%)
    assert (space["d"].lower, space["d"].upper) == (1, 5)


def test_a_trial_reports_once_per_epoch_after_its_evaluation(monkeypatch):
    sent = []
    monkeypatch.setattr(tune, "report", sent.append)
    hook = TuneReport("eval/target_fraction", epochs=5, eval_every=2)
    hook("eval", {"epoch": 0, "metrics": {"eval/target_fraction": 0.1}})
    for epoch in range(1, 6):
        hook("metrics", {"epoch": epoch, "reward/mean": float(epoch)})
        if epoch % 2 == 0 or epoch == 5:
            assert len(sent) == epoch - 1  # held back until the evaluation of this epoch arrives
            hook("eval", {"epoch": epoch, "metrics": {"eval/target_fraction": epoch / 10}})
    assert [r["epoch"] for r in sent] == [1, 2, 3, 4, 5]
    assert [r["eval/epoch"] for r in sent] == [0, 2, 2, 4, 5]
    assert [r["eval/target_fraction"] for r in sent] == [0.1, 0.2, 0.2, 0.4, 0.5]
    with pytest.raises(SweepError, match="metric 'eval/typo' is not among this run's metrics"):
        TuneReport("eval/typo", epochs=5, eval_every=2)("metrics", {"epoch": 1, "reward/mean": 0.0})


def run_tune(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "",
           "PYTHONPATH": os.pathsep.join([str(Path(rlft_tune.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "rlft.tune", *args], capture_output=True, text=True, timeout=400,
                          env=env, cwd=cwd)  # fmt: skip


@pytest.mark.slow
def test_a_two_trial_sweep_through_real_ray_tune_then_resumes_without_rerunning(tiny_model_dir, tmp_path):
    sweep_file = write_sweep(tmp_path / "tiny.yaml", overrides=[
        f"env.base_model={tiny_model_dir}", "env.num_inference_steps=4", "trainer.rollout_batch_size=8",
        "trainer.samples_per_epoch=16", "algo.minibatch_size=8", "eval.num_samples=8",
        "ray.rollout_threads=1", "ray.learner_threads=1", "ray.num_rollout_workers=1",
        "trainer.epochs=2", "eval.every=1", "logging.wandb=disabled",
    ], scheduler={"name": "fifo"}, max_concurrent_trials=2, resources_per_trial={"cpu": 0.5}, num_cpus=6)  # fmt: skip
    args = [str(sweep_file), "storage_path=sweeps"]
    first = run_tune(args, tmp_path)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    sweep_dir = tmp_path / "sweeps" / "tiny"
    table = pd.read_csv(sweep_dir / "results.csv")
    assert sorted(table["algo.lr"]) == [1.0e-4, 1.0e-3] and list(table["status"]) == ["done", "done"]
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
    reproduced = to_container(compose("config", best["overrides"]))
    assert {k: v for k, v in reproduced.items() if k != "logging"} == {
        k: v for k, v in best["config"].items() if k != "logging"}  # fmt: skip
    assert "eval/target_fraction" in first.stdout and "best config in" in first.stdout

    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/run/metrics.jsonl")}
    again = run_tune(args, tmp_path)  # the same sweep name: Tuner.restore, and every trial is already finished
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "resuming the sweep" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/run/metrics.jsonl")} == stamps
    assert pd.read_csv(sweep_dir / "results.csv").equals(table)
