"""Config composition with errors that teach: Hydra's compose API over the typed spec, plus checks before Ray starts.

`compose(["algo=ddpo", "trainer.epochs=3"])` returns a `RunSpec` (rlft/spec.py) whose `algo`, `env` and `reward` are
the chosen groups' dataclasses, or raises `ConfigError` with one line naming the key, the value, what the key accepts
and the nearest valid key. `validate(spec)` then refuses impossible combinations (a reward that cannot score the
env's images, batch sizes that do not divide, a missing model) before anything is loaded.

The groups: algo (rlft.algorithms.<name>.Config), env (the presets of rlft.envs.tasks), reward (rlft.envs.rewards's
registry). Every key's default, comment and limits live in those dataclasses (rlft.core.spec.knob); an env may
change an algorithm's defaults (rlft.envs.tasks.ALGO_DEFAULTS), the command line still winning.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import typing
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from rlft.core.spec import (
    accepted,
    check_ranges,
    documented_fields,
    format_value,
    hints,
    optional_inner,
    range_problem,
)

CONFIG_MODULE = "rlft.conf"
GROUPS = ("algo", "env", "reward", "judge")
DEFAULT_CHOICES = {"algo": "ddpo", "env": "digits", "reward": "digit", "judge": "digit_judge"}  # as config.yaml


class ConfigError(ValueError):
    """A config problem found before anything runs; the message says what is wrong and how to fix it."""


# ---- the groups and their options ----
def group_classes(group: str) -> dict[str, Any]:
    """option name -> its config dataclass instance (env presets) or class (algorithms, rewards)."""
    if group == "algo":
        from rlft.algorithms import algorithm_names, load_algorithm

        return {name: load_algorithm(name).Config for name in algorithm_names()}
    if group == "env":
        from rlft.envs.tasks import ENV_PRESETS

        return dict(ENV_PRESETS)
    import rlft.envs  # noqa: F401  (registers every reward)
    from rlft.envs.rewards import REWARDS, judge_classes

    return dict(REWARDS) if group == "reward" else judge_classes()


def group_options(group: str) -> list[str]:
    return sorted(group_classes(group))


@functools.cache
def register_schemas() -> None:
    """Every group option in Hydra's ConfigStore, once per process: the typed nodes Hydra composes."""
    from hydra.core.config_store import ConfigStore

    from rlft.pretrain import PretrainSpec
    from rlft.spec import RunSpec

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunSpec)
    store.store(name="pretrain_schema", node=PretrainSpec)
    for group in GROUPS:
        for name, node in group_classes(group).items():
            store.store(group=group, name=name, node=node)


def nearest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    if not close:  # a typo in the last component only ("trainer.epoch") still finds "trainer.epochs"
        tails = {c.rsplit(".", 1)[-1]: c for c in candidates}
        tail_match = difflib.get_close_matches(word.rsplit(".", 1)[-1], list(tails), n=1, cutoff=0.6)
        close = [tails[tail_match[0]]] if tail_match else []
    return f"; did you mean {close[0]!r}?" if close else ""


def flat_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, DictConfig):
            keys.extend(flat_keys(value, path + "."))
    return keys


