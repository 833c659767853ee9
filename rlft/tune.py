"""`python -m rlft.tune <sweep> [key=value ...]`: a Ray Tune sweep in which every trial is a whole rlft run.

    python -m rlft.tune ddpo_digits                              # tune_configs/ddpo_digits.yaml
    python -m rlft.tune ddpo_digits num_samples=4 trainer.epochs=10
    python -m rlft.tune path/to/sweep.yaml name=try2             # a sweep file anywhere, under another name

Arguments after the sweep set sweep keys (`num_samples=4`, `scheduler.grace_period=2`, `name=...`); any other
key=value is an rlft config override shared by every trial, checked like `python -m rlft.run` checks it.

A sweep file (see tune_configs/):
    overrides             rlft config overrides every trial shares, as on the rlft.run command line
    search_space          rlft config key -> {choice|grid|uniform|loguniform|quniform|qloguniform|randint|
                          lograndint: arguments}, e.g. `algo.lr: {loguniform: [1.0e-5, 1.0e-3]}`
    metric, mode          what trials are ranked by, e.g. eval/target_fraction max, or reward/mean max
    num_samples           trials to sample (each grid multiplies them, as in Tune)
    scheduler             {name: fifo} or {name: asha, grace_period: 2, reduction_factor: 2, max_t: <epochs>}
    max_concurrent_trials trials running at once
    resources_per_trial   {cpu: ..., gpu: ...} for a trial's driver; its rollout actors and learners ask for
                          their own through the ray.* config keys (ray.cpus_per_rollout_worker, ...)
    num_cpus              logical CPUs of a new local Ray (null = max(4, cores): Train inside Tune needs headroom)
    storage_path          where sweeps live; the sweep's folder is <storage_path>/<name>

Each trial runs `rlft.run.run` (the code path of `python -m rlft.run`) with its own run folder
`<storage_path>/<name>/<trial>/run/` and its own wandb run (grouped by sweep name), and reports to Tune once per
epoch: that epoch's training metrics plus the latest evaluation's `eval/...` metrics (`eval/epoch` says which).
At the end the results table is printed and saved as results.csv and results.json, and the best trial's config
as best_config.yaml (with the `python -m rlft.run` command that reproduces it). Rerunning a sweep whose folder
exists resumes it with `Tuner.restore`: finished trials are kept, and each unfinished one continues its run from
the newest checkpoint in its run folder (`resume=<run folder>`; trainer.checkpoint_every sets how often).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from rlft.config import ConfigError, _nearest, compose, config_groups, flat_keys, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEP_DIRS = (Path("tune_configs"), REPO_ROOT / "tune_configs")
SWEEP_KEYS = {
    "name": None, "overrides": [], "search_space": {}, "metric": None, "mode": None, "num_samples": 1,
    "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1, "resources_per_trial": {"cpu": 1},
    "num_cpus": None, "storage_path": "runs/tune",
}  # fmt: skip
DOMAINS = ("choice", "grid", "uniform", "loguniform", "quniform", "qloguniform", "randint", "lograndint")
SCHEDULERS = ("fifo", "asha", "pbt")
TRIAL_DEFAULTS = ["logging.progress=false"]  # before the sweep's own overrides, which may change them


class SweepError(ConfigError):
    """A sweep file or argument problem found before Ray starts; the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------- the sweep file


def find_sweep(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise SweepError(f"sweep file {path} does not exist")
        return path
    for folder in SWEEP_DIRS:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted({p.stem for folder in SWEEP_DIRS if folder.is_dir() for p in folder.glob("*.yaml")})
    raise SweepError(f"no sweep {name!r} in tune_configs/{_nearest(name, known)} (sweeps: {', '.join(known)})")


def load_sweep(name: str, args: list[str]) -> dict:
    """The sweep file with the command line applied: sweep keys set, anything else appended to `overrides`."""
    path = find_sweep(name)
    sweep = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown sweep key {unknown[0]!r}{_nearest(unknown[0], list(SWEEP_KEYS))}")
    sweep = {**SWEEP_KEYS, "name": path.stem, **sweep}
    sweep["overrides"] = list(sweep["overrides"])
    sweep_args = []
    for arg in args:
        if "=" not in arg:
            raise SweepError(f"argument {arg!r} is not of the form key=value (for example num_samples=4)")
        key = arg.split("=", 1)[0].lstrip("+~")
        if key.split(".", 1)[0] in SWEEP_KEYS:
            if key.split(".", 1)[0] in ("overrides", "search_space"):
                raise SweepError(f"{key} cannot be set on the command line; edit {path} or pass rlft keys directly")
            sweep_args.append(arg)
        else:
            sweep["overrides"].append(arg)
    if sweep_args:
        sweep = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(sweep), OmegaConf.from_dotlist(sweep_args)))
    return sweep


