"""Config errors are caught before Ray starts and name the key, the values and the fix; every key is typed, ranged
and documented in one place (the dataclasses), and a property-based test throws wrong values at all of them."""

import dataclasses
import os
import subprocess
import sys
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlft.algorithms.ddpo
from rlft.config import ConfigError, commented_config, compose, group_classes, help_text, run_schema, validate
from rlft.core.spec import documented_fields, optional_inner
from rlft.pretrain import PretrainSpec
from rlft.run import main
from tests.conftest import save_tiny_ddpm


def check(*overrides):
    validate(compose(list(overrides)))


def test_default_config_is_valid_and_typed():
    spec = compose([])
    validate(spec)
    assert type(spec).__name__ == "RunSpec" and type(spec.algo) is rlft.algorithms.ddpo.Config
    assert (spec.env.name, spec.env.kind, spec.reward.name, spec.device) == ("digits", "ddpm", "digit", "auto")
    assert spec.trainer.epochs == spec.algo.epochs  # the algorithm's run length, unless the command line sets one


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
        check("policy.fused_norm_silu=true", "policy.compile=true", "policy.channels_last=true", "device=cpu")


def test_an_algorithm_that_backpropagates_through_the_reward_refuses_jpeg(monkeypatch):
    monkeypatch.setattr(rlft.algorithms.ddpo, "REQUIRES_DIFFERENTIABLE_REWARD", True)
    with pytest.raises(ConfigError, match="reward=jpeg_compressibility is not differentiable"):
        check("reward=jpeg_compressibility")


def test_out_of_range_and_wrong_typed_values_name_the_key_and_what_it_takes():
    with pytest.raises(ConfigError, match=r"reward.target=12 is out of range: reward.target takes an integer >= 0 "
                                          r"and <= 9 \(the digit class"):  # fmt: skip
        check("reward.target=12")
    with pytest.raises(ConfigError, match="trainer.epochs=abc is not valid: trainer.epochs takes an integer >= 1"):
        check("trainer.epochs=abc")
    with pytest.raises(ConfigError, match="policy.dtype=fp16 is out of range: policy.dtype takes one of fp32, bf16"):
        check("policy.dtype=fp16")
    with pytest.raises(ConfigError, match="cannot parse the override 'trainer.epochs=\\[1,2'"):
        check("trainer.epochs=[1,2")
    with pytest.raises(ConfigError, match="device=gpu is not one of cpu, cuda, cuda:<index> or auto"):
        check("device=gpu")


def test_each_env_names_its_own_reward_and_a_reward_that_cannot_score_an_env_is_refused(tmp_path):
    assert compose(["env=celebahq"]).reward.name == "over50"  # ddpo-celebahq's task, not the digit classifier
    assert compose(["env=church"]).reward.name == "aesthetic"
    assert compose(["env=sd15"]).reward.name == "pickscore"
    assert compose(["env=digits_sr"]).reward.name == "measurement"
    assert compose(["env=celebahq", "reward=jpeg_compressibility"]).reward.name == "jpeg_compressibility"
    rgb = save_tiny_ddpm(tmp_path / "rgb", channels=3)
    with pytest.raises(ConfigError, match=r"reward=digit cannot score env=ddpm: it scores 1-channel images and this "
                                          r"env makes 3-channel ones.*rewards that fit: .*jpeg_compressibility"):
        check("env=ddpm", f"env.base_model={rgb}", "reward=digit")
    with pytest.raises(ConfigError, match="reward=measurement cannot score env=digits: it needs the env's measurement"):
        check("reward=measurement")
    with pytest.raises(ConfigError, match="reward=pickscore cannot score env=digits: .*needs the env's prompts"):
        check("reward=pickscore")


def test_an_env_sets_its_own_algorithm_defaults_and_the_command_line_wins():
    """digits + draft: the measured remedy against hacking the digit classifier (rlft.envs.tasks.ALGO_DEFAULTS);
    any other env, algorithm or base model keeps the algorithm's Config defaults."""
    import rlft.algorithms.draft

    plain = rlft.algorithms.draft.Config()
    assert (plain.aux_loss_weight, plain.kl_weight, plain.epochs) == (0.0, 0.0, 60)  # one source of defaults
    for overrides in (["algo=draft"], ["algo=draft", "env=digits"]):  # env=digits is the default env
        spec = compose(overrides)
        validate(spec)
        assert (spec.algo.aux_loss_weight, spec.algo.kl_weight, spec.algo.epochs, spec.trainer.epochs) == (
            0.3, 0.03, 50, 50)  # fmt: skip
        assert dataclasses.replace(spec.algo, aux_loss_weight=0.0, kl_weight=0.0, epochs=60) == plain
    assert compose(["algo=draft", "algo.aux_loss_weight=0"]).algo.aux_loss_weight == 0.0
    assert compose(["algo=draft", "algo.kl_weight=0"]).algo.kl_weight == 0.0
    spec = compose(["algo=draft", "algo.epochs=7"])
    assert (spec.algo.epochs, spec.trainer.epochs, spec.algo.kl_weight) == (7, 7, 0.03)  # the others still apply
    spec = compose(["algo=draft", "trainer.epochs=3"])
    assert (spec.trainer.epochs, spec.algo.epochs, spec.algo.aux_loss_weight) == (3, 50, 0.3)
    assert compose(["algo=draft", "env=celebahq"]).algo == plain  # RGB 256 px: the digits aux data would not fit
    assert compose(["algo=draft", "env.base_model=/some/other/ddpm"]).algo == plain  # measured on the shipped model
    assert compose(["algo=ddpo"]).algo == rlft.algorithms.ddpo.Config()
    assert "env=digits with algo=draft defaults to algo.aux_loss_weight=0.3 algo.kl_weight=0.03 algo.epochs=50" in (
        help_text("python -m rlft.run", "[...]"))  # fmt: skip