def split_override(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(f"argument {override!r} is not of the form key=value (for example trainer.epochs=10); "
                          "--help lists the keys")  # fmt: skip
    key, value = override.split("=", 1)
    return key.lstrip("+~"), value


def field_of(key: str, choices: dict[str, str], config_name: str = "config"):
    """(field, annotation) of a dotted key, in the dataclasses the group choices select, or None."""
    root = pretrain_schema() if config_name == "pretrain" else run_schema()
    head, _, rest = key.partition(".")
    if head in GROUPS and rest and head in choices:
        option = group_classes(head).get(choices[head])
        if option is None:
            return None
        cls = option if isinstance(option, type) else type(option)
        fields = {k: (f, a) for k, f, a in documented_fields(cls)}
        return fields.get(rest)
    return {k: (f, a) for k, f, a in documented_fields(root)}.get(key)


def run_schema():
    from rlft.spec import RunSpec

    return RunSpec


def pretrain_schema():
    from rlft.pretrain import PretrainSpec

    return PretrainSpec


def schema_keys(choices: dict[str, str], config_name: str = "config") -> list[str]:
    """Every dotted key of the config the group choices select, from the dataclasses (no composition needed)."""
    root = pretrain_schema() if config_name == "pretrain" else run_schema()
    keys = [key for key, _, _ in documented_fields(root)]
    keys += sorted({key.rsplit(".", 1)[0] for key in keys if "." in key})  # the sections themselves
    for group, choice in choices.items():
        option = group_classes(group).get(choice)
        if option is not None:
            cls = option if isinstance(option, type) else type(option)
            keys += [group, *(f"{group}.{key}" for key, _, _ in documented_fields(cls))]
    return keys


def describe_key(key: str, choices: dict[str, str], config_name: str) -> str:
    found = field_of(key, choices, config_name)
    if found is None:
        return ""
    field, annotation = found
    return f"{key} takes {accepted(field, annotation)} ({field.metadata['doc']})"


def composition_error(error: Exception, overrides: list[tuple[str, str]], choices: dict[str, str],
                      config_name: str) -> ConfigError:  # fmt: skip
    """One line for a Hydra / OmegaConf failure: which override, what its key accepts."""
    text = " ".join(str(error).split())
    match = re.search(r"override '?([^\s']+?)'?(?:\.|$| )", text)
    failing = [(k, o) for k, o in overrides if match and o.lstrip("+~") == match.group(1)]
    if not failing:  # a value that failed to convert names its key in OmegaConf's cause
        cause = error.__cause__ or error
        full_key = getattr(cause, "full_key", None)
        failing = [(k, o) for k, o in overrides if k == full_key]
    if failing:
        key, override = failing[0]
        about = describe_key(key, choices, config_name)
        return ConfigError(f"{override} is not valid: {about}" if about else f"{override} is not valid ({text})")
    return ConfigError(text)


# ---- composition ----
def algo_defaults(choices: dict[str, str], given: dict[str, str] | None = None) -> dict[str, Any]:
    """The env's own defaults for the chosen algorithm (rlft.envs.tasks.ALGO_DEFAULTS) as {"algo.<key>": value},
    less the keys the command line sets (`given`: key -> value), which win; none when it sets another base model
    than the preset's, on which the defaults were measured."""
    from rlft.envs.tasks import ALGO_DEFAULTS, ENV_PRESETS

    given = given or {}
    model = given.get("env.base_model", "").strip().strip("'\"")
    if model and model != ENV_PRESETS[choices["env"]].base_model:
        return {}
    table = ALGO_DEFAULTS.get(choices["env"], {}).get(choices["algo"], {})
    return {f"algo.{key}": value for key, value in table.items() if f"algo.{key}" not in given}


def compose_config(overrides: list[str], config_name: str = "config") -> tuple[DictConfig, dict[str, str]]:
    """The composed DictConfig (typed by the schema, interpolations resolved) and the group choices."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    register_schemas()
    choices = dict(DEFAULT_CHOICES) if config_name == "config" else {"env": "digits"}
    group_overrides, key_overrides = [], []
    for override in overrides:
        key, value = split_override(override)
        if key in GROUPS or (config_name == "pretrain" and key == "env"):
            options = group_options(key)
            if value not in options:
                raise ConfigError(f"{key}={value} is not an available {key}{nearest(value, options)} (choices: "
                                  f"{', '.join(options)})")  # fmt: skip
            group_overrides.append(override)
            choices[key] = value
        else:
            key_overrides.append((key, override))
    for key, override in key_overrides:  # OmegaConf reads any integer as a bool (2 -> true): only true / false pass
        found = field_of(key, choices, config_name)
        value = override.split("=", 1)[1].strip().lower()
        if found and optional_inner(found[1])[0] is bool and value not in ("true", "false", "null", "none"):
            raise ConfigError(f"{override} is not valid: {describe_key(key, choices, config_name)}")
    chosen = {split_override(o)[0] for o in group_overrides}
    if config_name == "config" and "env" in chosen:  # each env names its reward and its judge
        preset = group_classes("env")[choices["env"]]
        for group, default in (("reward", preset.default_reward), ("judge", preset.default_judge)):
            if group not in chosen:
                choices[group] = default
                group_overrides.append(f"{group}={default}")
    given = dict(split_override(override) for _, override in key_overrides)
    env_defaults = algo_defaults(choices, given) if config_name == "config" else {}
    same_digit = (choices.get("judge"), choices.get("reward")) == ("digit_judge", "digit")
    if config_name == "config" and same_digit and not any(key == "judge.target" for key, _ in key_overrides):
        key_overrides.append(("judge.target", "judge.target=${reward.target}"))  # the judge checks the same digit
    known = schema_keys(choices, config_name)
    for index, (key, override) in enumerate(key_overrides):
        if key not in known and not override.startswith("+"):
            parent = field_of(key.rsplit(".", 1)[0], choices, config_name) if "." in key else None
            if parent is None or typing.get_origin(optional_inner(parent[1])[0]) is not dict:
                raise ConfigError(f"unknown config key {key!r}{nearest(key, known)}")
            key_overrides[index] = (key, "+" + override)  # a new entry of a dict key (reward.arguments.<k>=v)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        try:
            cfg = hydra_compose(config_name=config_name, overrides=group_overrides + [o for _, o in key_overrides])
            for key, value in env_defaults.items():  # before resolving: trainer.epochs=${algo.epochs} sees them
                OmegaConf.update(cfg, key, value, merge=False)
            OmegaConf.resolve(cfg)
        except OverrideParseException as error:
            bad = next((o for _, o in key_overrides if o in str(error)), " ".join(overrides))
            first = str(error).strip().splitlines()[0]
            raise ConfigError(f"cannot parse the override {bad!r} ({first}); quote values that hold brackets, commas "
                              "or spaces, e.g. key='[1, 2]' or key='a b'") from None  # fmt: skip
        except (HydraException, OmegaConfBaseException) as error:
            raise composition_error(error, key_overrides, choices, config_name) from None
    return cfg, choices


def range_problems(cfg: DictConfig, prefix: str = "") -> list[str]:
    """`check_ranges` on the composed DictConfig, before the dataclasses are built: their own cross-field checks
    (__post_init__) then see only values within their limits."""
    cls = OmegaConf.get_type(cfg)
    if not dataclasses.is_dataclass(cls):
        return []
    annotations = hints(cls)
    problems = []
    for field in dataclasses.fields(cls):
        value, key = cfg.get(field.name), f"{prefix}{field.name}"
        if isinstance(value, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(value)):
            problems += range_problems(value, key + ".")
            continue
        plain = OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value
        if (problem := range_problem(key, plain, field, annotations[field.name])) is not None:
            problems.append(problem)
    return problems


def compose(overrides: list[str], config_name: str = "config"):
    """The typed spec of `config_name` with command-line overrides, types and ranges checked."""
    cfg, choices = compose_config(overrides, config_name)
    problems = range_problems(cfg)
    if problems:
        raise ConfigError(problems[0])
    try:
        spec = OmegaConf.to_object(cfg)
    except ValueError as error:  # a config's own cross-field check (its __post_init__)
        raise ConfigError(str(error)) from None
    problems = check_ranges(spec)
    if problems:
        raise ConfigError(problems[0])
    return spec


def load_spec(saved: dict, overrides: list[str] = ()):
    """The spec a run saved (its config.yaml as a dict), with overrides: its groups composed again, its values
    merged in, then types and ranges checked as for a new run."""
    lacking = [g for g in GROUPS if not isinstance(saved, dict) or not isinstance(saved.get(g), dict)
               or "name" not in saved[g]]  # fmt: skip
    if lacking:
        raise ConfigError(f"the saved config has no {lacking[0]} group with its name: it is not a config.yaml "
                          "written by rlft.run")  # fmt: skip
    choices = [f"{group}={saved[group]['name']}" for group in GROUPS if group in saved]
    cfg, _ = compose_config(choices)
    try:
        merged = OmegaConf.merge(cfg, saved, OmegaConf.from_dotlist(list(overrides)))
        spec = OmegaConf.to_object(merged)
    except Exception as error:  # noqa: BLE001 (OmegaConf raises several kinds; all mean "does not fit")
        raise ConfigError(f"the saved config does not fit this version of rlft, or an override is wrong: "
                          f"{' '.join(str(error).split())}") from None  # fmt: skip
    problems = check_ranges(spec)
    if problems:
        raise ConfigError(problems[0])
    return spec


def to_dict(spec) -> dict:
    """The spec as plain data (JSON- and YAML-able): for config hashes, config.yaml, wandb."""
    return dataclasses.asdict(spec)


def to_yaml(spec) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(spec)))


# ---- devices ----
DEVICE_PATTERN = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def resolve_device(name: str) -> torch.device:
    if not DEVICE_PATTERN.match(name):
        raise ConfigError(f"device={name} is not one of cpu, cuda, cuda:<index> or auto (cuda when one is visible)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


# ---- the checks before anything starts ----
def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def fitting_rewards(image) -> list[str]:
    """Rewards whose declared inputs fit an env's images (with their default settings)."""
    return [name for name, cls in sorted(group_classes("reward").items()) if not cls().accepts().problems(image)]


def validate(spec) -> None:
    """Impossible combinations, caught before Ray starts and before any model is loaded; each message names the
    values involved and a fix."""
    from rlft.algorithms import load_algorithm

    t, r, algo, env = spec.trainer, spec.ray, spec.algo, spec.env
    module = load_algorithm(algo.name)
    resolve_device(spec.device)
    for problem in env.problems():
        raise ConfigError(problem)
    learners, workers = r.num_learners, r.num_rollout_workers
    require(workers % learners == 0, f"ray.num_rollout_workers={workers} must be a multiple of ray.num_learners="
            f"{learners}: each learner feeds from its own rollout workers")  # fmt: skip
    require(r.enabled or learners == 1, f"ray.enabled=false runs one learner, but ray.num_learners={learners}")
    if r.learner_parallelism == "fsdp":
        require(learners > 1, "ray.learner_parallelism=fsdp shards the network across learners, and ray.num_learners"
                "=1: set ray.num_learners=2 (or more), or ray.learner_parallelism=ddp")  # fmt: skip
        require(spec.policy.lora_rank == 0, "ray.learner_parallelism=fsdp shards a fully fine-tuned network, and "
                f"policy.lora_rank={spec.policy.lora_rank} trains small LoRA adapters that every learner can hold: use "
                "ray.learner_parallelism=ddp for LoRA (or policy.lora_rank=0)")  # fmt: skip
        # the compiled network is checked against eager before training (DiffusionPolicy.compile_network), unsharded
        require(not spec.policy.compile, "ray.learner_parallelism=fsdp runs the sharded network eager, and "
                "policy.compile=true compiles it unsharded: set policy.compile=false, or "
                "ray.learner_parallelism=ddp")  # fmt: skip
    require(spec.eval.num_samples % t.rollout_batch_size == 0, f"eval.num_samples={spec.eval.num_samples} must be a "
            f"multiple of trainer.rollout_batch_size={t.rollout_batch_size}")  # fmt: skip
    if module.uses_rollouts(algo):  # collection and buffer sizes matter only to algorithms that use rollouts
        per_worker, remainder = divmod(t.samples_per_epoch, workers)
        batches = max(1, round(t.samples_per_epoch / workers / t.rollout_batch_size))
        require(remainder == 0 and per_worker % t.rollout_batch_size == 0 and per_worker > 0,
                f"trainer.samples_per_epoch={t.samples_per_epoch} must split into {workers} rollout worker(s) x whole "
                f"batches of trainer.rollout_batch_size={t.rollout_batch_size}; try samples_per_epoch="
                f"{workers * t.rollout_batch_size * batches}")  # fmt: skip
        per_learner = t.samples_per_epoch // learners
        capacity = t.buffer_capacity or per_learner
        require(capacity >= per_learner, f"trainer.buffer_capacity={capacity} is smaller than one epoch's "
                f"trajectories per learner ({per_learner}): new data would be evicted before it is trained on")
        if hasattr(algo, "minibatch_size"):
            require(algo.minibatch_size <= per_learner, f"algo.minibatch_size={algo.minibatch_size} must lie in "
                    f"1..{per_learner} (trajectories per learner per epoch)")  # fmt: skip
    if t.async_rollouts:
        require(module.uses_rollouts(algo), f"trainer.async_rollouts=true overlaps rollout collection with the "
                f"update, and algo={algo.name} collects no rollouts (it samples on the learner): set "
                "trainer.async_rollouts=false")  # fmt: skip
        require(t.max_staleness >= 1, "trainer.async_rollouts=true trains each epoch on data sampled one policy "
                "version earlier; set trainer.max_staleness=1 (or more) so the buffer keeps it")  # fmt: skip
    if module.REQUIRES_STOCHASTIC_SAMPLER:
        require(env.eta > 0, f"algo={algo.name} needs log-probabilities of a stochastic sampler, but env.eta="
                f"{env.eta}; use env.eta=1.0 (or any value in (0, 1])")  # fmt: skip
    accepts = spec.reward.accepts()
    if module.REQUIRES_DIFFERENTIABLE_REWARD:
        require(accepts.differentiable, f"algo={algo.name} backpropagates through the reward, but reward="
                f"{spec.reward.name} is not differentiable; choose a differentiable reward such as reward=digit")
        require(not r.remote_reward, f"algo={algo.name} backpropagates through the reward, which a remote reward "
                "actor cannot do; set ray.remote_reward=false")  # fmt: skip
    require(r.enabled or not r.remote_reward, "ray.remote_reward=true runs the reward in a Ray actor; it needs "
            "ray.enabled=true (or set ray.remote_reward=false)")  # fmt: skip
    for problem in module.validate(spec):  # the algorithm's own checks
        raise ConfigError(problem)
    require(spec.policy.lora_sampling_scale == 1.0 or spec.policy.lora_rank > 0, "policy.lora_sampling_scale scales "
            "LoRA adapters, and policy.lora_rank=0 trains none; set policy.lora_rank=4 (or leave the scale at 1)")
    if spec.policy.fused_norm_silu:
        require(spec.policy.compile and spec.policy.channels_last, "policy.fused_norm_silu=true runs in the compiled "
                "NHWC network: set policy.compile=true policy.channels_last=true too")  # fmt: skip
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        require(resolve_device(spec.device).type == "cuda" or interpreted, "policy.fused_norm_silu=true runs Triton "
                f"GPU kernels, and device={spec.device} is not a GPU: use device=cuda, or policy.fused_norm_silu=false")
    if resolve_device(spec.device).type == "cuda" and r.enabled:
        require(r.gpus_per_learner > 0 and r.gpus_per_rollout_worker > 0, f"device={spec.device} with Ray needs "
                "ray.gpus_per_learner and ray.gpus_per_rollout_worker above 0 (fractions share one GPU)")
    env.check()  # a missing base model stops the run here (reads config files only)
    if hasattr(module, "schedule_problems"):  # an algorithm's checks of the model's sampling schedule
        for problem in module.schedule_problems(spec, env.schedule()):
            raise ConfigError(problem)
    image = env.image_spec()
    problems = accepts.problems(image)
    if problems:
        fits = [name for name in fitting_rewards(image) if name != spec.reward.name]
        suggestion = f"; rewards that fit: {', '.join(fits)}" if fits else ""
        raise ConfigError(f"reward={spec.reward.name} cannot score env={env.name}: {'; '.join(problems)} (env "
                          f"{env.name}'s default is reward={env.default_reward}){suggestion}")  # fmt: skip
    spec.reward.check()  # a missing reward model stops it too
    judge = spec.judge
    if judge.name != "none":
        require(dataclasses.asdict(judge) != dataclasses.asdict(spec.reward), f"judge={judge.name} is the training "
                "reward itself, so it cannot tell a real gain from reward hacking; choose another judge or judge=none")
        problems = judge.accepts().problems(image)
        require(not problems, f"judge={judge.name} cannot score env={env.name}: {'; '.join(problems)}; choose another "
                "judge or judge=none")  # fmt: skip
        judge.check()


# ---- --help ----
def help_text(prog: str, usage: str, config_name: str = "config") -> str:
    """The usage, the groups and their choices, and every top-level key with what it accepts and its comment."""
    lines = [f"usage: {prog} {usage}", ""]
    if config_name == "config":
        lines.append("config groups (group=<choice>; the defaults first):")
        for group in GROUPS:
            options = group_options(group)
            default = DEFAULT_CHOICES[group]
            ordered = [default] + [o for o in options if o != default]
            lines.append(f"  {group}: {', '.join(ordered)}")
        from rlft.envs.tasks import ALGO_DEFAULTS

        for choice in ({"env": env, "algo": algo} for env, algos in ALGO_DEFAULTS.items() for algo in algos):
            values = " ".join(f"{key}={format_value(value)}" for key, value in algo_defaults(choice).items())
            lines.append(f"  env={choice['env']} with algo={choice['algo']} defaults to {values} (on the preset's "
                         "base model; the command line wins)")  # fmt: skip
        lines += ["", "keys (key=value; a group's own keys: algo.<key>, env.<key>, reward.<key>, judge.<key>, shown by "
                  "--cfg):"]
    root = run_schema() if config_name == "config" else pretrain_schema()
    for key, field, annotation in documented_fields(root):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if dataclasses.is_dataclass(default):
            continue
        lines.append(f"  {key}={format_value(default)}  # {field.metadata['doc']}; {accepted(field, annotation)}")
    lines += ["", f"{prog} [overrides] --cfg job   prints the composed config (every key, its value and comment)"]
    return "\n".join(lines)


def commented_config(spec, prefix: str = "", indent: str = "") -> list[str]:
    """The composed spec as YAML lines, each key with its comment and what it accepts."""
    from rlft.core.spec import hints

    lines = []
    annotations = hints(type(spec))
    for field in dataclasses.fields(spec):
        value = getattr(spec, field.name)
        if dataclasses.is_dataclass(value):
            kind = f"  # {type(value).__name__}" if prefix == "" and field.name in GROUPS else ""
            lines.append(f"{indent}{field.name}:{kind}")
            lines += commented_config(value, f"{prefix}{field.name}.", indent + "  ")
            continue
        rendered = OmegaConf.to_yaml({field.name: value}).strip()
        if "\n" in rendered:  # lists and dicts in flow style keep one line per key
            rendered = f"{field.name}: {OmegaConf.to_yaml(OmegaConf.create({'v': value})).strip()[3:]}"
            rendered = f"{field.name}: {value!r}" if "\n" in rendered else rendered
        doc = field.metadata.get("doc")
        comment = f"  # {doc}; {accepted(field, annotations[field.name])}" if doc else ""
        lines.append(f"{indent}{rendered}{comment}")
    return lines
