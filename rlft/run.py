"""`python -m rlft.run [group=choice ...] [key=value ...]`: fine-tune a pretrained diffusion model against a reward.

    python -m rlft.run                                   # DDPO on the shipped digits DDPM, digit reward
    python -m rlft.run algo=ddpo env=celebahq            # DDPO on google/ddpm-celebahq-256 with its OVER50 reward
    python -m rlft.run reward=jpeg_compressibility trainer.epochs=30
    python -m rlft.run ray.enabled=false                 # the same loop in one process, without Ray
    python -m rlft.run resume=runs/<folder>              # continue a run from its newest checkpoint (or resume=auto)
    python -m rlft.run --help                            # the groups, their choices and the top-level keys
    python -m rlft.run algo=draft --cfg job              # the composed config, every key with its comment

The config is composed and checked before Ray starts; the run folder is printed first and holds everything
the run writes (see rlft/recorder.py). Ctrl-C or SIGTERM ends the run after the epoch in progress, with a
checkpoint to resume from; a second Ctrl-C stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from rlft.config import ConfigError, commented_config, compose, help_text, validate

if TYPE_CHECKING:
    from rlft.checkpoint import RunPlan
    from rlft.learner import Report

USAGE = "[algo=<name>] [env=<preset>] [reward=<name>] [key=value ...] [--cfg job]"


def make_run_dir(spec) -> Path:
    if spec.logging.run_dir:
        return Path(spec.logging.run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{spec.algo.name}-{spec.env.name}-{spec.reward.name}-{stamp}"


@contextmanager
def stop_on_signals():
    """An Event set by the first Ctrl-C or SIGTERM (the run stops after the epoch in progress, with a checkpoint);
    a second one stops at once. Outside the main thread (a Tune trial) signals stay as they are."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def request_stop(signum, frame):
        if stop.is_set():
            raise SystemExit(f"rlft: stopped at once ({signal.Signals(signum).name} twice); resume from the newest "
                             "checkpoint with resume=<run folder>")  # fmt: skip
        stop.set()
        print(f"\nrlft: {signal.Signals(signum).name}: stopping after this epoch, with a checkpoint (again to stop at "
              "once)", flush=True)  # fmt: skip

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(spec, on_report: Report | None = None, plan: RunPlan | None = None) -> Path:
    """One whole run of a composed, validated spec. `on_report(kind, payload)` sees every report after the run folder
    has recorded it (a Ray Tune trial passes one that also calls `ray.tune.report`); `plan` is where the run goes
    and which checkpoint it continues from (by default resolved from `resume` here)."""
    from rlft.checkpoint import RunLock, plan_run
    from rlft.pipeline import StopRun
    from rlft.recorder import Recorder

    plan = plan or plan_run(spec, make_run_dir(spec))
    run_dir = plan.run_dir
    with RunLock(run_dir), stop_on_signals() as stop:
        print(f"rlft: run folder {run_dir}", flush=True)
        recorder = Recorder(run_dir, spec, wandb_run_id=plan.checkpointer.wandb_run_id)
        report = recorder
        if on_report is not None:
            report = lambda kind, payload: (recorder(kind, payload), on_report(kind, payload))  # noqa: E731
        try:
            if spec.ray.enabled:
                from rlft.pipeline import run_with_ray

                run_with_ray(spec, report, run_dir, plan.checkpointer, stop=stop)
            else:
                from rlft.pipeline import run_local

                run_local(spec, report, plan.checkpointer, stop=stop)
        except StopRun as error:
            raise SystemExit(f"rlft: {error}") from None
        finally:
            recorder.close()
    if not stop.is_set():
        print(f"rlft: done; results in {run_dir}", flush=True)
    return run_dir


def main(argv: list[str] | None = None) -> Path | None:
    from rlft.checkpoint import plan_run
    from rlft.pipeline import RUN_ERRORS, error_message

    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(help_text("python -m rlft.run", USAGE))
        return None
    show_config = "--cfg" in argv
    if show_config:
        index = argv.index("--cfg")
        argv = argv[:index] + argv[index + 2 :]  # `--cfg job`, Hydra's convention
    try:
        spec = compose(argv)
        if show_config:
            print("\n".join(commented_config(spec)))
            return None
        validate(spec)
        # resume=<folder>|auto: which folder, which checkpoint (refused when made for another model)
        plan = plan_run(spec, make_run_dir(spec))
    except (ConfigError, ValueError, FileNotFoundError) as error:  # everything before the run starts: one line
        raise SystemExit(f"rlft: {error}") from None
    try:
        return run(spec, plan=plan)
    except RUN_ERRORS as error:
        raise SystemExit(f"rlft: {error_message(error)}") from None

if __name__ == "__main__":
    main()
