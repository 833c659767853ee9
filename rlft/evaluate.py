"""`python -m rlft.evaluate TARGET [--checkpoint C] [--num-samples N] [--seed S] [--out DIR] [key=value ...]`.

TARGET is a run folder (its config.yaml and final/policy.safetensors, or with --checkpoint any of its checkpoints)
or a base model (`base` for the config's own env.base_model, or a folder / Hub id). From one fixed seed, the base
model and the fine-tuned one sample
from the same initial noise and the same step noise, so each fine-tuned sample has a base twin. Written to
<run>/evaluation/ (or --out):

    metrics.json             rewards (mean, std, quantiles), the reward's own metrics and diversity, per model
    reward_histogram.png     reward distributions before and after
    samples_base.png         sample grid of the base model
    samples_finetuned.png    the same grid after fine-tuning (same noise, same positions)
    diversity.png            mean pairwise distance between samples (reward-model features and pixels) and
                             the distribution of pairwise distances: a fall after fine-tuning is mode collapse

Extra key=value arguments override the run's config (e.g. device=cuda, env.num_inference_steps=50).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from rlft.config import ConfigError, compose, load_spec


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance over all pairs i < j of the rows of x ([N, ...] -> scalar); 0 for identical rows,
    nan for fewer than two rows."""
    if len(x) < 2:
        return torch.tensor(float("nan"))
    return torch.pdist(x.flatten(1).double()).mean().float()


def diversity(images: torch.Tensor, features: torch.Tensor | None) -> dict[str, float]:
    metrics = {"diversity/pixel": mean_pairwise_distance(images).item()}
    if features is not None:
        metrics["diversity/feature"] = mean_pairwise_distance(features).item()
    return metrics


def diversity_metrics(images: torch.Tensor, prompts: list[str] | None = None) -> dict[str, float]:
    """Diversity of final samples in pixels (a space no reward defines): the mean pairwise distance of all of them,
    and, for text-to-image envs, of the samples of each prompt, averaged over prompts (a collapse to one image per
    prompt shows there even when prompts differ)."""
    metrics = {"eval/diversity/pixel": mean_pairwise_distance(images).item()}
    if prompts:
        groups = [images[[i for i, p in enumerate(prompts) if p == prompt]] for prompt in dict.fromkeys(prompts)]
        within = [mean_pairwise_distance(group).item() for group in groups if len(group) > 1]
        metrics["eval/diversity/within_prompt_pixel"] = sum(within) / len(within) if within else float("nan")
    return metrics


def score_metrics(prefix: str, values: torch.Tensor, finite: torch.Tensor) -> dict[str, float]:
    """{prefix}_mean and {prefix}_std of the finite values (nan when there are none)."""
    kept = values.double()[finite]
    nan = float("nan")
    return {f"{prefix}_mean": kept.mean().item() if len(kept) else nan,
            f"{prefix}_std": kept.std(unbiased=False).item() if len(kept) > 1 else nan}  # fmt: skip


def finite_sorted(values: torch.Tensor) -> list[float]:
    return sorted(values.double()[torch.isfinite(values)].tolist())


def evaluation_baseline(result: dict) -> dict:
    """What later evaluations are compared with, from the base model's (the run's first): its metrics, and its
    samples' training-reward and judge scores."""
    baseline = {"metrics": dict(result["metrics"]), "reward": finite_sorted(result["reward"])}
    if "judge" in result:
        baseline["judge"] = finite_sorted(result["judge"])
    return baseline


def superiority(values: torch.Tensor, base: list[float]) -> float:
    """P(a sample outscores a base-model sample), ties counting half (the Mann-Whitney statistic over the two sets):
    0.5 for the base model itself, 1 when every sample beats every base sample."""
    kept = values.double()[torch.isfinite(values)]
    if not len(kept) or not base:
        return float("nan")
    reference = torch.tensor(base, dtype=torch.float64)
    below = torch.searchsorted(reference, kept, side="left").double()
    not_above = torch.searchsorted(reference, kept, side="right").double()
    return ((below + not_above) / 2).mean().item() / len(reference)


