"""Ctrl-C during a study ends the trial that is training, and never strands one half made.

Python raises KeyboardInterrupt wherever the main thread happens to be. Inside the objective that is
what we want: Optuna marks the trial FAIL and the objective records it for a re-run. Inside Optuna's
own bookkeeping (`study.ask()` creating the next trial, `tell`, the callbacks) it would leave a trial
RUNNING with no parameters, which only the heartbeat's grace period clears. So while `optimize` runs,
an interrupt outside the objective is held and raised at the next safe point: the start of the next
objective call, the end of the trial in progress, or the return of `optimize`.

Inside the objective, writes to the stores (a trial's MLflow calls, Optuna's `report`) are held the
same way with ``deferred()``: an interrupt in the middle of one can leave a SQLite write lock behind,
and the next write, the one that marks the run FAILED, then waits for it and fails ("database is
locked"). Training itself is interrupted at once.
"""

import signal
import threading
from contextlib import contextmanager


class InterruptGate:
    """Usage, in a process's main thread:

        gate = InterruptGate()
        with gate.holding():
            study.optimize(gate.objective(objective), callbacks=[..., gate.after_trial])
    """

    def __init__(self):
        self.pending = False
        self.in_objective = False  # True while an interrupt may be raised at once

    def _on_sigint(self, signum, frame):
        if self.in_objective:
            raise KeyboardInterrupt
        self.pending = True

    def _raise_if_pending(self) -> None:
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextmanager
    def holding(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread receives signals (and may set a handler)
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
        self._raise_if_pending()  # optimize returned (budget reached) just as Ctrl-C came

    def objective(self, objective):
        def gated(trial):
            self._raise_if_pending()  # came while Optuna created this trial: it fails before sampling
            self.in_objective = True
            try:
                return objective(trial)
            finally:
                self.in_objective = False

        return gated

    @contextmanager
    def deferred(self, *, raise_after: bool = True):
        """Hold an interrupt for the length of the block (a write to a store). With ``raise_after`` it is
        raised when the block ends; without, it waits for the trial's end (the trial has finished its
        work and should be told as it is)."""
        interruptible, self.in_objective = self.in_objective, False
        try:
            yield
        finally:
            self.in_objective = interruptible
        if raise_after and interruptible:
            self._raise_if_pending()

    def after_trial(self, study, trial) -> None:
        """An Optuna callback, the last one: the trial is told by now, so the interrupt may leave `optimize`."""
        self._raise_if_pending()
