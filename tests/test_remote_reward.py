"""ray.remote_reward=true: the reward scores in its own Ray actor; envs keep calling a plain Reward. A reward actor
that dies or hangs is replaced and the run goes on."""


import pytest
import torch

from rlft.config import ConfigError, compose, validate
from rlft.envs.rewards import evaluate_reward, make_reward
from tests.helpers import read_jsonl, tiny_cfg


def test_a_remote_reward_needs_ray():
    with pytest.raises(ConfigError, match="ray.remote_reward=true .* needs ray.enabled=true"):
        validate(compose(["ray.remote_reward=true", "ray.enabled=false"]))


@pytest.mark.slow
def test_the_reward_actor_scores_like_the_local_reward(tiny_model_dir):
    import ray

    from rlft.remote_reward import remote_reward, start_reward_server
    from rlft.rollout import RolloutWorker

    cfg = tiny_cfg(tiny_model_dir, "reward.target=7", "ray.remote_reward=true", "ray.reward_batch_size=3")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg, actors = start_reward_server(cfg)  # (kept: an actor without a handle is gone)
        remote = remote_reward(cfg)
        images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
        local = make_reward("digit", target=7)
        expected, _ = evaluate_reward(local, images, {})
        values, finite = evaluate_reward(remote, images, {})  # scored in chunks of 3 in the actor
        torch.testing.assert_close(values, expected)
        assert finite.all() and not remote.differentiable
        assert remote.describe(images) == pytest.approx(local.describe(images))
        # a rollout worker's env calls the actor: its reward is the remote one, with the local one's values
        worker = RolloutWorker(cfg)
        assert not worker.env.reward.differentiable
        batch = worker.collect(0, seed=0, n=8)
        torch.testing.assert_close(batch["reward"], local(batch["latents"][:, -1], **worker.env.reward_context(
            batch["context"])))  # fmt: skip
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_a_pool_of_reward_actors_serves_its_workers_and_batches_the_calls_that_arrive_together(tiny_model_dir):
    import ray

    from rlft.remote_reward import remote_reward, start_reward_server

    # a window of 1 s: the three calls sent at once below arrive within it, however busy the machine
    cfg = tiny_cfg(tiny_model_dir, "ray.remote_reward=true", "ray.reward_actors=2", "ray.reward_batch_window_s=1")
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        cfg, actors = start_reward_server(cfg)
        images = [torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(n)) * 2 - 1 for n in (3, 5, 4)]
        # three calls sent at once to one actor: scored as one batch, each caller gets its own rows' scores
        scores = ray.get([actors[0].score.remote(batch, {}) for batch in images])
        local = make_reward("digit")
        for batch, values in zip(images, scores, strict=True):
            torch.testing.assert_close(values, local(batch))
        assert ray.get(actors[0].stats.remote()) == {"calls": 3, "batches": 1}
        # rollout workers 0, 1, 2 call actors 0, 1, 0
        for worker in range(3):
            remote_reward(cfg, worker)(images[0])
        assert [ray.get(a.stats.remote())["calls"] for a in actors] == [3 + 2, 1]
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("fault, timeout_s", [("dies_once", 300), ("hangs_once", 5)])
def test_a_reward_actor_that_dies_or_hangs_is_replaced_and_the_run_finishes(fault, timeout_s, tiny_model_dir, tmp_path,
                                                                            monkeypatch):  # fmt: skip
    """The first score call kills the actor's process (dies_once) or never returns (hangs_once, past
    ray.reward_timeout_s): Ray restarts the actor, the call is retried on the new one, and the run goes on."""
    import ray

    from rlft.run import main
    from tests.helpers import TINY_OVERRIDES

    marker, log = tmp_path / "first_call", tmp_path / "calls.log"
    monkeypatch.setenv("RAY_ADDRESS", "")
    try:
        run_dir = main([
            f"env.base_model={tiny_model_dir}", *TINY_OVERRIDES, f"logging.run_dir={tmp_path / 'run'}",
            "trainer.epochs=1", "ray.num_rollout_workers=1", "ray.num_cpus=4", "ray.remote_reward=true",
            f"ray.reward_timeout_s={timeout_s}", "reward=python", f"reward.function=tests.flaky_rewards:{fault}",
            f"+reward.arguments.marker={marker}", f"+reward.arguments.log={log}",
        ])  # fmt: skip
    finally:
        ray.shutdown()
    assert marker.exists()  # the fault happened
    pids = [line.split()[0] for line in log.read_text().splitlines()]
    # the first actor's process scored nothing after its fault; one replacement scored everything else
    assert len(pids) >= 2 and pids[0] not in pids[1:] and len(set(pids[1:])) == 1, pids
    lines = read_jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in lines if "reward/mean" in m] == [1]
    assert [m["epoch"] for m in lines if "eval/reward_mean" in m] == [0, 1]
    assert all(m["reward/nonfinite"] == 0 for m in lines if "reward/mean" in m)
    assert (run_dir / "final" / "policy.safetensors").stat().st_size > 1000
