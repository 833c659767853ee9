"""Config errors are caught before Ray starts and name the key, the values and the fix."""

import pytest
import rlft.algorithms.ddpo
from omegaconf import OmegaConf

from rlft.config import CONFIG_DIR, ConfigError, compose, validate


def check(*overrides):
    validate(compose("config", list(overrides)))


def test_default_config_is_valid():
    check()


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match="unknown config key 'trainer.epoch'; did you mean 'trainer.epochs'"):
        check("trainer.epoch=3")
    with pytest.raises(ConfigError, match="did you mean 'algo.clip_range'"):
        check("algo.clip_rang=0.1")


def test_unknown_group_option_lists_the_choices():
    with pytest.raises(ConfigError, match=r"algo=ddpoo .*did you mean 'ddpo'"):
        check("algo=ddpoo")
    with pytest.raises(ConfigError, match="reward=jpeg .*choices: .*jpeg_compressibility"):
        check("reward=jpeg")


def test_batch_sizes_that_do_not_divide_name_the_numbers():
    with pytest.raises(ConfigError, match="samples_per_epoch=100 .*rollout_batch_size=32"):
        check("trainer.samples_per_epoch=100")
    with pytest.raises(ConfigError, match="num_rollout_workers=3 must be a multiple of ray.num_learners=2"):
        check("ray.num_rollout_workers=3", "ray.num_learners=2")
    with pytest.raises(ConfigError, match="minibatch_size=512"):
        check("algo.minibatch_size=512")


def test_ddpo_needs_a_stochastic_sampler():
    with pytest.raises(ConfigError, match="env.eta=0.0"):
        check("env.eta=0.0")


def test_fused_norm_silu_needs_the_compiled_nhwc_network_on_a_gpu(monkeypatch):
    with pytest.raises(ConfigError, match="set policy.compile=true policy.channels_last=true too"):
        check("policy.fused_norm_silu=true", "policy.compile=true")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' CPU stand-in for a GPU (tests/conftest.py)
    with pytest.raises(ConfigError, match="device=cpu is not a GPU: use device=cuda, or policy.fused_norm_silu=false"):
        check("policy.fused_norm_silu=true", "policy.compile=true", "policy.channels_last=true")


def test_an_algorithm_that_backpropagates_through_the_reward_refuses_jpeg(monkeypatch):
    monkeypatch.setattr(rlft.algorithms.ddpo, "REQUIRES_DIFFERENTIABLE_REWARD", True)
    with pytest.raises(ConfigError, match="reward=jpeg_compressibility is not differentiable"):
        check("reward=jpeg_compressibility")


def test_bad_reward_argument_is_reported():
    with pytest.raises(ValueError, match="reward.target must be a digit class 0..9, got 12"):
        check("reward.target=12")


def test_every_config_key_has_a_comment():
    for path in CONFIG_DIR.rglob("*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            body = line.split("#", 1)[0]
            is_key = ":" in body and not line.lstrip().startswith(("-", "#")) and body.strip() != "defaults:"
            is_section = body.rstrip().endswith(":")
            if is_key and not is_section:
                assert "#" in line, f"{path.name}:{number} has no comment: {line.strip()}"


@pytest.mark.parametrize("name", ["ddpo", "draft", "adjoint_matching", "deft"])
def test_algorithm_yaml_defaults_equal_the_config_dataclass(name):
    import dataclasses

    cfg = compose("config", [f"algo={name}"])
    fields = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
              for f in dataclasses.fields(rlft.algorithms.load_algorithm(name).Config)}  # fmt: skip
    algo = OmegaConf.to_container(cfg.algo)
    assert {k: v for k, v in algo.items() if k not in rlft.algorithms.RUN_KEYS} == fields
    assert cfg.trainer.epochs == cfg.algo.epochs  # the algorithm's run length, unless the command line sets one
