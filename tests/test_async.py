"""trainer.async_rollouts: the next epoch's collection runs while this epoch trains, so every update after the first
trains on data one policy version old, each batch ingested once; the same off Ray and through real Ray."""

import copy
import json
from pathlib import Path

import pytest
import torch

from rlft.algorithms import ddpo
from rlft.config import ConfigError, compose, validate
from rlft.learner import Learner
from rlft.rollout import RolloutWorker
from rlft.run import main
from tests.helpers import TINY_OVERRIDES, run_rlft, tiny_cfg

ASYNC = ["trainer.async_rollouts=true", "trainer.max_staleness=1", "trainer.epochs=4", "eval.every=4",
         "ray.num_rollout_workers=2"]  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_one_version_stale(run_dir: Path) -> None:
    """Epoch 1 trains on version 0's data (nothing was in flight), every later epoch e on version e - 2's: the batch
    started before epoch e - 1's update. Each uid is ingested once."""
    epochs = [m for m in lines(run_dir / "metrics.jsonl") if "policy_version" in m]
    assert [m["buffer/staleness"] for m in epochs] == [0.0, 1.0, 1.0, 1.0]
    assert all(m["buffer/evicted_stale"] == 0 and m["buffer/duplicates"] == 0 for m in epochs)
    uids = [uid for record in lines(run_dir / "replicas.jsonl") for uid in record["uids"]]
    assert len(uids) == len(set(uids)) == 8  # 2 workers x 4 epochs
    versions = [int(uid.split("-")[0][1:]) for uid in uids]
    assert versions == [0, 0, 0, 0, 1, 1, 2, 2]
    assert (run_dir / "final" / "policy.safetensors").exists()


def test_async_rollouts_train_one_version_behind_in_one_process(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = main([f"env.base_model={tiny_model_dir}", *TINY_OVERRIDES, *ASYNC, "ray.enabled=false",
                    "logging.run_dir=runs/async"])  # fmt: skip
    check_one_version_stale(run_dir)


@pytest.mark.slow
def test_async_rollouts_through_real_ray(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "async_ray"
    run_rlft(f"env.base_model={tiny_model_dir}", *TINY_OVERRIDES, *ASYNC, f"logging.run_dir={run_dir}")
    check_one_version_stale(run_dir)


def test_async_rollouts_need_a_stale_buffer_and_rollouts(tiny_model_dir):
    with pytest.raises(ConfigError, match="set trainer.max_staleness=1"):
        validate(tiny_cfg(tiny_model_dir, "trainer.async_rollouts=true"))
    with pytest.raises(ConfigError, match="algo=draft collects no rollouts"):
        validate(compose([f"env.base_model={tiny_model_dir}", "algo=draft", "trainer.async_rollouts=true",
                          "trainer.max_staleness=1"]))


def test_stale_data_is_clipped_against_the_proximal_policy_and_weighted_by_the_behaviour_ratio(tiny_model_dir):
    """A batch sampled by version 0, trained on after one update (version 1): PPO's ratio against the behaviour
    policy is clipped nearly everywhere, the decoupled ratio against the proximal (current) weights is exactly 1 on
    the first step, and the behaviour weight is p_prox / p_behaviour of each step."""
    cfg = tiny_cfg(tiny_model_dir, "algo.minibatch_size=16", "trainer.rollout_batch_size=16", "trainer.max_staleness=1")
    learner = Learner(cfg, torch.device("cpu"))
    learner.ingest([("v0", RolloutWorker(cfg).collect(0, seed=7, n=16))])
    ctx, steps = learner.ctx, ddpo.trained_steps(learner.policy.schedule, learner.algo.min_step_std)
    assert ddpo.proximal_log_probs(ctx, steps) is None  # on-policy: nothing to compute
    minibatch = next(iter(learner.buffer.minibatches()))
    ddpo.train_step(ctx, minibatch, learner.algo)  # the weights move on: version 1
    ctx.policy_version = 1
    proximal = ddpo.proximal_log_probs(ctx, steps)
    stored = learner.buffer.contents()
    with torch.no_grad():
        expected = ctx.policy.step(stored["latents"][:, 2], 2, stored["context"], prev_sample=stored["latents"][:, 3])
    torch.testing.assert_close(proximal.log_probs[:, 2], expected.log_prob)
    decoupled = ddpo.train_step(ctx, minibatch, learner.algo, proximal=proximal)
    assert decoupled["ddpo/ratio"] == 1.0 and decoupled["ddpo/clip_fraction"] == 0.0
    weights = torch.exp(proximal.log_probs[minibatch["index"]][:, steps] - minibatch["log_prob"][:, steps])
    expected_weight = weights.clamp(max=ddpo.BEHAVIOUR_WEIGHT_CAP).mean().item()
    assert decoupled["ddpo/behaviour_weight"] == pytest.approx(expected_weight, rel=1e-5)
    plain = ddpo.train_step(ctx, minibatch, learner.algo)  # PPO against the behaviour policy, two updates stale
    assert plain["ddpo/clip_fraction"] > 0.5


def test_the_first_minibatch_takes_its_proximal_log_probs_from_its_own_forward(tiny_model_dir):
    """The update's first minibatch trains before the weights move, so its forward is the proximal policy's: taking
    those log-probabilities from it (not from the no-grad pass) gives the same values, the same update and the same
    weights, with that minibatch's share of the pass saved."""
    cfg = tiny_cfg(tiny_model_dir, "algo.minibatch_size=8", "trainer.rollout_batch_size=16", "trainer.max_staleness=1")
    learner = Learner(cfg, torch.device("cpu"))
    learner.ingest([("v0", RolloutWorker(cfg).collect(0, seed=7, n=16))])
    ctx, steps = learner.ctx, ddpo.trained_steps(learner.policy.schedule, learner.algo.min_step_std)
    ddpo.train_step(ctx, next(iter(learner.buffer.minibatches())), learner.algo)  # the weights move on: version 1
    ctx.policy_version = 1
    first = next(iter(learner.buffer.minibatches()))
    every_row = ddpo.proximal_log_probs(ctx, steps)
    shortcut = ddpo.proximal_log_probs(ctx, steps, first)
    assert every_row.pending is None and int(shortcut.pending.sum()) == 8
    assert not torch.equal(shortcut.log_probs[first["index"]][:, steps], every_row.log_probs[first["index"]][:, steps])
    start = ({k: v.clone() for k, v in ctx.policy.state_dict().items()}, ctx.generator.get_state())
    optimizer_start = copy.deepcopy(ctx.optimizer.state_dict())  # (its tensors are updated in place)
    results = []
    for proximal in (every_row, shortcut):
        ctx.policy.load_state_dict(start[0])
        ctx.generator.set_state(start[1])
        ctx.optimizer.load_state_dict(copy.deepcopy(optimizer_start))
        metrics = ddpo.train_step(ctx, first, learner.algo, steps, proximal=proximal)
        results.append((metrics, {k: v.clone() for k, v in ctx.policy.state_dict().items()}))
    torch.testing.assert_close(shortcut.log_probs, every_row.log_probs, atol=1e-5, rtol=1e-5)
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-4, abs=1e-6)
    for name, value in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], value, atol=1e-6, rtol=1e-5)
