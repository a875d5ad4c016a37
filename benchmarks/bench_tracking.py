"""`make bench` (part 2): what MLflow tracking adds to a study's wall time.

The same small study runs twice on the real data, in temporary Optuna and MLflow stores: once with
tracking off (the do-nothing tracker), once with it on (a parent run, a nested run per trial with
per-epoch metrics, figures, the model of every trial that improves the best, and promotion).
Its trials are enqueued and there is no pruner, so both sessions do the same training.

Prints figures and asserts nothing; run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

STUDY = """
# bench-tracking: {trials} fixed MLP trials of {epochs} epochs, no pruning. Run: make bench
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


def run(folder: Path, *, trials: int, epochs: int, tracking: bool) -> float:
    from pipeline.search import Session, run_session

    enqueue = "\n".join(f"[[enqueue]]\nlr = {lr}" for lr in (2e-3, 3e-3, 1e-3, 5e-3, 7e-4)[:trials])
    study_file = folder / "bench-tracking.toml"
    study_file.write_text(STUDY.format(trials=trials, epochs=epochs, enqueue=enqueue))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    started = time.perf_counter()
    run_session(Session(str(study_file), f"sqlite:///{folder / 'optuna.db'}", trials=trials, timeout=None,
                        tracking=tracking))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()

    from pipeline.device import configure_cpu_threads

    configure_cpu_threads()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow  # noqa: F401  imported up front: its import (about 5 s) is a process cost, not a study's

    print(f"\n3. MLflow tracking overhead: a study of {args.trials} trials x {args.epochs} epochs, "
          f"tracking off, then on", flush=True)
    with tempfile.TemporaryDirectory() as off_dir, tempfile.TemporaryDirectory() as on_dir:
        off = run(Path(off_dir), trials=args.trials, epochs=args.epochs, tracking=False)
        print(f"   tracking off: {off:6.1f} s", flush=True)
        on = run(Path(on_dir), trials=args.trials, epochs=args.epochs, tracking=True)
        print(f"   tracking on:  {on:6.1f} s")
    print(f"   overhead:     {on - off:6.1f} s = {(on - off) / off:.1%} of the study's wall time")


if __name__ == "__main__":
    main()
