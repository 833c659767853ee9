"""reward=http and its service (python -m rlft.reward_service): scores over the wire equal the reward's own on the
same uint8 images, non-finite scores arrive as non-finite, failures give one line, and a run through Ray scores
every rollout and evaluation with a service outside it."""

import json
import threading
from pathlib import Path

import pytest
import torch

from rlft.envs.digits import IMAGE_SIZE
from rlft.envs.rewards import HttpReward, RewardError, decode_images, encode_images, evaluate_reward, make_reward
from rlft.reward_service import make_server
from rlft.run import main
from tests.helpers import TINY_OVERRIDES


class Counted:
    """A reward that counts the images it scored (the service's side of a run)."""

    def __init__(self, reward):
        self.reward, self.images, self.name, self.differentiable = reward, 0, reward.name, False

    def __call__(self, images, **context):
        self.images += len(images)
        return self.reward(images, **context)


@pytest.fixture
def serve():
    servers = []

    def start(reward) -> str:
        server = make_server(reward, "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/score"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_scores_over_http_equal_the_rewards_own_on_the_same_uint8_images(serve):
    digit = make_reward("digit")
    url = serve(digit)
    images = torch.rand(7, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    remote = HttpReward(url=url, batch_size=3).build()  # three requests: 3 + 3 + 1 images
    sent = decode_images(encode_images(images))  # what the wire carries: uint8
    assert (sent - images).abs().max() <= 1 / 127.5 and (sent - images).abs().max() > 0
    torch.testing.assert_close(remote(images), digit(sent), atol=1e-5, rtol=0)


def test_a_non_finite_score_arrives_as_non_finite_and_is_kept_out(serve):
    half_nan = make_reward("python", function="tests.python_rewards:half_nan")
    remote = HttpReward(url=serve(half_nan)).build()
    images = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    values, finite = evaluate_reward(remote, images, {})
    _, expected = evaluate_reward(half_nan, decode_images(encode_images(images)), {})
    assert finite.tolist() == expected.tolist() and 0 < int(finite.sum()) < 16


def test_failures_name_the_url_and_the_fix(serve, tmp_path):
    dead = HttpReward(url="http://127.0.0.1:9/score", retries=1, timeout_s=2).build()
    with pytest.raises(RewardError, match=r"no answer from http://127.0.0.1:9/score .* after 2 tries; start the "
                                          r"reward service"):  # fmt: skip
        dead(torch.zeros(2, 1, 8, 8))
    wrong = HttpReward(url=serve(make_reward("digit")).replace("/score", "/other"), retries=0).build()
    with pytest.raises(RewardError, match="answered 404"):
        wrong(torch.zeros(2, 1, 8, 8))
    failing = HttpReward(url=serve(make_reward("digit")), retries=0).build()  # the classifier fails on 5 px images
    with pytest.raises(RewardError, match=r"answered 500: .*RuntimeError"):
        failing(torch.zeros(2, 1, 5, 5))
    with pytest.raises(SystemExit, match=r"^rlft: reward=http needs reward.url=http\(s\)://host:port/path, not ''"):
        main(["reward=http", f"logging.run_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_run_through_ray_scores_every_rollout_and_evaluation_with_the_service(serve, tiny_model_dir, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    scorer = Counted(make_reward("python", function="tests.python_rewards:smooth"))
    monkeypatch.chdir(tmp_path)
    run_dir = main([f"env.base_model={tiny_model_dir}", *TINY_OVERRIDES, "reward=http", f"reward.url={serve(scorer)}",
                    "trainer.epochs=2", "eval.every=2", "ray.num_rollout_workers=2",
                    "logging.run_dir=runs/http_reward"])  # fmt: skip
    assert run_dir == Path("runs/http_reward").resolve()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [m for m in lines if "policy_version" in m]
    assert [m["epoch"] for m in epochs] == [1, 2] and all(m["reward/nonfinite"] == 0 for m in epochs)
    # 2 epochs of 16 rollouts, and 2 evaluations of 8 samples (before the first epoch and after the last)
    assert scorer.images == 2 * 16 + 2 * 8
