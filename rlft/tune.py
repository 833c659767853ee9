"""`python -m rlft.tune <sweep> [key=value ...]`: a Ray Tune sweep in which every trial is a whole rlft run.

    python -m rlft.tune ddpo_digits                              # tune_configs/ddpo_digits.yaml
    python -m rlft.tune ddpo_digits num_samples=4 trainer.epochs=10
    python -m rlft.tune ddpo_pbt                                 # Population Based Training
    python -m rlft.tune path/to/sweep.yaml name=try2             # a sweep file anywhere, under another name

Arguments after the sweep set sweep keys (`num_samples=4`, `scheduler.grace_period=2`, `name=...`); any other
key=value is an rlft config override shared by every trial, checked like `python -m rlft.run` checks it.

A sweep file (see tune_configs/):
    overrides             rlft config overrides every trial shares, as on the rlft.run command line
    search_space          rlft config key -> {choice|grid|uniform|loguniform|quniform|qloguniform|randint|
                          lograndint: arguments}, e.g. `algo.lr: {loguniform: [1.0e-5, 1.0e-3]}`
    metric, mode          what trials are ranked by, e.g. eval/target_fraction max, or reward/mean max
    num_samples           trials to sample (each grid multiplies them, as in Tune)
    scheduler             {name: fifo}, {name: asha, grace_period: 2, reduction_factor: 2, max_t: <epochs>} or
                          {name: pbt, perturbation_interval: <epochs>, hyperparam_mutations: {key: domain, ...}}
                          (mutations as in search_space, which they default to; other options are Tune's:
                          quantile_fraction, resample_probability, burn_in_period, synch, ...)
    max_concurrent_trials trials running at once
    resources_per_trial   {cpu: ..., gpu: ...} for a trial's driver; its rollout actors and learners ask for
                          their own through the ray.* config keys (ray.cpus_per_rollout_worker, ...)
    num_cpus              logical CPUs of a new local Ray (null = max(4, cores): Train inside Tune needs headroom)
    storage_path          where sweeps live; the sweep's folder is <storage_path>/<name>

Each trial runs `rlft.run.run` (the code path of `python -m rlft.run`) with its own run folder
`<storage_path>/<name>/<trial>/run/` and its own wandb run (grouped by sweep name), and reports to Tune once per
epoch: that epoch's training metrics plus the latest evaluation's `eval/...` metrics (`eval/epoch` says which),
and, at each epoch where rlft wrote a checkpoint (trainer.checkpoint_every), that checkpoint: Tune keeps a copy of
the rlft checkpoint folder as the trial's checkpoint (as many as trainer.keep_checkpoints). A trial that Tune starts
with a checkpoint continues from it with its own config: the checkpoint becomes the only one in its run folder and
the run resumes it, with weights, optimizer moments, counters and RNG from the checkpoint and hyperparameters (lr,
clip range, ...) from the trial's config. PBT uses this to exploit: at every perturbation_interval epochs (where
every trial checkpoints) the bottom quantile_fraction of the trials continue from copies of the top ones'
checkpoints with mutated hyperparameters; each report after that says which one (`tune/restored_from`), and Tune
logs every exploit in pbt_global.txt.

At the end the results table is printed and saved as results.csv and results.json, and the best trial's config
as best_config.yaml (with the `python -m rlft.run` command that reproduces it; under PBT its last hyperparameters,
while its weights descend from other trials'). Rerunning a sweep whose folder exists resumes it with
`Tuner.restore`: finished trials are kept, and each unfinished one continues its run from its last checkpoint.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from rlft.config import GROUPS, ConfigError, compose, compose_config, flat_keys, nearest, validate

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEP_DIRS = (Path("tune_configs"), REPO_ROOT / "tune_configs")
SWEEP_KEYS = {
    "name": None, "overrides": [], "search_space": {}, "metric": None, "mode": None, "num_samples": 1,
    "scheduler": {"name": "fifo"}, "max_concurrent_trials": 1, "resources_per_trial": {"cpu": 1},
    "num_cpus": None, "storage_path": "runs/tune",
}  # fmt: skip
DOMAINS = ("choice", "grid", "uniform", "loguniform", "quniform", "qloguniform", "randint", "lograndint")
SCHEDULERS = ("fifo", "asha", "pbt")
# what fixes the shapes of the weights and the learner replicas a checkpoint holds: PBT never mutates these, since a
# trial continues another trial's checkpoint
PBT_FIXED = ("algo", "env", "env.base_model", "policy.lora_rank", "policy.lora_target_modules", "ray.num_learners")
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
    raise SweepError(f"no sweep {name!r} in tune_configs/{nearest(name, known)} (sweeps: {', '.join(known)})")


def load_sweep(name: str, args: list[str]) -> dict:
    """The sweep file with the command line applied: sweep keys set, anything else appended to `overrides`."""
    path = find_sweep(name)
    sweep = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(sweep) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown sweep key {unknown[0]!r}{nearest(unknown[0], list(SWEEP_KEYS))}")
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


def domain(kind: str, args: list):
    from ray import tune

    if kind == "grid":
        return tune.grid_search(list(args))
    if kind == "choice":
        return tune.choice(list(args))
    return getattr(tune, kind)(*args)


def search_space(sweep: dict) -> dict:
    """The sweep's `search_space` as Tune domains, keyed by rlft config key."""
    return {key: domain(*next(iter(spec.items()))) for key, spec in sweep["search_space"].items()}


