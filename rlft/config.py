"""Config composition with errors that teach: Hydra's compose API plus checks that run before Ray starts.

`compose(name, ["algo=ddpo", "trainer.epochs=3"])` returns the resolved config, or raises `ConfigError`
naming the bad key or value and the nearest valid one.
"""

from __future__ import annotations

import difflib
import os
from importlib.resources import files
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

CONFIG_MODULE = "rlft.conf"
CONFIG_DIR = Path(str(files("rlft") / "conf"))


class ConfigError(ValueError):
    """A config problem found before anything runs; the message says what is wrong and how to fix it."""


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def config_groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _nearest(word: str, candidates: list[str]) -> str:
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


def _split_override(override: str) -> tuple[str, str]:
    if "=" not in override:
        raise ConfigError(f"argument {override!r} is not of the form key=value (for example trainer.epochs=10)")
    key, value = override.split("=", 1)
    return key.lstrip("+~"), value


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose `config_name` from rlft/conf with command-line style overrides, checking every key."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    groups = config_groups()
    group_overrides, key_overrides = [], []
    for override in overrides:
        key, value = _split_override(override)
        if key in groups:
            options = group_options(key)
            if value not in options:
                raise ConfigError(
                    f"{key}={value} is not an available {key}{_nearest(value, options)} (choices: {', '.join(options)})"
                )
            group_overrides.append(override)
        else:
            key_overrides.append((key, override))
    chosen = dict(_split_override(o) for o in group_overrides)
    if "env" in chosen and "reward" not in chosen:  # an env may name its reward (inverse problems: measurement)
        default_reward = OmegaConf.load(CONFIG_DIR / "env" / f"{chosen['env']}.yaml").get("default_reward")
        if default_reward:
            group_overrides.append(f"reward={default_reward}")
            overrides = [*overrides, f"reward={default_reward}"]

    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        base = hydra_compose(config_name=config_name, overrides=group_overrides)
        known = flat_keys(base)
        for key, override in key_overrides:
            if key not in known and not override.startswith("+"):
                raise ConfigError(f"unknown config key {key!r}{_nearest(key, known)}")
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    OmegaConf.resolve(cfg)
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(name)


