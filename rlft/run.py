"""`python -m rlft.run [key=value ...]`: fine-tune a pretrained diffusion model against a reward.

    python -m rlft.run                                   # DDPO on the shipped digits DDPM, digit reward, CPU
    python -m rlft.run reward=jpeg_compressibility trainer.epochs=30
    python -m rlft.run ray.enabled=false                 # the same loop in one process, without Ray

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
    from rlft.learner import Report


def make_run_dir(cfg) -> Path:
    if cfg.logging.run_dir:
        return Path(cfg.logging.run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.algo.name}-{cfg.env.name}-{cfg.reward.name}-{stamp}"


def run(cfg, on_report: Report | None = None) -> Path:
    """One whole run of a composed, validated config. `on_report(kind, payload)` sees every report after the
    run folder has recorded it (a Ray Tune trial passes one that also calls `ray.tune.report`)."""
    run_dir = make_run_dir(cfg)
    from rlft.recorder import Recorder

    recorder = Recorder(run_dir, cfg, cfg.trainer.epochs)
    report = recorder
    if on_report is not None:
        report = lambda kind, payload: (recorder(kind, payload), on_report(kind, payload))  # noqa: E731
    print(f"rlft: run folder {run_dir}", flush=True)
    plain = to_container(cfg)
    try:
        if cfg.ray.enabled:
            from rlft.pipeline import run_with_ray

            run_with_ray(plain, report, run_dir)
        else:
            from rlft.pipeline import run_local

            run_local(plain, report)
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
    return run(cfg)


if __name__ == "__main__":
    main()
