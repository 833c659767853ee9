"""Everything a run leaves behind, in one folder: config, metrics, sample grids, plots, final weights, wandb.

    <run_dir>/config.yaml               the resolved config
    <run_dir>/metrics.jsonl             one JSON line per epoch (namespaced keys: reward/mean, loss/policy, ...)
    <run_dir>/samples/epoch_XXXX.png    evaluation grids from the fixed evaluation seeds
    <run_dir>/reward_curve.png          training reward and evaluation metrics against epochs
    <run_dir>/final/policy.safetensors  the trainable weights at the end (all weights, or LoRA adapters)
    <run_dir>/wandb/                    the wandb run (offline unless logging.wandb=online)
    <run_dir>/replicas.jsonl            per learner replica and epoch: weights checksum, batch uids, buffer stats
    <run_dir>/checkpoints/              atomic checkpoints (rlft/checkpoint.py)
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from rlft.config import to_dict, to_yaml
from rlft.envs.rewards import to_uint8


def image_grid(images: torch.Tensor, columns: int = 8) -> PIL.Image.Image:  # noqa: F821
    """[N, C, H, W] in [-1, 1] -> one PIL image, `columns` wide, 1-pixel gaps."""
    from PIL import Image

    pixels = to_uint8(images)  # [N, H, W, C]
    n, h, w, c = pixels.shape
    rows = math.ceil(n / columns)
    canvas = torch.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, c), dtype=torch.uint8).numpy()
    for i, tile in enumerate(pixels):
        r, col = divmod(i, columns)
        canvas[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = tile
    image = Image.fromarray(canvas.squeeze(-1) if c == 1 else canvas)
    scale = max(1, 256 // (w * min(columns, n)) * 2)  # small images are enlarged so a grid is legible
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


class Recorder:
    def __init__(self, run_dir: Path, spec, wandb_run_id: str | None = None):
        self.run_dir = Path(run_dir)
        (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(spec))
        logging, total_epochs = spec.logging, spec.trainer.epochs
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")  # noqa: SIM115 (open for the run)
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.wandb = None
        if logging.wandb != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(
                project=logging.wandb_project, dir=str(self.run_dir), mode=logging.wandb, config=to_dict(spec),
                name=logging.wandb_name or self.run_dir.name, group=logging.wandb_group, id=wandb_run_id,
                resume="allow" if wandb_run_id else None,
            )  # fmt: skip
        self.bar = tqdm(total=total_epochs, desc="rlft", unit="epoch", disable=not logging.progress)

    def __call__(self, kind: str, payload: dict) -> None:
        getattr(self, f"on_{kind}")(payload)

    def on_metrics(self, metrics: dict) -> None:
        self.history.append(metrics)
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        if self.wandb:
            self.wandb.log(metrics, step=metrics["epoch"])
        self.bar.update(1)
        self.bar.set_postfix({"reward": f"{metrics.get('reward/mean', float('nan')):.3f}",
                              "samples/s": f"{metrics['perf/samples_per_s']:.1f}"})  # fmt: skip

    def on_eval(self, result: dict) -> None:
        epoch = result["epoch"]
        grid = image_grid(result["images"])
        path = self.run_dir / "samples" / f"epoch_{epoch:04d}.png"
        grid.save(path)
        record = {"epoch": epoch, **result["metrics"]}
        self.evals.append(record)
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.wandb:
            import wandb

            self.wandb.log({**result["metrics"], "eval/samples": wandb.Image(grid)}, step=epoch)
        shown = {k: v for k, v in result["metrics"].items() if not k.endswith("_std")}  # the rest is in metrics.jsonl
        summary = ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in shown.items())
        self.bar.write(f"eval @ epoch {epoch}: {summary}  -> {path.relative_to(self.run_dir.parent)}")

    def on_start(self, payload: dict) -> None:
        """The learners (re)start after epoch E: keep what was recorded up to E (its eval included), drop the rest."""
        epoch = payload["epoch"]
        self.metrics_file.close()
        path = self.run_dir / "metrics.jsonl"
        kept = [line for line in path.read_text().splitlines() if epoch and json.loads(line)["epoch"] <= epoch]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self.metrics_file = open(path, "a")  # noqa: SIM115 (open for the run)
        records = [json.loads(line) for line in kept]
        self.history = [r for r in records if "policy_version" in r]
        self.evals = [r for r in records if "policy_version" not in r]
        self.bar.reset()
        self.bar.update(epoch)

    def on_warning(self, payload: dict) -> None:
        self.bar.write(f"rlft: {payload['message']}")

    def on_stopped(self, payload: dict) -> None:
        self.bar.write(f"rlft: stopped after epoch {payload['epoch']}, with a checkpoint; continue with "
                       f"`python -m rlft.run resume={self.run_dir}`")

    def on_checkpoint(self, payload: dict) -> None:
        """Nothing to record: the learners wrote the checkpoint; the report is for hooks that pass it on (a Tune
        trial's)."""

    def on_replica(self, summary: dict) -> None:
        with open(self.run_dir / "replicas.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")

    def on_weights(self, payload: dict) -> None:
        from safetensors.torch import save_file

        (self.run_dir / "final").mkdir(exist_ok=True)
        weights = {k: v.contiguous() for k, v in payload["weights"].items()}
        save_file(weights, str(self.run_dir / "final" / "policy.safetensors"),
                  metadata={"policy_version": str(payload["policy_version"])})  # fmt: skip

    def plot(self) -> Path | None:
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = sorted({k for e in self.evals for k in e if k.startswith("eval/")})
        fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.5 * (1 + len(keys)), 3.5), squeeze=False)
        epochs = [m["epoch"] for m in self.history]
        axes[0, 0].plot(epochs, [m.get("reward/mean", float("nan")) for m in self.history])
        axes[0, 0].set(title="training reward (mean)", xlabel="epoch")
        for ax, key in zip(axes[0, 1:], keys, strict=True):
            ax.plot([e["epoch"] for e in self.evals], [e.get(key, float("nan")) for e in self.evals], marker="o")
            ax.set(title=key, xlabel="epoch")
        fig.tight_layout()
        path = self.run_dir / "reward_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        self.bar.close()
        plot = self.plot()
        if self.wandb:
            if plot:
                import wandb

                self.wandb.log({"reward_curve": wandb.Image(str(plot))})
            self.wandb.finish()
        self.metrics_file.close()