def search_space(sweep: dict) -> dict:
    """The sweep's `search_space` as Tune domains, keyed by rlft config key."""
    from ray import tune

    space = {}
    for key, spec in sweep["search_space"].items():
        kind, args = next(iter(spec.items()))
        if kind == "grid":
            space[key] = tune.grid_search(list(args))
        elif kind == "choice":
            space[key] = tune.choice(list(args))
        else:
            space[key] = getattr(tune, kind)(*args)
    return space


def probe_values(kind: str, args: list) -> list:
    """Values of a domain that `check_sweep` composes and validates: every listed value, or the range's ends."""
    if kind in ("choice", "grid"):
        return list(args)
    if kind in ("randint", "lograndint"):
        return [args[0], args[1] - 1]  # Tune's randint excludes the upper bound
    return [args[0], args[1]]


def check_sweep(sweep: dict) -> None:
    """Everything that can be checked before Ray starts: the sweep keys, the shared config, each search key."""
    for key in ("metric", "mode"):
        if not sweep[key]:
            raise SweepError(f"the sweep sets no {key}; add e.g. `metric: eval/target_fraction` and `mode: max`")
    if sweep["mode"] not in ("min", "max"):
        raise SweepError(f"mode={sweep['mode']} is not one of min, max")
    if not isinstance(sweep["num_samples"], int) or sweep["num_samples"] < 1:
        raise SweepError(f"num_samples={sweep['num_samples']} must be a whole number of trials, at least 1")
    scheduler = sweep["scheduler"].get("name")
    if scheduler not in SCHEDULERS:
        raise SweepError(f"scheduler.name={scheduler} is not one of {', '.join(SCHEDULERS)}")
    if scheduler == "pbt":
        raise SweepError("scheduler.name=pbt copies a better trial's checkpoint into a worse one, but rlft trials do "
                         "not report checkpoints to Tune yet; use scheduler.name=asha (early stopping) for now")
    base_overrides = [*TRIAL_DEFAULTS, *sweep["overrides"]]
    base = compose("config", base_overrides)
    validate(base)
    known = flat_keys(base) + config_groups()
    for key, spec in sweep["search_space"].items():
        if key not in known:
            raise SweepError(f"search_space: unknown config key {key!r}{_nearest(key, known)}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise SweepError(f"search_space.{key} must be one of {{{'|'.join(DOMAINS)}: [...]}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise SweepError(f"search_space.{key}.{kind} needs a list of arguments, got {args!r}")
        for value in probe_values(kind, args):
            try:
                validate(compose("config", [*base_overrides, override(key, value)]))
            except (ConfigError, ValueError, KeyError) as error:
                raise SweepError(f"search_space.{key}: the value {value!r} gives an invalid run: {error}") from None


def override(key: str, value) -> str:
    """A sampled value as an rlft command-line override."""
    return f"{key}={json.dumps(value) if isinstance(value, bool | None | list) else value}"


# ---------------------------------------------------------------------------------------------- one trial


class TuneReport:
    """The report hook of a trial: one `ray.tune.report` per epoch, after that epoch's evaluation if it has one,
    with the epoch's training metrics plus the latest evaluation's metrics."""

    def __init__(self, metric: str, epochs: int, eval_every: int):
        self.metric, self.epochs, self.eval_every = metric, epochs, eval_every
        self.latest_eval: dict = {}
        self.pending: dict | None = None

    def __call__(self, kind: str, payload: dict) -> None:
        if kind == "metrics":
            self.pending = payload
            if not self.evaluates_after(payload["epoch"]):
                self.send()
        elif kind == "eval":
            self.latest_eval = {**payload["metrics"], "eval/epoch": payload["epoch"]}
            if self.pending is not None:
                self.send()

    def evaluates_after(self, epoch: int) -> bool:
        return epoch % self.eval_every == 0 or epoch == self.epochs

    def send(self) -> None:
        from ray import tune

        result = {**self.pending, **self.latest_eval}
        self.pending = None
        if self.metric not in result:
            raise SweepError(f"metric {self.metric!r} is not among this run's metrics ({', '.join(sorted(result))}); "
                             "set the sweep's metric to one of them")  # fmt: skip
        tune.report(result)


def trial_overrides(overrides: list[str], params: dict) -> list[str]:
    return [*TRIAL_DEFAULTS, *overrides, *(override(k, v) for k, v in params.items())]


def trial_resources(sweep: dict):
    """A trial's placement group: its driver's bundle (resources_per_trial) and one bundle per rollout actor, which
    Tune places in the trial's group. Ray Train reserves the learners' resources in a group of its own."""
    from ray.tune import PlacementGroupFactory

    driver = {k.upper(): v for k, v in sweep["resources_per_trial"].items()}

    def resources(params: dict) -> PlacementGroupFactory:
        r = compose("config", trial_overrides(sweep["overrides"], params)).ray
        actor = {"CPU": r.cpus_per_rollout_worker, **({"GPU": r.gpus_per_rollout_worker} if r.gpus_per_rollout_worker
                                                      else {})}  # fmt: skip
        return PlacementGroupFactory([driver] + [actor] * r.num_rollout_workers)

    return resources


def run_trial(params: dict, overrides: list[str], sweep_name: str, metric: str) -> None:
    """A Tune function trainable: the rlft run for one point of the search space, in the trial's folder."""
    from ray import tune

    from rlft.run import run

    context = tune.get_context()
    run_dir = Path(context.get_storage().trial_fs_path) / "run"  # in the sweep folder, next to Tune's records
    resume = []
    if (run_dir / "config.yaml").exists():  # an interrupted attempt (a restored sweep): continue its run from
        resume = [f"resume='{run_dir}'"]  # the newest checkpoint (from its first epoch when it has none)
    elif run_dir.exists():  # killed before its run folder was written: start it afresh
        shutil.rmtree(run_dir)
    cfg = compose("config", [
        *trial_overrides(overrides, params), f"logging.run_dir='{run_dir}'", *resume,  # quoted: folders hold = and ,
        f"logging.wandb_group={sweep_name}", f"logging.wandb_name={sweep_name}-{context.get_trial_id()}",
    ])  # fmt: skip
    validate(cfg)
    run(cfg, TuneReport(metric, cfg.trainer.epochs, cfg.eval.every))


# ---------------------------------------------------------------------------------------------- the sweep


def make_scheduler(sweep: dict, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    options = {k: v for k, v in sweep["scheduler"].items() if k != "name"}
    if sweep["scheduler"]["name"] == "fifo":
        return FIFOScheduler()
    # time in epochs, not Tune's report count: a trial resumed from a checkpoint first reports its next epoch
    options = {"time_attr": "epoch", "max_t": epochs, "grace_period": 1, "reduction_factor": 2, **options}
    try:
        return ASHAScheduler(**options)
    except (TypeError, ValueError) as error:
        raise SweepError(f"scheduler asha: {error}") from None


def init_ray(sweep: dict) -> None:
    import ray

    from rlft.pipeline import WORKER_ENV

    # trials keep the launch folder as their working directory, so relative paths in overrides mean the same
    runtime_env = {"env_vars": {**WORKER_ENV, "RAY_CHDIR_TO_TRIAL_DIR": "0"}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, runtime_env=runtime_env)
        return
    num_cpus = sweep["num_cpus"] or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING, runtime_env=runtime_env)


def run_sweep(sweep: dict, scheduler):
    """Start the sweep, or resume it when its folder holds an interrupted one; returns Tune's ResultGrid."""
    from ray import tune

    sweep_dir = Path(sweep["storage_path"]).resolve() / sweep["name"]
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, overrides=sweep["overrides"], sweep_name=sweep["name"],
                             metric=sweep["metric"]),
        trial_resources(sweep),
    )  # fmt: skip
    if tune.Tuner.can_restore(str(sweep_dir)):
        print(f"rlft.tune: resuming the sweep in {sweep_dir} (its saved search space and settings apply)", flush=True)
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True)
    else:
        print(f"rlft.tune: sweep folder {sweep_dir}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep["metric"], mode=sweep["mode"], num_samples=sweep["num_samples"],
                scheduler=scheduler, max_concurrent_trials=sweep["max_concurrent_trials"],
            ),
            run_config=tune.RunConfig(name=sweep["name"], storage_path=str(sweep_dir.parent), verbose=1),
        )  # fmt: skip
    return tuner.fit(), sweep_dir