def mutation_specs(sweep: dict) -> dict:
    """PBT's `hyperparam_mutations` as written in the sweep (the search space when it gives none)."""
    return sweep["scheduler"].get("hyperparam_mutations") or sweep["search_space"]


def mutations(sweep: dict) -> dict:
    """PBT's mutations as Tune takes them: a choice or grid as a list, whose neighbouring values PBT steps to, and a
    range as a domain, whose values PBT scales (by 0.8 or 1.2); either is resampled with resample_probability."""
    space = {}
    for key, spec in mutation_specs(sweep).items():
        kind, args = next(iter(spec.items()))
        space[key] = list(args) if kind in ("choice", "grid") else domain(kind, args)
    return space


def tuned_keys(sweep: dict) -> list[str]:
    """The config keys Tune sets per trial: the search space's, and under PBT the mutated ones."""
    keys = list(sweep["search_space"])
    if sweep["scheduler"].get("name") == "pbt":
        keys += [key for key in mutation_specs(sweep) if key not in keys]
    return keys


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
    base_overrides = [*TRIAL_DEFAULTS, *sweep["overrides"]]
    validate(compose(base_overrides))
    known = flat_keys(compose_config(base_overrides)[0]) + list(GROUPS)
    check_space("search_space", sweep["search_space"], base_overrides, known)
    if scheduler == "pbt":
        check_pbt(sweep, base_overrides, known)


