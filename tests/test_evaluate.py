"""rlft.evaluate on a tiny digits run folder: same noise before / after, histograms, grids and diversity."""

import itertools
import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rlft.config import load_spec
from rlft.evaluate import main, mean_pairwise_distance
from rlft.rollout import RolloutWorker
from rlft.run import main as run

TINY_RUN = ["env.num_inference_steps=3", "trainer.rollout_batch_size=8", "trainer.samples_per_epoch=8",
            "algo.minibatch_size=8", "eval.num_samples=8", "trainer.epochs=1", "ray.enabled=false",
            "ray.rollout_threads=1", "ray.learner_threads=1", "logging.wandb=disabled", "logging.progress=false",
            "algo.lr=3e-3", "ray.num_rollout_workers=1"]  # fmt: skip


def run_config(run_dir):
    """The spec the run saved (its config.yaml)."""
    return load_spec(yaml.safe_load((run_dir / "config.yaml").read_text()))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One DDPO epoch on the shipped digits DDPM (the default task), as `python -m rlft.run` leaves it."""
    return run([*TINY_RUN, f"logging.run_dir={tmp_path_factory.mktemp('runs') / 'digits'}"])


def test_mean_pairwise_distance_against_brute_force():
    x = torch.randn(7, 2, 3, generator=torch.Generator().manual_seed(0))
    pairs = [(x[i] - x[j]).norm() for i, j in itertools.combinations(range(7), 2)]
    torch.testing.assert_close(mean_pairwise_distance(x), torch.stack(pairs).mean())
    assert mean_pairwise_distance(x[:1].expand(5, -1, -1)) == 0  # a collapsed set has no diversity
    assert mean_pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)


def test_a_run_is_evaluated_before_and_after_from_the_same_noise(run_dir, tmp_path):
    out = main([str(run_dir), "--num-samples=16", "--seed=5"])
    assert out == run_dir / "evaluation"
    for name in ("reward_histogram.png", "samples_base.png", "samples_finetuned.png", "diversity.png"):
        assert (out / name).stat().st_size > 1000, name
    summary = json.loads((out / "metrics.json").read_text())
    # oracle: the base and the fine-tuned model sampled afresh from seed 5, with the run's config
    worker = RolloutWorker(run_config(run_dir))
    base = worker.evaluate(0, 5, 16)
    worker.set_weights(load_file(str(run_dir / "final" / "policy.safetensors")), 1)
    tuned = worker.evaluate(1, 5, 16)
    assert summary["base"]["reward/mean"] == pytest.approx(base["reward"].mean().item(), abs=1e-5)
    assert summary["fine-tuned"]["reward/mean"] == pytest.approx(tuned["reward"].mean().item(), abs=1e-5)
    assert summary["base"]["diversity/pixel"] == pytest.approx(mean_pairwise_distance(base["images"]).item(), 1e-5)
    features = worker.env.reward.features(tuned["images"])
    assert summary["fine-tuned"]["diversity/feature"] == pytest.approx(mean_pairwise_distance(features).item(), 1e-4)
    assert {"eval/target_fraction", "reward/median", "reward/q90"} <= set(summary["base"])
    assert summary["change"]["reward/mean"] == pytest.approx(
        summary["fine-tuned"]["reward/mean"] - summary["base"]["reward/mean"])
    assert summary["base"] != summary["fine-tuned"]  # one epoch at this learning rate moves the samples


def test_a_checkpoint_equal_to_the_base_changes_nothing(run_dir, tmp_path):
    copy = shutil.copytree(run_dir, tmp_path / "unchanged", ignore=shutil.ignore_patterns("evaluation"))
    weights = load_file(str(copy / "final" / "policy.safetensors"))
    base = RolloutWorker(run_config(run_dir)).policy
    save_file({k: base.state_dict()[k].contiguous() for k in weights}, str(copy / "final" / "policy.safetensors"))
    summary = json.loads((main([str(copy), "--num-samples=8"]) / "metrics.json").read_text())
    assert summary["base"] == summary["fine-tuned"]
    assert summary["change"]["diversity/pixel_ratio"] == pytest.approx(1.0)


def test_a_base_model_alone_and_bad_targets(run_dir, tmp_path):
    out = main(["base", "--num-samples=8", f"--out={tmp_path / 'base'}", *TINY_RUN[:4]])
    summary = json.loads((out / "metrics.json").read_text())
    assert "fine-tuned" not in summary and summary["base"]["diversity/feature"] > 0
    assert not (out / "samples_finetuned.png").exists()
    # a run folder whose run has not finished: its config (a whole spec, as rlft.run writes it), no final weights
    (tmp_path / "unfinished").mkdir()
    shutil.copy(run_dir / "config.yaml", tmp_path / "unfinished" / "config.yaml")
    with pytest.raises(SystemExit, match="final/policy.safetensors is missing: the run did not finish"):
        main([str(tmp_path / "unfinished")])
    (tmp_path / "unfinished" / "config.yaml").write_text("seed: 0\n")  # not a config rlft.run wrote: one line
    with pytest.raises(SystemExit, match="^rlft.evaluate: the saved config has no algo group .* not a config.yaml"):
        main([str(tmp_path / "unfinished")])


def test_superiority_is_the_mann_whitney_statistic_and_the_gap_compares_reward_and_judge():
    from scipy.stats import mannwhitneyu

    from rlft.evaluate import evaluation_baseline, hacking_metrics, superiority

    generator = torch.Generator().manual_seed(0)
    base, later = torch.randn(200, generator=generator), torch.randn(150, generator=generator) + 0.7
    later[:10] = base[:10]  # ties count half
    expected = mannwhitneyu(later.numpy(), base.numpy()).statistic / (150 * 200)
    assert superiority(later, sorted(base.tolist())) == pytest.approx(expected)
    assert superiority(base, sorted(base.tolist())) == pytest.approx(0.5)
    # a reward that rises while its judge does not: the gap is the difference of the two superiorities
    metrics = {"eval/diversity/pixel": 2.0}
    baseline = evaluation_baseline({"metrics": {"eval/diversity/pixel": 4.0}, "reward": base, "judge": base})
    result = {"metrics": metrics, "reward": base + 10, "judge": base.clone()}
    found = hacking_metrics(baseline, {**result, "reward": torch.cat([base[:5] + 10, torch.tensor([float("nan")])])})
    assert found["eval/reward_superiority"] == 1.0  # the NaN is left out
    found = hacking_metrics(baseline, result)
    assert found["eval/judge/superiority"] == pytest.approx(0.5) and found["eval/hacking_gap"] == pytest.approx(0.5)
    assert found["eval/diversity/pixel_ratio"] == 0.5
