"""`make bench` (part 6): what MLflow tracking adds to a study's wall time.

The same study runs twice on the real data, in temporary Optuna and MLflow stores: once with
tracking off (the do-nothing tracker), once with it on (a parent run, a nested run per trial with
per-epoch metrics, figures, the model of every trial that improves the best, and promotion).
One session seed for both and deterministic training make both sessions run the same trials.

By default the study is a short one (enqueued MLP trials, no pruning); `--study mlp --trials 12`
runs a real study file's search instead (a session shaped like `make tune`'s, about 20 minutes).
The MLflow store is created before the clock starts: that happens once per store, not per session.
It also prints what the session's summary says MLflow cost (`make tune` prints the same line):
seconds spent inside MLflow calls, in the trials and around them.

Prints figures and asserts nothing; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

SHORT_STUDY = """
# bench-tracking: {trials} enqueued MLP trials of {epochs} epochs, no pruning. Run: make bench
trials = {trials}
[fixed]
model = "mlp"
epochs = {epochs}
[search]
lr = {{ type = "float", low = 1e-4, high = 1e-2, log = true }}
[sampler]
name = "random"
seed = 0
[pruner]
name = "none"
{enqueue}
"""
ENQUEUED_LRS = (2e-3, 3e-3, 1e-3, 5e-3, 7e-4, 1.5e-3, 4e-3, 8e-3)


def short_study_file(folder: Path, *, trials: int, epochs: int) -> str:
    enqueue = "\n".join(f"[[enqueue]]\nlr = {lr}" for lr in ENQUEUED_LRS[:trials])
    path = folder / "bench-tracking.toml"
    path.write_text(SHORT_STUDY.format(trials=trials, epochs=epochs, enqueue=enqueue))
    return str(path)


def timed_session(study_file: str, folder: Path, *, trials: int, tracking: bool) -> tuple[float, dict]:
    """One session in fresh stores under ``folder``, wired as the CLI wires `make tune` (with or without
    tracking); returns its wall time and summary."""
    from pipeline.search.session import Session, run_session
    from pipeline.search.study_file import load_study
    from pipeline.stores import configure_mlflow
    from pipeline.tracking.runs import session_tracker

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["CHECKPOINT_DIR"] = str(folder / "checkpoints")  # not the real study's studies/checkpoints/
    # One session seed for both sessions: they replay the same configurations (a session draws its own otherwise).
    session = Session(load_study(study_file), f"sqlite:///{folder / 'optuna.db'}", target_trials=trials, timeout=None,
                      session_seed=0)
    if tracking:
        import mlflow

        configure_mlflow()
        mlflow.MlflowClient().search_experiments()  # creates the store's tables
    started = time.perf_counter()
    summary = run_session(session, session_tracker(session, enabled=tracking))
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", help="a study in studies/ (default: the short enqueued study)")
    parser.add_argument("--trials", type=int, default=4, help="finished trials per session (default: 4)")
    parser.add_argument("--epochs", type=int, default=8, help="epochs per trial of the short study (default: 8)")
    args = parser.parse_args()

    from pipeline.training.device import configure_cpu_threads
    from pipeline.search.study_file import load_study

    configure_cpu_threads()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow  # noqa: F401  imported up front: its import (about 1.5 s) is a process cost, not a study's

    with tempfile.TemporaryDirectory() as off_dir, tempfile.TemporaryDirectory() as on_dir:
        if args.study:
            study_file = str(load_study(args.study).path)
            shape = f"study {args.study}, {args.trials} finished trials"
        else:
            study_file = short_study_file(Path(off_dir), trials=args.trials, epochs=args.epochs)
            shape = f"{args.trials} MLP trials x {args.epochs} epochs"
        print(f"\n6. MLflow tracking overhead: {shape}, tracking off, then on", flush=True)
        off, _ = timed_session(study_file, Path(off_dir), trials=args.trials, tracking=False)
        print(f"   tracking off: {off:6.1f} s", flush=True)
        on, summary = timed_session(study_file, Path(on_dir), trials=args.trials, tracking=True)
        print(f"   tracking on:  {on:6.1f} s")
    print(f"   overhead:     {on - off:6.1f} s = {(on - off) / off:.1%} of the study's wall time")
    in_trials, around = summary["trial_tracking_seconds"], summary["session_tracking_seconds"]
    print(f"   inside MLflow calls: {in_trials:.1f} s in the trials ({in_trials / args.trials:.1f} s a trial), "
          f"{around:.1f} s around them (parent run, Optuna figures, promotion): "
          f"{(in_trials + around) / on:.1%} of the session")


if __name__ == "__main__":
    main()