def check_space(section: str, space: dict, base_overrides: list[str], known: list[str]) -> None:
    """Each key of a search space (or of PBT's mutations) is a config key with a domain whose values give valid runs."""
    for key, spec in space.items():
        if key not in known:
            raise SweepError(f"{section}: unknown config key {key!r}{nearest(key, known)}")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise SweepError(f"{section}.{key} must be one of {{{'|'.join(DOMAINS)}: [...]}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args:
            raise SweepError(f"{section}.{key}.{kind} needs a list of arguments, got {args!r}")
        for value in probe_values(kind, args):
            try:
                validate(compose([*base_overrides, override(key, value)]))
            except (ConfigError, ValueError, KeyError) as error:
                raise SweepError(f"{section}.{key}: the value {value!r} gives an invalid run: {error}") from None


def check_pbt(sweep: dict, base_overrides: list[str], known: list[str]) -> None:
    """PBT perturbs at whole epochs where every trial has a checkpoint, and mutates only what a trial can change
    while it continues another trial's checkpoint."""
    options = sweep["scheduler"]
    interval = options.get("perturbation_interval")
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise SweepError(f"scheduler.perturbation_interval={interval} must be a whole number of epochs, at least 1 "
                         "(e.g. eval.every, so that every perturbation ranks the trials by a fresh evaluation)")
    if options.get("burn_in_period", 0) % interval:
        raise SweepError(f"scheduler.burn_in_period={options['burn_in_period']} must be a multiple of "
                         f"perturbation_interval={interval}: trials checkpoint for PBT at multiples of it")
    specs = mutation_specs(sweep)
    if not specs:
        raise SweepError("scheduler pbt has nothing to mutate; set scheduler.hyperparam_mutations (as search_space, "
                         "e.g. `algo.lr: {loguniform: [1.0e-5, 1.0e-3]}`) or a search_space, its default")
    section = "search_space"
    if options.get("hyperparam_mutations"):  # the search space was checked already
        section = "scheduler.hyperparam_mutations"
        check_space(section, specs, base_overrides, known)
    fixed = sorted(set(specs) & set(PBT_FIXED))
    if fixed:
        raise SweepError(f"{section}: PBT cannot mutate {fixed[0]}: a trial continues another trial's checkpoint, "
                         "which must be of the same model, LoRA adapters and number of learners")


def override(key: str, value) -> str:
    """A sampled value as an rlft command-line override."""
    return f"{key}={json.dumps(value) if isinstance(value, bool | None | list) else value}"


# ---------------------------------------------------------------------------------------------- one trial


class TuneReport:
    """The report hook of a trial: one `ray.tune.report` per epoch, once that epoch's evaluation and checkpoint are
    written where it has them, with the epoch's training metrics, the latest evaluation's metrics and the
    checkpoint (a directory holding the rlft checkpoint, which PBT copies into other trials). After a restore every
    report also says which Tune checkpoint the trial continued from (`tune/restored_from`: trial folder/checkpoint)."""

    def __init__(self, metric: str, epochs: int, eval_every: int, checkpoint_every: int,
                 restored_from: str | None = None):  # fmt: skip
        self.metric, self.epochs, self.eval_every, self.checkpoint_every = metric, epochs, eval_every, checkpoint_every
        self.restored = {"tune/restored_from": restored_from} if restored_from else {}
        self.latest_eval: dict = {}
        self.pending: dict | None = None
        self.checkpoint: str | None = None

    def __call__(self, kind: str, payload: dict) -> None:
        if kind == "metrics":
            self.pending, self.checkpoint = payload, None
        elif kind == "eval":
            self.latest_eval = {**payload["metrics"], "eval/epoch": payload["epoch"]}
        elif kind == "checkpoint":
            self.checkpoint = payload["path"]
        elif kind == "start":  # the learners (re)start from a checkpoint: an epoch in flight is done again
            self.pending = None
        if self.pending is not None and self.complete(self.pending["epoch"]):
            self.send()

    def complete(self, epoch: int) -> bool:
        from rlft.checkpoint import due

        evaluated = not due(epoch, self.eval_every, self.epochs) or self.latest_eval.get("eval/epoch") == epoch
        return evaluated and (not due(epoch, self.checkpoint_every, self.epochs) or self.checkpoint is not None)

    def send(self) -> None:
        from ray import tune

        result = {**self.pending, **self.latest_eval, **self.restored}
        checkpoint = tune.Checkpoint.from_directory(self.checkpoint) if self.checkpoint else None
        self.pending = None
        if self.metric not in result:
            raise SweepError(f"metric {self.metric!r} is not among this run's metrics ({', '.join(sorted(result))}); "
                             "set the sweep's metric to one of them")  # fmt: skip
        tune.report(result, checkpoint=checkpoint)


def trial_overrides(overrides: list[str], params: dict) -> list[str]:
    return [*TRIAL_DEFAULTS, *overrides, *(override(k, v) for k, v in params.items())]


def trial_resources(sweep: dict):
    """A trial's placement group: its driver's bundle (resources_per_trial) and one bundle per rollout actor, which
    Tune places in the trial's group. Ray Train reserves the learners' resources in a group of its own."""
    from ray.tune import PlacementGroupFactory

    driver = {k.upper(): v for k, v in sweep["resources_per_trial"].items()}

    def resources(params: dict) -> PlacementGroupFactory:
        r = compose(trial_overrides(sweep["overrides"], params)).ray
        actor = {"CPU": r.cpus_per_rollout_worker, **({"GPU": r.gpus_per_rollout_worker} if r.gpus_per_rollout_worker
                                                      else {}), **r.rollout_resources}  # fmt: skip
        return PlacementGroupFactory([driver] + [actor] * r.num_rollout_workers)

    return resources


def run_trial(params: dict, overrides: list[str], sweep_name: str, metric: str) -> None:
    """A Tune function trainable: the rlft run for one point of the search space, in the trial's folder.

    A trial given a Tune checkpoint (PBT exploiting another trial, or Tune restoring this one) continues from it,
    with this trial's config: the checkpoint becomes the only one in its run folder, and the run resumes it."""
    from ray import tune

    from rlft.checkpoint import adopt, plan_run
    from rlft.run import run

    context = tune.get_context()
    run_dir = Path(context.get_storage().trial_fs_path) / "run"  # in the sweep folder, next to Tune's records
    if run_dir.exists() and not (run_dir / "config.yaml").exists():  # killed before its run folder was written
        shutil.rmtree(run_dir)
    given, restored_from = tune.get_checkpoint(), None
    if given is not None:
        with given.as_directory() as folder:
            epoch = adopt(Path(folder), run_dir / "checkpoints").epoch
        restored_from = f"{Path(given.path).parent.name}/{Path(given.path).name}"
        print(f"rlft.tune: trial {context.get_trial_id()} continues from {restored_from} (epoch {epoch}) with "
              f"{params}", flush=True)  # fmt: skip
    resume = []
    if (run_dir / "config.yaml").exists():  # an earlier attempt: continue its run from the checkpoint given,
        resume = [f"resume='{run_dir}'"]  # else its newest one (from its first epoch when it has none)
    spec = compose([
        *trial_overrides(overrides, params), f"logging.run_dir='{run_dir}'", *resume,  # quoted: folders hold = and ,
        f"logging.wandb_group={sweep_name}", f"logging.wandb_name={sweep_name}-{context.get_trial_id()}",
    ])  # fmt: skip
    validate(spec)
    plan = plan_run(spec, run_dir)
    if plan.checkpointer.wandb_run_id:  # one wandb run per trial, also after continuing another trial's checkpoint
        plan.checkpointer.wandb_run_id = spec.logging.wandb_name
    run(spec, TuneReport(metric, spec.trainer.epochs, spec.eval.every, spec.trainer.checkpoint_every, restored_from),
        plan=plan)  # fmt: skip


# ---------------------------------------------------------------------------------------------- the sweep


def make_scheduler(sweep: dict, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    name = sweep["scheduler"]["name"]
    options = {k: v for k, v in sweep["scheduler"].items() if k != "name"}
    if name == "fifo":
        return FIFOScheduler()
    scheduler = ASHAScheduler if name == "asha" else PopulationBasedTraining
    accepted = [key for key in inspect.signature(scheduler).parameters if key not in ("metric", "mode", "time_attr")]
    for key in options:
        if key not in accepted:
            raise SweepError(f"scheduler {name}: unknown option {key!r}{nearest(key, accepted)}")
    # time in epochs, not Tune's report count: a trial resumed from a checkpoint first reports its next epoch
    if name == "asha":
        options = {"time_attr": "epoch", "max_t": epochs, "grace_period": 1, "reduction_factor": 2, **options}
    else:
        options = {"time_attr": "epoch", **options, "hyperparam_mutations": mutations(sweep)}
    try:
        return scheduler(**options)
    except (TypeError, ValueError) as error:
        raise SweepError(f"scheduler {name}: {error}") from None


def init_ray(sweep: dict) -> None:
    from rlft.pipeline import start_ray

    # trials keep the launch folder as their working directory, so relative paths in overrides mean the same
    start_ray(None, sweep["num_cpus"], {"RAY_CHDIR_TO_TRIAL_DIR": "0"})


def run_sweep(sweep: dict, scheduler, keep_checkpoints: int):
    """Start the sweep, or resume it when its folder holds an interrupted one; returns Tune's ResultGrid. Tune keeps
    as many of a trial's reported checkpoints (copies of its rlft checkpoints) as rlft keeps in its run folder."""
    from ray import tune

    sweep_dir = Path(sweep["storage_path"]).resolve() / sweep["name"]
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, overrides=sweep["overrides"], sweep_name=sweep["name"],
                             metric=sweep["metric"]),
        trial_resources(sweep),
    )  # fmt: skip
    if tune.Tuner.can_restore(str(sweep_dir)):
        check_owner(sweep_dir)  # Tune unpickles the sweep's state: only from a folder nobody else could write
        print(f"rlft.tune: resuming the sweep in {sweep_dir} (its saved search space and settings apply)", flush=True)
        # a trial that failed is retried from its newest checkpoint, like an interrupted one
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        print(f"rlft.tune: sweep folder {sweep_dir}", flush=True)
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(sweep),
            tune_config=tune.TuneConfig(
                metric=sweep["metric"], mode=sweep["mode"], num_samples=sweep["num_samples"],
                scheduler=scheduler, max_concurrent_trials=sweep["max_concurrent_trials"],
            ),
            run_config=tune.RunConfig(name=sweep["name"], storage_path=str(sweep_dir.parent), verbose=1,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints)),
        )  # fmt: skip
    return tuner.fit(), sweep_dir


