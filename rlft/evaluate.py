"""`python -m rlft.evaluate TARGET [--num-samples N] [--seed S] [--out DIR] [key=value ...]`: before / after.

TARGET is a run folder (its config.yaml and final/policy.safetensors) or a base model (`base` for the config's
own env.base_model, or a folder / Hub id). From one fixed seed, the base model and the fine-tuned one sample
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
import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rlft.config import compose, to_container


def mean_pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance over all pairs i < j of the rows of x ([N, ...] -> scalar); 0 for identical rows."""
    return torch.pdist(x.flatten(1).double()).mean().float()


def diversity(images: torch.Tensor, features: torch.Tensor | None) -> dict[str, float]:
    metrics = {"diversity/pixel": mean_pairwise_distance(images).item()}
    if features is not None:
        metrics["diversity/feature"] = mean_pairwise_distance(features).item()
    return metrics


def reward_summary(rewards: torch.Tensor) -> dict[str, float]:
    r = rewards[torch.isfinite(rewards)].double()
    q = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"reward/mean": r.mean().item(), "reward/std": r.std(unbiased=False).item(), "reward/q10": q[0],
            "reward/median": q[1], "reward/q90": q[2], "reward/nonfinite": float((~torch.isfinite(rewards)).sum())}


def load_target(target: str, overrides: list[str]) -> tuple[dict, Path | None, str]:
    """(config, fine-tuned weights or None, a name) for a run folder or a base model."""
    folder = Path(target).expanduser()
    if (folder / "config.yaml").is_file():
        cfg = OmegaConf.merge(OmegaConf.load(folder / "config.yaml"), OmegaConf.from_dotlist(overrides))
        weights = folder / "final" / "policy.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} is missing: the run did not finish (evaluate a finished run, or "
                                    "the base model with `python -m rlft.evaluate base`)")  # fmt: skip
        return to_container(cfg), weights, folder.name
    base = [] if target == "base" else [f"env.base_model={target}"]
    cfg = to_container(compose("config", [*base, *overrides]))
    return cfg, None, f"{cfg['env']['name']}-base"


def sample(worker, seed: int, n: int, policy_version: int) -> dict:
    """The worker's evaluation (fixed noise from `seed`) plus the reward model's features of the samples."""
    result = worker.evaluate(policy_version, seed, n)
    reward = worker.env.reward
    features = None
    if reward.features is not None:
        features = torch.cat([reward.features(x.to(worker.device)).cpu() for x in result["images"].split(32)])
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
            data = result["images"] if space == "pixel" else result["features"]
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
             out: str | None = None) -> Path:  # fmt: skip
    from safetensors.torch import load_file

    from rlft.recorder import image_grid
    from rlft.rollout import RolloutWorker

    cfg, weights, name = load_target(target, overrides)
    cfg["reward"] = {**cfg["reward"], "remote": False}  # the evaluation scores in this process
    n = num_samples or cfg["eval"]["num_samples"]
    seed = cfg["eval"]["seed"] if seed is None else seed
    batch = cfg["trainer"]["rollout_batch_size"]
    if n % batch:
        raise ValueError(f"--num-samples={n} must be a multiple of trainer.rollout_batch_size={batch}")
    out_dir = Path(out) if out else (Path(target) / "evaluation" if weights else Path("evaluations") / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    worker = RolloutWorker(cfg)
    results = {"base": sample(worker, seed, n, 0)}
    if weights is not None:
        worker.set_weights(load_file(str(weights)), 1)
        results["fine-tuned"] = sample(worker, seed, n, 1)
    summary = {"target": str(target), "weights": str(weights) if weights else None, "num_samples": n, "seed": seed,
               "reward": cfg["reward"]["name"], "env": cfg["env"]["name"]}  # fmt: skip
    for label, result in results.items():
        result["metrics"] = {**result["metrics"], **reward_summary(result["reward"]),
                             **diversity(result["images"], result["features"])}  # fmt: skip
        summary[label] = result["metrics"]
        file = "samples_base.png" if label == "base" else "samples_finetuned.png"
        image_grid(result["images"][:64]).save(out_dir / file)
    if weights is not None:
        before, after = summary["base"], summary["fine-tuned"]
        summary["change"] = {k: after[k] - before[k] for k in before if k in after}
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
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments {bad}; config overrides are key=value")
    start = time.perf_counter()
    try:
        out_dir = evaluate(args.target, overrides, args.num_samples, args.seed, args.out)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise SystemExit(f"rlft.evaluate: {error}") from None
    print(f"rlft.evaluate: wrote {out_dir} in {time.perf_counter() - start:.1f} s")
    return out_dir


if __name__ == "__main__":
    main()
