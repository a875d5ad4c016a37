"""The trial loop of one worker, the worker processes of a session, and recovery from a lost storage.

A worker loads the data once, then asks Optuna for trials until the study has its target or the
session's deadline passes. When the study storage goes away (a database restart, a network cut) it
waits for it, fails and re-queues the trial it was running (which resumes from its checkpoint), and
goes on; a storage that keeps failing with no trial finishing in between ends the worker.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time

import optuna
import sqlalchemy.exc
import torch
from optuna.trial import TrialState

from pipeline.data.dataset import load_fashion_mnist
from pipeline.training.device import configure_cpu_threads, pick_device
from pipeline.errors import PipelineError
from pipeline.progress import epoch_bar
from pipeline import attrs
from pipeline.search.interrupts import InterruptGate
from pipeline.search.objective import TRIAL_ERRORS, Objective
from pipeline.search.study import open_study, quiet_optuna
from pipeline.search.study_file import SEARCH_PHASE, worker_sampler_seed
from pipeline.search.summary import COMPLETE_OR_PRUNED, ProgressLine, count_complete_or_pruned, count_failed
from pipeline.stores import StorageError, close_storage, database_problem, open_storage

# The storage went away (a database restart, a network cut): the worker waits for it, then goes on.
# A query cut short leaves its session needing a rollback, which is what the next one raises.
STORAGE_LOST = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.PendingRollbackError)
RECONNECT_SECONDS = 120
# Storage losses a worker recovers from while no trial finishes; the next one ends it: not a blip.
MAX_LOSSES_WITHOUT_A_FINISHED_TRIAL = 3


class WorkerFailed(PipelineError):
    """A worker process ended on an unexpected error (its traceback is printed above)."""


class StorageLosses:
    """Counts the storage losses since a trial last finished; an Optuna callback resets it."""

    def __init__(self, limit: int = MAX_LOSSES_WITHOUT_A_FINISHED_TRIAL):
        self.limit = limit
        self.since_a_trial_finished = 0

    def lost(self) -> bool:
        """One more loss; whether the worker may still recover from it."""
        self.since_a_trial_finished += 1
        return self.since_a_trial_finished <= self.limit

    def __call__(self, study, trial) -> None:
        self.since_a_trial_finished = 0


def run_worker_processes(session, trial_trackers, started: float) -> None:
    """``session.workers`` spawned processes on the same study; the first error or Ctrl-C ends them all."""
    # spawn, not fork: each worker starts clean (own CUDA context, own SQLite connections).
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_entry, args=(session, trial_trackers, i, started), name=f"worker-{i}")
                 for i in range(session.workers)]
    for process in processes:
        process.start()
    try:
        stopped = _join_until_all_end_or_one_fails(processes)
    except KeyboardInterrupt:
        _interrupt(processes)  # a terminal sends SIGINT to all; `kill -INT` reaches only us
        raise
    crashed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0 and p not in stopped]
    if crashed:  # its traceback is above; the session must not look like a success
        raise WorkerFailed(f"{', '.join(crashed)} stopped on an error (its traceback is above), and the other "
                           f"workers were stopped; finished trials are kept: run the same command again to continue")


def _join_until_all_end_or_one_fails(processes) -> list:
    """Wait for every worker to end; as soon as one ends on an error, interrupt the others rather than
    let them train on to the deadline of a session that has already failed. Returns the workers it
    stopped so (those it had to kill exit with -9: not an error of theirs)."""
    running = list(processes)
    while running:
        ended = multiprocessing.connection.wait([p.sentinel for p in running])
        for process in [p for p in running if p.sentinel in ended]:
            process.join()
            running.remove(process)
            if process.exitcode != 0:
                _interrupt(running)
                return running
    return []


def _interrupt(processes) -> None:
    """Ctrl-C to each worker still running: it ends its trial as interrupted (re-queued by the next
    session) and exits; those that have not within a minute, all together, are killed (their trials
    stay RUNNING until their heartbeats go stale, then are retried)."""
    for process in processes:
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
    deadline = time.time() + 60
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.time()))
        if process.is_alive():
            process.kill()
            process.join()


def _worker_entry(session, trial_trackers, worker: int, started: float) -> None:
    _end_with_the_session()
    try:
        work(session, trial_trackers, worker=worker, started=started)
    except KeyboardInterrupt:
        pass  # the parent reports the interruption


def _end_with_the_session() -> None:
    """A worker must not outlive its session. Killed outright (SIGKILL), the session cannot stop its
    workers: they would train on, orphans, for trials whose parent run the next session ends as KILLED.
    On Linux the kernel kills a worker when its session dies (PR_SET_PDEATHSIG); its trial then stops
    beating and is retried, like any killed worker's. Elsewhere workers run on to their deadline."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    # It fires when the thread that started us ends, not the process: the session starts its workers
    # from its main thread, whose end is the session's.
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) != 0:
        print(f"note: this worker will not end with its session if that is killed ({os.strerror(ctypes.get_errno())})",
              flush=True)
    if os.getppid() != multiprocessing.parent_process().pid:  # the session died before we asked
        os._exit(1)


