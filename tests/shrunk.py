"""The shipped study files, shrunk to seconds on the synthetic dataset: the files users run are the
files the tests run, with fewer epochs and trials and a validation split the synthetic data can hold.

Tests that need particular trials (one that learns, one that cannot, one that diverges) enqueue
them before the session, as a user would with `study.enqueue_trial`; the study file's own
enqueued configuration is then left out (it goes only into a new, empty study).
"""

from __future__ import annotations

import sys
import warnings

import optuna

from pipeline.search.session import Session
from pipeline.search.study_file import load_study
from pipeline.tracking.runs import session_tracker

SYNTHETIC = {"val_size": "200"}  # the synthetic dataset has 600 training images
# Searched values for the `mlp` study; values out of its ranges are what make these trials what they are.
LEARNS = {"lr": 3e-3, "batch_size": 64, "optimizer": "adam", "hidden_sizes_depth": 2, "hidden_sizes_1": 128,
          "hidden_sizes_2": 64}
HOPELESS = {"lr": 1e-7, "batch_size": 64}  # learns nothing: falls behind the median, so it is pruned
DIVERGES = {"lr": 1e6, "optimizer": "adamw", "weight_decay": 1e-2}  # weight decay of lr*wd = 1e4 a step: inf


def storage_in(folder) -> str:
    return f"sqlite:///{folder / 'optuna.db'}"


def settings(epochs: int, **more) -> tuple[tuple[str, str], ...]:
    return tuple({**SYNTHETIC, "epochs": str(epochs), **{k: str(v) for k, v in more.items()}}.items())


def session(folder, study: str = "mlp", *, trials: int, epochs: int = 3, timeout=None, workers: int = 1,
            final_phase: bool = False, session_seed: int | None = None, **more) -> Session:
    """The study's final phase (its best trial retrained for up to 60 epochs) is off unless asked for;
    the session draws a seed of its own unless given one."""
    spec = load_study(study).with_settings(dict(settings(epochs, **more)))
    seeded = {} if session_seed is None else {"session_seed": session_seed}
    return Session(spec, storage_in(folder), target_trials=trials, timeout=timeout, workers=workers, device="cpu",
                   final_phase=final_phase, **seeded)


def tracker_for(session: Session):
    """The MLflow session tracker the CLI would wire for this session."""
    return session_tracker(session)


def enqueue(folder, study: str, *trials: dict) -> None:
    """Queue these parameters first (the rest of each trial's parameters are sampled)."""
    created = optuna.create_study(study_name=study, storage=storage_in(folder), direction="maximize",
                                  load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # out-of-range values are the point
        for params in trials:
            created.enqueue_trial(params)


def tune_command(folder, study: str = "mlp", *extra, epochs: int = 3, final_phase: bool = False, **more) -> list[str]:
    """`python -m pipeline tune` on the shrunk study, as a user would type it: on the storage in
    ``folder``, or with ``folder`` None on the one the environment names ($OPTUNA_STORAGE); without
    the final phase unless asked."""
    sets = [arg for key, value in settings(epochs, **more) for arg in ("--set", f"{key}={value}")]
    storage = [] if folder is None else ["--storage", storage_in(folder)]
    final = [] if final_phase else ["--no-final"]
    return [sys.executable, "-m", "pipeline", "tune", "--study", study, *storage, "--device", "cpu", *sets, *final,
            *extra]