def test_the_named_command_stops_in_seconds_offline_with_the_model_id_and_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty_cache"), "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-m", "rlft.run", "algo=ddpo", "env=celebahq"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlft: cannot load the base DDPM 'google/ddpm-celebahq-256'")
    assert "env.base_model=/path/to/folder" in lines[0] and not (tmp_path / "runs").exists()


def test_help_lists_the_groups_their_choices_and_the_keys():
    text = help_text("python -m rlft.run", "[...]")
    assert "algo: ddpo, adjoint_matching, deft, draft" in text
    assert "env: digits, " in text and "sd15" in text and "reward: digit, " in text and "over50" in text
    assert "trainer.epochs=${algo.epochs}  # rounds of" in text and "--cfg job" in text
    printed = "\n".join(commented_config(compose(["algo=draft"])))
    assert "k: null  # backpropagate through the last k sampling steps" in printed and "name: draft" in printed


# ---- every key: a comment, a type, a range; and wrong values for every one of them ----
def all_config_classes() -> list[tuple[list[str], type]]:
    """(group overrides that select it, the config dataclass) for the run, pretraining and every group option."""
    classes = [([], run_schema())]
    classes += [([f"algo={name}"], cls) for name, cls in group_classes("algo").items()]
    classes += [([f"env={name}"], type(preset)) for name, preset in group_classes("env").items()]
    classes += [([f"reward={name}"], cls) for name, cls in group_classes("reward").items()]
    return classes


def test_every_key_has_a_one_line_comment_a_type_and_numbers_a_range():
    for _, cls in [*all_config_classes(), ([], PretrainSpec)]:
        for key, field, annotation in documented_fields(cls):
            doc = field.metadata["doc"]
            assert doc and "\n" not in doc, f"{cls.__name__}.{key} has no one-line comment"
            inner, _ = optional_inner(annotation)
            assert inner in (int, float, bool, str) or typing.get_origin(inner) in (list, dict), f"{key}: {inner}"
            if inner in (int, float):
                limits = [field.metadata.get(k) for k in ("ge", "gt", "le", "lt", "choices")]
                assert any(limit is not None for limit in limits), f"{cls.__name__}.{key} has no range"


def bad_values(field: dataclasses.Field, annotation) -> list[str]:
    """Override values that a key must refuse: of the wrong type, or outside its declared limits."""
    inner, _ = optional_inner(annotation)
    meta = field.metadata
    values = []
    if inner is int:
        values += ["abc", "1.5", "[1,2]"]
    elif inner is float:
        values += ["abc", "'1e'", "[1,2]"]
    elif inner is bool:
        values += ["maybe", "2"]
    elif inner is str or typing.get_origin(inner) is list:
        values += ["[1,2]"] if inner is str else ["abc"]
    if meta.get("choices"):
        values.append("not_a_choice_x")
    for key, offset in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
        if meta.get(key) is not None and inner in (int, float):
            bound = meta[key] + (offset if key in ("ge", "le") else 0)
            values.append(str(bound if inner is float or isinstance(bound, int) else int(bound) - 1))
    return values


def bad_overrides() -> list[tuple[list[str], str, str]]:
    """(group overrides, the key, a bad override) for every documented key of every config."""
    draws = []
    for groups, cls in all_config_classes():
        prefix = groups[0].split("=")[0] + "." if groups else ""
        for key, field, annotation in documented_fields(cls):
            if key in ("name", "kind") or (not prefix and key == "device"):  # group names are the group choice
                continue
            for value in bad_values(field, annotation):
                draws.append((groups, prefix + key, f"{prefix}{key}={value}"))
    return draws


BAD_OVERRIDES = bad_overrides()


def test_the_bad_values_cover_every_key():
    keys = {key for _, key, _ in BAD_OVERRIDES}
    assert len(keys) > 120 and {"trainer.epochs", "algo.clip_range", "env.eta", "reward.target", "ray.num_cpus"} <= keys


@settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(BAD_OVERRIDES))
def test_a_wrong_value_for_any_key_stops_with_one_line_naming_the_key_and_no_run_folder(tmp_path_factory, draw):
    groups, key, override = draw
    folder = tmp_path_factory.getbasetemp() / "never_made"
    # a value that slipped through would start a run: make it a short one in this process, so the test fails fast
    safe = ["ray.enabled=false", "trainer.epochs=1", "logging.wandb=disabled", f"logging.run_dir={folder}"]
    with pytest.raises(SystemExit) as stopped:
        main([*groups, *safe, override])  # the drawn override comes last, so it wins over the safe values
    message = str(stopped.value.code)
    assert message.startswith("rlft: ") and "\n" not in message, message
    assert key in message, message
    assert any(word in message for word in ("takes", "one of", "cannot parse", "does not match")), message
    assert not folder.exists()


def test_a_dict_key_takes_new_entries_as_the_readme_writes_them():
    spec = compose(["reward=python", "reward.function=tests.matrix_rewards:brightness", "reward.arguments.scale=2"])
    assert spec.reward.arguments == {"scale": 2}
    with pytest.raises(ConfigError, match="unknown config key 'reward.argumentz.scale'"):
        compose(["reward.argumentz.scale=2"])