def work(session, trial_trackers, *, worker: int, started: float, phase: int = SEARCH_PHASE) -> None:
    """One worker: load the data once, then run trials until the study's target or the deadline. Each
    opening of the study (the first, and one per lost storage) samples on a stream of its own."""
    spec = session.spec
    device = pick_device(session.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", worker % torch.cuda.device_count())  # one worker per GPU
    configure_cpu_threads(session.workers)
    quiet_optuna()
    opening = 0
    storage, study = _open_for_worker(session, trial_trackers, worker, (phase, opening))
    objective = None
    deadline = None if session.timeout is None else started + session.timeout
    gate = InterruptGate()
    losses = StorageLosses()
    try:
        while True:
            try:
                # Failed trials do not count towards the target, so go round until enough have finished.
                remaining = session.target_trials - count_complete_or_pruned(study)
                seconds_left = None if deadline is None else deadline - time.time()
                if remaining <= 0 or (seconds_left is not None and seconds_left <= 0):
                    return
                if objective is None:
                    def new_bar(trial_number, epochs):  # one line per worker on a terminal
                        return epoch_bar(epochs, description=f"trial {trial_number}", deadline=deadline, position=worker)

                    objective = Objective(spec, load_fashion_mnist(), device, trial_trackers, gate.deferred, new_bar,
                                          checkpoints=True, seeds=sampler_seeds(session, worker, (phase, opening)))
                before = count_complete_or_pruned(study)
                failed_before = count_failed(study)
                with gate.holding():  # Ctrl-C ends the training trial, never one Optuna is creating or telling
                    study.optimize(
                        gate.objective(objective),
                        n_trials=remaining,
                        timeout=seconds_left,
                        catch=TRIAL_ERRORS,  # a diverged or out-of-memory trial is FAIL with its reason; the study goes on
                        callbacks=[
                            # The target across workers: each stops once the study has enough.
                            optuna.study.MaxTrialsCallback(session.target_trials, states=COMPLETE_OR_PRUNED),
                            ProgressLine(started, spec.max_epochs),
                            losses,
                            gate.after_trial,
                        ],
                    )
            except Exception as error:
                lost = storage_loss(error)
                if lost is None or not losses.lost():
                    raise
                print(f"worker {worker}: lost the study storage ({database_problem(session.storage, lost)}); "
                      f"waiting up to {RECONNECT_SECONDS} s for it to come back", flush=True)
                lost_storage = storage
                opening += 1
                storage, study = _open_for_worker(session, trial_trackers, worker, (phase, opening),
                                                  patience=RECONNECT_SECONDS)
                close_storage(lost_storage)
                if objective is not None:
                    objective.seeds = sampler_seeds(session, worker, (phase, opening))
                if objective is not None and objective.current_trial is not None:
                    _retry_lost_trial(study, objective.current_trial, trial_trackers)
                continue
            out_of_time = deadline is not None and time.time() >= deadline
            if count_complete_or_pruned(study) == before and not out_of_time:
                failed = count_failed(study) - failed_before
                print(f"worker {worker}: {failed} trials in a row failed; stopping", flush=True)
                return
    finally:
        close_storage(storage)  # its connections: a file handle, a server's connection slot


def sampler_seeds(session, worker: int, stream: tuple[int, int]) -> dict:
    """What each trial of this worker records of its sampler's seed: enough to replay the session."""
    return {attrs.SESSION_SEED: session.session_seed,
            attrs.WORKER_SAMPLER_SEED: worker_sampler_seed(session.spec.sampler.get("seed"), session.session_seed,
                                                           worker, stream)}


def storage_loss(error: BaseException | None) -> BaseException | None:
    """The lost connection behind ``error``, raised as it is or wrapped (Optuna raises a
    StorageInternalError from it); None when the error is something else."""
    while error is not None:
        if isinstance(error, STORAGE_LOST):
            return error
        error = error.__cause__ or error.__context__
    return None


def _open_for_worker(session, trial_trackers, worker: int, stream: tuple[int, int], patience: float = 0):
    """The storage and the study through it, sampling on ``stream``; the storage's stale-trial callback
    also marks the trial's MLflow run. With ``patience``, retried until the storage answers again or
    that many seconds pass; each failed attempt's storage is closed."""
    give_up = time.time() + patience
    while True:
        storage = None
        try:
            storage = open_storage(session.storage, on_stale_trial=trial_trackers.stale_trial)
            return storage, open_study(session.spec, storage, worker=worker, session_seed=session.session_seed,
                                       stream=stream)
        except Exception as error:
            if storage is not None:
                close_storage(storage)
            if not (isinstance(error, StorageError) or storage_loss(error)) or time.time() >= give_up:
                raise
            time.sleep(2)


def _retry_lost_trial(study: optuna.Study, number: int, trial_trackers) -> None:
    """The trial that was running when the storage went: FAIL it if it is still RUNNING, mark its run,
    and queue its parameters again (it resumes from its checkpoint). Left alone: a trial recorded
    before the loss (COMPLETE, PRUNED, or FAIL with its own reason), and one already re-queued (by
    another worker, or by Optuna's heartbeat retry)."""
    trials = study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == number), None)
    if trial is None or trial.state not in (TrialState.RUNNING, TrialState.FAIL):
        return
    if attrs.FAIL_REASON in trial.user_attrs or trial.user_attrs.get(attrs.INTERRUPTED):
        return  # diverged, out of memory or Ctrl-C: it ended for its own reason
    if any(t.user_attrs.get(attrs.RETRY_OF) == number or t.system_attrs.get("failed_trial") == number for t in trials):
        return
    if trial.state == TrialState.RUNNING:
        try:
            study.tell(number, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another worker found it stale and failed it first; Optuna re-queues it
    trial_trackers.stale_trial(study, trial, reason="the study storage was lost during this trial; it is retried")
    study.enqueue_trial(trial.params, user_attrs=attrs.retry_attrs(trial))