def hacking_metrics(baseline: dict, result: dict) -> dict[str, float]:
    """Reward hacking, measured against the base model's evaluation: the probability that a sample outscores a base
    sample, under the training reward and under the independent judge, and their difference, eval/hacking_gap. A real
    improvement lifts both; a hacked reward only its own (a gap near 0: the judge agrees; towards 0.5: only the
    reward sees progress). Rank-based, so it means the same for any reward and judge, saturated ones included. Also
    the samples' diversity relative to the base model's (a fall is mode collapse)."""
    out = {"eval/reward_superiority": superiority(result["reward"], baseline["reward"])}
    if "judge" in result and "judge" in baseline:
        out["eval/judge/superiority"] = superiority(result["judge"], baseline["judge"])
        out["eval/hacking_gap"] = out["eval/reward_superiority"] - out["eval/judge/superiority"]
    base = baseline["metrics"]
    for key in ("eval/diversity/pixel", "eval/diversity/within_prompt_pixel", "eval/judge/target_diversity"):
        if key in result["metrics"] and base.get(key):
            out[f"{key}_ratio"] = result["metrics"][key] / base[key]
    return out


def reward_summary(rewards: torch.Tensor) -> dict[str, float]:
    r = rewards[torch.isfinite(rewards)].double()
    q = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"reward/mean": r.mean().item(), "reward/std": r.std(unbiased=False).item(), "reward/q10": q[0],
            "reward/median": q[1], "reward/q90": q[2], "reward/nonfinite": float((~torch.isfinite(rewards)).sum())}


def load_target(target: str, overrides: list[str], checkpoint: str | None = None) -> tuple:
    """(spec, fine-tuned weights or None, a name) for a run folder (its final weights, or one of its checkpoints:
    a folder name such as epoch_000020, or "latest") or a base model."""
    folder = Path(target).expanduser()
    if (folder / "config.yaml").is_file():
        spec = load_spec(yaml.safe_load((folder / "config.yaml").read_text()), overrides)
        if checkpoint:
            from rlft.checkpoint import Checkpoint, CheckpointError, committed

            found = committed(folder / "checkpoints")
            chosen = found[-1:] if checkpoint == "latest" else [p for p in found if p.name == checkpoint]
            if not chosen:
                names = ", ".join(p.name for p in found) or "none"
                raise FileNotFoundError(f"--checkpoint {checkpoint}: not a committed checkpoint of {folder} "
                                        f"(checkpoints: {names}; or latest)")  # fmt: skip
            try:
                Checkpoint.open(chosen[0])  # verified (sizes, hashes, safetensors) before its weights are used
            except CheckpointError as error:
                raise FileNotFoundError(str(error)) from None
            return spec, chosen[0] / "policy.safetensors", f"{folder.name}-{chosen[0].name}"
        weights = folder / "final" / "policy.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: the run did not finish (evaluate one of its checkpoints "
                                    "with --checkpoint latest, or the base model with `python -m rlft.evaluate "
                                    "base`)")  # fmt: skip
        return spec, weights, folder.name
    base = [] if target == "base" else [f"env.base_model={target}"]
    spec = compose([*base, *overrides])
    return spec, None, f"{spec.env.name}-base"


def sample(worker, seed: int, n: int, policy_version: int) -> dict:
    """The worker's evaluation (fixed noise from `seed`) plus the reward model's features of the samples."""
    result = worker.evaluate(policy_version, seed, n)
    reward = worker.env.reward
    features = None
    if reward.features is not None:
        features = torch.cat([reward.features(x.to(worker.device)).cpu() for x in result["samples"].split(32)])
    return {**result, "features": features}


