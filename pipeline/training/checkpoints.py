"""Per-epoch checkpoints of a tuning trial, so that a retried or interrupted trial resumes where it
stopped instead of at epoch 1 (the pattern of Optuna's pytorch_checkpoint example).

A trial writes <folder>/<study>/trial-<number>.pt after every epoch. A trial that re-runs another
one's parameters (a Ctrl-C re-queue names it in the user attribute `retry_of`; Optuna's heartbeat
retry in the system attribute `retry_history`) starts from the newest checkpoint among those
trials whose identity (the trial's parameters, its full config, the device type) matches its own:
a file left by a study of the same name in another storage, or by a run with other settings, is
never picked up. The files go when the trial ends for good (complete, pruned, diverged); they stay when it
may be run again (interrupted, killed, its storage lost). The folder is studies/checkpoints/ by
default; set $CHECKPOINT_DIR to a shared one so that a trial killed on one machine resumes on another.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch

from pipeline.errors import PipelineError, first_line
from pipeline.paths import STUDIES_DIR

CHECKPOINT_DIR_ENV = "CHECKPOINT_DIR"


def checkpoint_dir() -> Path:
    return Path(os.environ.get(CHECKPOINT_DIR_ENV) or STUDIES_DIR / "checkpoints")


class CheckpointDirError(PipelineError):
    """$CHECKPOINT_DIR names something that is not a folder."""


def check_checkpoint_dir() -> None:
    """Before a study starts: a file where the folder should be would fail every trial after its first epoch."""
    folder = checkpoint_dir()
    if folder.exists() and not folder.is_dir():
        raise CheckpointDirError(f"{CHECKPOINT_DIR_ENV}={folder} is a file, not a folder. Fix: name a folder (it is "
                                 f"created if missing), or unset it for {STUDIES_DIR / 'checkpoints'}")


class TrialCheckpoint:
    """One trial's checkpoint file, and the earlier trial's it may resume from."""

    def __init__(self, path: Path, resume_candidates: list[Path], identity: str = ""):
        self.path = path
        self.resume_candidates = resume_candidates  # newest first
        self.identity = identity  # what must match for a file to be resumed from
        self.resumed_from: Path | None = None

    @classmethod
    def for_trial(cls, study_name: str, trial_number: int, earlier_trials: list[int], identity: dict) -> TrialCheckpoint:
        folder = checkpoint_dir() / study_name
        return cls(folder / f"trial-{trial_number}.pt", [folder / f"trial-{n}.pt" for n in reversed(earlier_trials)],
                   json.dumps(identity, sort_keys=True, default=str))

    def load(self) -> dict | None:
        """The newest state an earlier run of these parameters left, or None to start at epoch 1."""
        for path in self.resume_candidates:
            if path.exists():
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as error:
                    # Cut short or damaged (saves are atomic, so a disk or hand did it): say so, try the next.
                    print(f"note: checkpoint {path} cannot be read ({type(error).__name__}: {first_line(error)}); "
                          f"not resuming from it", flush=True)
                    continue
                if state.get("identity") != self.identity:
                    continue
                self.resumed_from = path
                return state
        return None

    def save(self, state: dict) -> None:
        """Write atomically: a worker killed mid-write leaves the previous epoch's file intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}.partial")
        torch.save({**state, "identity": self.identity}, partial)
        os.replace(partial, self.path)

    def remove(self) -> None:
        """The trial ended for good: its checkpoint and the one it resumed from are no longer needed."""
        for path in (self.path, self.resumed_from):
            if path is not None:
                path.unlink(missing_ok=True)


class NoCheckpoint:
    """Checkpoints off (the tests of other behaviour, a bare `train`)."""

    resumed_from = None

    def load(self):
        return None

    def save(self, state):
        pass

    def remove(self):
        pass