def check_owner(sweep_dir: Path) -> None:
    """Refuse a sweep folder whose state files another user owns or may write: restoring a sweep unpickles them
    (tuner.pkl, the trials' state), and a pickle runs whatever code its author put in it."""
    for path in [sweep_dir, *sweep_dir.glob("*.pkl"), *sweep_dir.glob("*.json")]:
        info = path.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise SweepError(f"{path} belongs to another user or is writable by others (owner uid {info.st_uid}, "
                             f"mode {oct(info.st_mode & 0o777)}); rlft will not restore a sweep from it, since that "
                             "unpickles its files. Give the sweep another name=..., or check the folder and fix its "
                             "ownership")  # fmt: skip


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
            **{key: config.get(key) for key in tuned_keys(sweep)},
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
    overrides = [*sweep["overrides"], *(override(k, best[k]) for k in tuned_keys(sweep))]
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


def usage() -> str:
    sweeps = sorted({p.stem for folder in SWEEP_DIRS if folder.is_dir() for p in folder.glob("*.yaml")})
    return "\n".join([
        "usage: python -m rlft.tune <sweep> [sweep_key=value ...] [rlft key=value ...]",
        "",
        f"sweeps (tune_configs/*.yaml, or a path to a sweep file): {', '.join(sweeps)}",
        f"sweep keys: {', '.join(SWEEP_KEYS)} (see this module's docstring); any other key=value is an rlft override",
        "shared by every trial (python -m rlft.run --help lists them)",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> Path | None:
    args = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(args):
        print(usage())
        return None
    if not args or "=" in args[0]:
        raise SystemExit(usage())
    try:
        sweep = load_sweep(args[0], args[1:])
        check_sweep(sweep)
        trainer = compose([*TRIAL_DEFAULTS, *sweep["overrides"]]).trainer
        if sweep["scheduler"]["name"] == "pbt":  # a checkpoint at every perturbation, for PBT to copy
            every = math.gcd(trainer.checkpoint_every, sweep["scheduler"]["perturbation_interval"])
            sweep["overrides"].append(f"trainer.checkpoint_every={every}")
        scheduler = make_scheduler(sweep, trainer.epochs)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as error:
        raise SystemExit(f"rlft.tune: {error}") from None
    init_ray(sweep)
    try:
        result_grid, sweep_dir = run_sweep(sweep, scheduler, trainer.keep_checkpoints)
    except SweepError as error:  # a sweep folder refused before Tune restores it (check_owner): one line
        raise SystemExit(f"rlft.tune: {error}") from None
    table = results_table(result_grid, sweep, trainer.epochs)
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
    if errors:  # the sweep's results are written above; the exit status tells scripts and CI that it is incomplete
        print(f"rlft.tune: the first trial error:\n{errors[0]}", file=sys.stderr, flush=True)
        raise SystemExit(f"rlft.tune: {len(errors)} of {len(table)} trial(s) failed (status 'error' in results.csv, "
                         f"each trial's error.txt in its folder); rerunning `python -m rlft.tune {' '.join(args)}` "
                         "retries them from their newest checkpoints")  # fmt: skip
    return sweep_dir


if __name__ == "__main__":
    main()
