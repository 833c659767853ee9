"""`python -m rlft.run [key=value ...]`: fine-tune a pretrained diffusion model against a reward.

    python -m rlft.run                                   # DDPO on the shipped digits DDPM, digit reward, CPU
    python -m rlft.run reward=jpeg_compressibility trainer.epochs=30
    python -m rlft.run ray.enabled=false                 # the same loop in one process, without Ray
    python -m rlft.run resume=runs/<folder>              # continue a run from its newest checkpoint (or resume=auto)

The config is composed and checked before Ray starts; the run folder is printed first and holds everything
the run writes (see rlft/recorder.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rlft.config import ConfigError, compose, to_container, validate

if TYPE_CHECKING:
    from rlft.checkpoint import RunPlan
    from rlft.learner import Report


def make_run_dir(cfg) -> Path:
    if cfg.logging.run_dir:
        return Path(cfg.logging.run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.algo.name}-{cfg.env.name}-{cfg.reward.name}-{stamp}"


def run(cfg, on_report: Report | None = None, plan: RunPlan | None = None) -> Path:
    """One whole run of a composed, validated config. `on_report(kind, payload)` sees every report after the
    run folder has recorded it (a Ray Tune trial passes one that also calls `ray.tune.report`); `plan` is where
    the run goes and which checkpoint it continues from (by default resolved from `resume` here)."""
    plain = to_container(cfg)
    if plan is None:
        from rlft.checkpoint import plan_run

        plan = plan_run(plain, make_run_dir(cfg))
    run_dir = plan.run_dir
    from rlft.recorder import Recorder

    recorder = Recorder(run_dir, cfg, cfg.trainer.epochs, wandb_run_id=plan.checkpointer.wandb_run_id)
    report = recorder
    if on_report is not None:
        report = lambda kind, payload: (recorder(kind, payload), on_report(kind, payload))  # noqa: E731
    print(f"rlft: run folder {run_dir}", flush=True)
    try:
        if cfg.ray.enabled:
            from rlft.pipeline import run_with_ray

            run_with_ray(plain, report, run_dir, plan.checkpointer)
        else:
            from rlft.pipeline import run_local

            run_local(plain, report, plan.checkpointer)
    finally:
        recorder.close()
    print(f"rlft: done; results in {run_dir}", flush=True)
    return run_dir


def main(argv: list[str] | None = None) -> Path:
    try:
        cfg = compose("config", sys.argv[1:] if argv is None else argv)
        validate(cfg)
    except (ConfigError, FileNotFoundError, ValueError, KeyError) as error:
        raise SystemExit(f"rlft: {error}") from None
    from rlft.checkpoint import plan_run

    try:  # resume=<folder>|auto: which folder, which checkpoint (refused when made for another model)
        plan = plan_run(to_container(cfg), make_run_dir(cfg))
    except ConfigError as error:
        raise SystemExit(f"rlft: {error}") from None
    return run(cfg, plan=plan)


if __name__ == "__main__":
    main()