def plot_histograms(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    values = torch.cat([r["reward"][torch.isfinite(r["reward"])] for r in results.values()])
    bins = torch.linspace(values.min().item(), values.max().item() + 1e-6, 30).numpy()
    for (label, result), color in zip(results.items(), ("tab:blue", "tab:orange"), strict=False):
        rewards = result["reward"][torch.isfinite(result["reward"])].numpy()
        ax.hist(rewards, bins=bins, alpha=0.55, color=color, label=f"{label} (mean {rewards.mean():.3f})")
        ax.axvline(rewards.mean(), color=color, linestyle="--")
    ax.set(xlabel="reward", ylabel="samples", title="reward before / after fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_diversity(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = ["pixel"] + (["feature"] if next(iter(results.values()))["features"] is not None else [])
    fig, axes = plt.subplots(1, 1 + len(spaces), figsize=(4.5 * (1 + len(spaces)), 3.8), squeeze=False)
    labels = list(results)
    for i, space in enumerate(spaces):
        means = [r["metrics"][f"diversity/{space}"] for r in results.values()]
        axes[0, 0].bar([x + 0.4 * i for x in range(len(labels))], means, width=0.4, label=space)
        ax = axes[0, 1 + i]
        for label, result in results.items():
            data = result["samples"] if space == "pixel" else result["features"]
            ax.hist(torch.pdist(data.flatten(1).double()).numpy(), bins=30, alpha=0.55, label=label)
        ax.set(title=f"pairwise {space} distances", xlabel="distance", ylabel="pairs")
        ax.legend()
    axes[0, 0].set_xticks([x + 0.2 * (len(spaces) - 1) for x in range(len(labels))], labels)
    axes[0, 0].set(title="mean pairwise distance\n(a fall = mode collapse)")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(target: str, overrides: list[str], num_samples: int | None = None, seed: int | None = None,
             out: str | None = None, checkpoint: str | None = None) -> Path:  # fmt: skip
    from safetensors.torch import load_file

    from rlft.recorder import image_grid
    from rlft.rollout import RolloutWorker

    spec, weights, name = load_target(target, overrides, checkpoint)
    # the evaluation scores in this process, without Ray
    spec = dataclasses.replace(spec, ray=dataclasses.replace(spec.ray, remote_reward=False, enabled=False))
    n = num_samples or spec.eval.num_samples
    seed = spec.eval.seed if seed is None else seed
    batch = spec.trainer.rollout_batch_size
    if n % batch:
        raise ValueError(f"--num-samples={n} must be a multiple of trainer.rollout_batch_size={batch}")
    default_out = Path(target) / ("evaluation" if not checkpoint else f"evaluation-{name}")
    out_dir = Path(out) if out else (default_out if weights else Path("evaluations") / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    worker = RolloutWorker(spec)
    results = {"base": sample(worker, seed, n, 0)}
    if weights is not None:
        worker.set_weights(load_file(str(weights)), 1)
        results["fine-tuned"] = sample(worker, seed, n, 1)
    summary = {"target": str(target), "weights": str(weights) if weights else None, "num_samples": n, "seed": seed,
               "reward": spec.reward.name, "env": spec.env.name}  # fmt: skip
    for label, result in results.items():
        result["metrics"] = {**result["metrics"], **reward_summary(result["reward"]),
                             **diversity(result["samples"], result["features"])}  # fmt: skip
        summary[label] = result["metrics"]
        file = "samples_base.png" if label == "base" else "samples_finetuned.png"
        image_grid(result["images"][:64]).save(out_dir / file)
    if weights is not None:
        before, after = summary["base"], summary["fine-tuned"]
        summary["change"] = {k: after[k] - before[k] for k in before if k in after}
        # the judge's view: the reward's share of samples above the base model's 90% quantile minus the judge's
        summary["change"].update(hacking_metrics(evaluation_baseline(results["base"]), results["fine-tuned"]))
        for space in ("pixel", "feature"):
            key = f"diversity/{space}"
            if key in before:
                summary["change"][f"{key}_ratio"] = after[key] / max(before[key], 1e-12)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    plot_histograms(results, out_dir / "reward_histogram.png")
    plot_diversity(results, out_dir / "diversity.png")
    return out_dir


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m rlft.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="a run folder, `base` (the config's env.base_model), or a model folder / id")
    parser.add_argument("--num-samples", type=int, default=None, help="samples per model (default: eval.num_samples)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the shared noise (default: eval.seed)")
    parser.add_argument("--out", default=None, help="output folder (default: <run>/evaluation)")
    parser.add_argument("--checkpoint", default=None, help="evaluate this checkpoint of the run (epoch_XXXXXX, or "
                        "latest) instead of its final weights")  # fmt: skip
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad}; config overrides are key=value")
    start = time.perf_counter()
    try:
        out_dir = evaluate(args.target, overrides, args.num_samples, args.seed, args.out, args.checkpoint)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as error:
        raise SystemExit(f"rlft.evaluate: {error}") from None
    print(f"rlft.evaluate: wrote {out_dir} in {time.perf_counter() - start:.1f} s")
    return out_dir


if __name__ == "__main__":
    main()