def results_table(result_grid, sweep: dict, epochs: int):
    """One row per trial: its search-space values, status, epochs reached, the metric and its run folder.
    A trial is "done" after all its epochs, "stopped" before (by the scheduler, or an interrupted sweep)."""
    import pandas as pd

    rows = []
    for result in result_grid:
        metrics, config = result.metrics or {}, result.config or {}  # a trial interrupted before reporting has none
        status = "error" if result.error else "done" if metrics.get("epoch") == epochs else "stopped"
        rows.append({
            "trial": metrics.get("trial_id", Path(result.path).name),
            **{key: config.get(key) for key in sweep["search_space"]},
            "status": status,
            "epochs": metrics.get("epoch"),
            sweep["metric"]: metrics.get(sweep["metric"]),
            **({"reward/mean": metrics.get("reward/mean")} if sweep["metric"] != "reward/mean" else {}),
            "run_dir": str(Path(result.path) / "run"),
        })  # fmt: skip
    table = pd.DataFrame(rows)
    return table.sort_values(sweep["metric"], ascending=sweep["mode"] == "min", na_position="last",
                             ignore_index=True)  # fmt: skip


def write_results(table, sweep: dict, sweep_dir: Path) -> Path | None:
    """results.csv, results.json and, when any trial reported the metric, best_config.yaml."""
    table.to_csv(sweep_dir / "results.csv", index=False)
    (sweep_dir / "results.json").write_text(json.dumps(table.to_dict(orient="records"), indent=2, default=str) + "\n")
    ranked = table.dropna(subset=[sweep["metric"]])
    if ranked.empty:
        return None
    best = ranked.iloc[0]
    run_dir = Path(best["run_dir"])
    overrides = [*sweep["overrides"], *(override(k, best[k]) for k in sweep["search_space"])]
    overrides = [o for o in overrides if not o.startswith("logging.run_dir=")]
    best_config = {
        "sweep": sweep["name"], "metric": sweep["metric"], "mode": sweep["mode"],
        "value": float(best[sweep["metric"]]), "trial": best["trial"], "run_dir": str(run_dir),
        "command": " ".join(["python -m rlft.run", *overrides]), "overrides": overrides,
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
    }  # fmt: skip
    path = sweep_dir / "best_config.yaml"
    path.write_text(yaml.safe_dump(best_config, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> Path:
    args = sys.argv[1:] if argv is None else argv
    if not args or "=" in args[0]:
        raise SystemExit("usage: python -m rlft.tune <sweep> [key=value ...]   (sweeps are tune_configs/*.yaml)")
    try:
        sweep = load_sweep(args[0], args[1:])
        check_sweep(sweep)
        epochs = compose("config", [*TRIAL_DEFAULTS, *sweep["overrides"]]).trainer.epochs
        scheduler = make_scheduler(sweep, epochs)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as error:
        raise SystemExit(f"rlft.tune: {error}") from None
    init_ray(sweep)
    result_grid, sweep_dir = run_sweep(sweep, scheduler)
    table = results_table(result_grid, sweep, epochs)
    best = write_results(table, sweep, sweep_dir)
    print(table.to_string(index=False), flush=True)
    print(f"rlft.tune: results in {sweep_dir}/results.csv and results.json", flush=True)
    if best is not None:
        print(f"rlft.tune: best config in {best}:\n  {yaml.safe_load(best.read_text())['command']}", flush=True)
    stopped = int((table["status"] == "stopped").sum())
    if stopped:
        print(f"rlft.tune: {stopped} trial(s) stopped before their last epoch, by the scheduler or an interruption; "
              f"rerunning `python -m rlft.tune {' '.join(args)}` resumes an interrupted sweep", flush=True)
    errors = [result.error for result in result_grid if result.error]
    if errors:
        print(f"rlft.tune: {len(errors)} trial(s) failed; the first error:\n{errors[0]}", file=sys.stderr, flush=True)
    return sweep_dir


if __name__ == "__main__":
    main()