def to_container(cfg: DictConfig | ListConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(name: str, value, choices: tuple) -> None:
    _require(value in choices, f"{name}={value} is not one of {', '.join(map(str, choices))}")


def validate(cfg: DictConfig) -> None:
    """Impossible combinations, caught before Ray starts; each message names the values involved."""
    from rlft.algorithms import load_algorithm, make_config, uses_rollouts
    from rlft.envs.models import check_base_model
    from rlft.envs.rewards import make_reward_from_config

    t, r, algo = cfg.trainer, cfg.ray, cfg.algo
    module = load_algorithm(algo.name)
    algo_config = make_config(module, algo)  # the algorithm's own checks (its Config's __post_init__)
    learners, workers = r.num_learners, r.num_rollout_workers
    _require(learners >= 1 and workers >= 1, f"ray.num_learners={learners} and ray.num_rollout_workers={workers} "
             "must both be at least 1")  # fmt: skip
    _require(workers % learners == 0, f"ray.num_rollout_workers={workers} must be a multiple of ray.num_learners="
             f"{learners}: each learner feeds from its own rollout workers")  # fmt: skip
    _require(r.enabled or learners == 1, f"ray.enabled=false runs one learner, but ray.num_learners={learners}")
    _require(cfg.eval.num_samples % t.rollout_batch_size == 0,
             f"eval.num_samples={cfg.eval.num_samples} must be a multiple of trainer.rollout_batch_size="
             f"{t.rollout_batch_size}")  # fmt: skip
    if uses_rollouts(module, algo_config):  # collection and buffer sizes matter only to algorithms that use rollouts
        per_worker, remainder = divmod(t.samples_per_epoch, workers)
        batches = max(1, round(t.samples_per_epoch / workers / t.rollout_batch_size))
        _require(remainder == 0 and per_worker % t.rollout_batch_size == 0 and per_worker > 0,
                 f"trainer.samples_per_epoch={t.samples_per_epoch} must split into {workers} rollout worker(s) x whole "
                 f"batches of trainer.rollout_batch_size={t.rollout_batch_size}; try samples_per_epoch="
                 f"{workers * t.rollout_batch_size * batches}")
        per_learner = t.samples_per_epoch // learners
        capacity = t.buffer_capacity or per_learner
        _require(capacity >= per_learner, f"trainer.buffer_capacity={capacity} is smaller than one epoch's "
                 f"trajectories per learner ({per_learner}): new data would be evicted before it is trained on")
        if "minibatch_size" in algo:
            _require(0 < algo.minibatch_size <= per_learner, f"algo.minibatch_size={algo.minibatch_size} must lie in "
                     f"1..{per_learner} (trajectories per learner per epoch)")  # fmt: skip
    if getattr(module, "REQUIRES_STOCHASTIC_SAMPLER", False):
        _require(cfg.env.eta > 0, f"algo={algo.name} needs log-probabilities of a stochastic sampler, but env.eta="
                 f"{cfg.env.eta}; use env.eta=1.0 (or any value in (0, 1])")  # fmt: skip
    if cfg.env.get("dataset") == "flowers102":  # user-supplied model, torchvision and data: say what is missing
        from rlft.envs.flowers import check_flowers102

        check_flowers102(cfg.env.data_root, cfg.env.base_model)
    check_base_model(to_container(cfg.env))  # a missing base model stops the run here, before Ray starts
    reward = make_reward_from_config(to_container(cfg.reward))  # loads reward models: missing ones stop it too
    if getattr(module, "REQUIRES_DIFFERENTIABLE_REWARD", False):
        _require(reward.differentiable, f"algo={algo.name} backpropagates through the reward, but reward="
                 f"{cfg.reward.name} is not differentiable; choose a differentiable reward such as reward=digit")
        _require(not cfg.reward.remote, f"algo={algo.name} backpropagates through the reward, which a remote reward "
                 "actor cannot do; set reward.remote=false")  # fmt: skip
    _require(r.enabled or not cfg.reward.remote, "reward.remote=true runs the reward in a Ray actor; it needs "
             "ray.enabled=true (or set reward.remote=false)")  # fmt: skip
    _require(cfg.policy.lora_rank >= 0, f"policy.lora_rank={cfg.policy.lora_rank} must be >= 0 (0 = full "
             "fine-tuning)")  # fmt: skip
    for problem in getattr(module, "validate", lambda cfg: [])(cfg):  # the algorithm's own checks
        raise ConfigError(problem)
    _one_of("trainer.lr_schedule", t.lr_schedule, ("constant", "cosine"))
    _one_of("policy.dtype", cfg.policy.dtype, ("fp32", "bf16"))
    if cfg.policy.fused_norm_silu:
        _require(cfg.policy.compile and cfg.policy.channels_last, "policy.fused_norm_silu=true runs in the compiled "
                 "NHWC network: set policy.compile=true policy.channels_last=true too")  # fmt: skip
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        _require(resolve_device(cfg.device).type == "cuda" or interpreted, "policy.fused_norm_silu=true runs Triton "
                 f"GPU kernels, and device={cfg.device} is not a GPU: use device=cuda, or policy.fused_norm_silu=false")
    _one_of("logging.wandb", cfg.logging.wandb, ("offline", "online", "disabled"))
    _require(t.epochs >= 1 and cfg.eval.every >= 1, "trainer.epochs and eval.every must be at least 1")
    if cfg.device.startswith("cuda") and r.enabled:
        _require(r.gpus_per_learner > 0 and r.gpus_per_rollout_worker > 0, f"device={cfg.device} with Ray needs "
                 "ray.gpus_per_learner and ray.gpus_per_rollout_worker above 0 (fractions share one GPU)")
    resolve_device(cfg.device)
