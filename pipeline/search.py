"""Optuna: the study, the objective (through the shared trainer), worker processes, the session summary.

Pruning lives in the trainer's ``on_epoch_end`` callback: report the epoch's validation
accuracy, ask the pruner, raise ``optuna.TrialPruned``. The trainer stays Optuna-free.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import statistics
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, replace

import optuna
import sqlalchemy.exc
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pipeline.checkpoints import NoCheckpoint, TrialCheckpoint
from pipeline.data import FashionMNIST, Splits, load_fashion_mnist, make_splits
from pipeline.device import configure_cpu_threads, pick_device
from pipeline.interrupts import InterruptGate
from pipeline.progress import NoBar, clock, epoch_bar
from pipeline.stores import StorageError, database_problem, first_line, open_storage
from pipeline.study_file import StudySpec, load_study
from pipeline.train import EpochMetrics, NonFiniteLossError, train
from pipeline.tracking import NullSessionTracker, NullTrialTracker

# Trials that count towards a study's target: complete or pruned (FAIL does not; its retry will).
COMPLETE_OR_PRUNED = (TrialState.COMPLETE, TrialState.PRUNED)
# Errors that end one trial as FAIL, with the reason, while the study goes on.
TRIAL_ERRORS = (NonFiniteLossError, torch.OutOfMemoryError, MemoryError)
# The storage went away (a database restart, a network cut): the worker waits for it, then goes on.
# A query cut short leaves its session needing a rollback, which is what the next one raises.
STORAGE_LOST = (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError, sqlalchemy.exc.PendingRollbackError)
RECONNECT_SECONDS = 120
MAX_STORAGE_LOSSES = 3  # in a row, with no session round finished between them: not a blip, give up
WORKER_NAME = f"{socket.gethostname()}:{os.getpid()}"


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, worker: int = 0) -> optuna.Study:
    """Create the study or load it (``load_if_exists``): running `make tune` again continues it."""
    study = optuna.create_study(
        study_name=spec.name, storage=storage, direction=spec.direction,
        sampler=spec.make_sampler(worker), pruner=spec.make_pruner(), load_if_exists=True,
    )
    return study


def prepare_study(spec: StudySpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Once per session, before any worker starts: create the study, record what it is (the dashboard
    shows these attributes, and names the objective's axis), enqueue the study file's known
    configurations on a new study, and re-queue trials a Ctrl-C interrupted."""
    study = open_study(spec, storage)
    study.set_metric_names([spec.objective])
    family = "searched" if "model" in {p.name for p in spec.space} else spec.base_config().model
    for key, value in (("description", spec.description), ("model_family", family),
                       ("sampler", spec.sampler["name"]), ("pruner", spec.pruner["name"]),
                       ("study_file", str(spec.path))):
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    if not study.get_trials(deepcopy=False):
        for params in [*warm_start_params(spec, storage), *spec.enqueue]:
            study.enqueue_trial(params, skip_if_exists=True)
    _requeue_interrupted(study)
    return study


def warm_start_params(spec: StudySpec, storage: optuna.storages.BaseStorage) -> list[dict]:
    """The parameters of the earlier study's best complete trials (`[warm_start]`) that lie in this
    study's space, best first; none, with a note, when that study is not in the storage."""
    if spec.warm_start is None:
        return []
    name, wanted = spec.warm_start["study"], spec.warm_start["best"]
    try:
        earlier = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        print(f"note: warm start: no study {name!r} in this storage yet; starting from the study file alone",
              flush=True)
        return []
    complete = sorted(earlier.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: t.value, reverse=earlier.direction == optuna.study.StudyDirection.MAXIMIZE)
    chosen = []  # what this study searches of each; what it searches and the earlier one did not is sampled
    for params in (spec.in_space(t.params) for t in complete):
        if params and spec.fits(params) and params not in chosen:
            chosen.append(params)
    print(f"warm start: {len(chosen[:wanted])} best configurations of study {name!r} queued first", flush=True)
    return chosen[:wanted]


def _requeue_interrupted(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") and trial.number not in requeued:
            if is_final_run(trial):
                continue  # an interrupted final phase runs again at the end of the next session, fitted to its time
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def quiet_optuna() -> None:
    """Our progress line replaces Optuna's per-trial log; heartbeats are marked experimental but are
    the documented way to recover trials of killed workers."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's reason is on our line
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def _no_deferral(raise_after: bool = True):
    return nullcontext()


class Objective:
    """Train one sampled configuration; report each epoch's validation accuracy; prune on request.

    The dataset is loaded once per worker process and the splits made once per distinct
    (val_size, train_subset), not per trial. ``new_tracker()`` gives each trial its tracker: an
    MLflow run, or a tracker that does nothing. ``deferred`` (an InterruptGate's) holds a Ctrl-C
    while the trial writes to the stores.
    """

    def __init__(self, spec: StudySpec, dataset: FashionMNIST, device, new_tracker=NullTrialTracker,
                 deferred=_no_deferral, new_bar=None, checkpoints: bool = False):
        self.spec = spec
        self.dataset = dataset
        self.device = device
        self.new_tracker = new_tracker
        self.deferred = deferred
        self.new_bar = new_bar or (lambda trial_number, epochs: NoBar())  # (trial number, epochs) -> a bar
        self.checkpoints = checkpoints  # per-epoch checkpoints, so a retried trial resumes (checkpoints.py)
        self.run_tags = {"device": str(device), "dataset": dataset.kind, "dataset_checksum": dataset.checksum}
        self._splits: dict[tuple[int, int], Splits] = {}
        self.current_trial: int | None = None  # the number of the trial running, or last run

    def splits_for(self, val_size: int, train_subset: int) -> Splits:
        key = (val_size, train_subset)
        if key not in self._splits:
            self._splits[key] = make_splits(self.dataset, val_size=val_size, train_subset=train_subset).to(self.device)
        return self._splits[key]

    def __call__(self, trial: optuna.Trial) -> float:
        self.current_trial = trial.number
        config = self.spec.config_for(trial)
        splits = self.splits_for(config.val_size, config.train_subset)
        started = time.perf_counter()
        tracker = self.new_tracker()
        checkpoint = self.checkpoint_for(trial, config)
        resumed = checkpoint.load()
        epochs_run = resumed_epochs = resumed["epoch"] if resumed else 0
        with self.deferred():
            trial.set_user_attr("max_epochs", config.epochs)  # what it runs unless pruned (--set may change it)
            trial.set_user_attr("worker", WORKER_NAME)  # which machine and process: sessions may share a study
            tracker.start(trial.number, config, trial.params, self.run_tags)
            _set_user_attrs(trial, tracker.trial_attributes())  # the run's id: the link goes both ways
            if resumed:
                # The epochs an earlier run of these parameters finished: the pruner and the run see them too.
                trial.set_user_attr("resumed_from", f"{checkpoint.resumed_from.stem}, epoch {resumed['epoch']}")
                for metrics in map(lambda m: EpochMetrics(**m), resumed["history"]):
                    tracker.log_epoch(metrics)
                    trial.report(metrics.val_accuracy, metrics.epoch)

        def on_epoch_end(epoch, metrics):
            nonlocal epochs_run
            epochs_run = epoch
            bar.update(epoch, metrics.val_accuracy)
            with self.deferred():
                tracker.log_epoch(metrics)
                trial.report(metrics.val_accuracy, epoch)
                # A final-phase trial's stretched schedule is behind shorter trials mid-way, by design.
                prune = not is_final_run(trial) and trial.should_prune()
                if prune:
                    tracker.pruned(epoch)
            if prune:
                raise optuna.TrialPruned(f"pruned after epoch {epoch} at val_accuracy {metrics.val_accuracy:.4f}")

        bar = self.new_bar(trial.number, config.epochs)  # closed in the finally below
        try:
            result = train(config, splits, device=self.device, on_epoch_end=on_epoch_end, resume_from=resumed,
                           on_checkpoint=checkpoint.save)
            # The model is logged only when the trial beats the study's best so far: the best trial
            # always has one, and the cost stays off the trials that cannot be promoted. A Ctrl-C
            # from here on waits for the trial to be told COMPLETE.
            with self.deferred(raise_after=False):
                model_uri = tracker.complete(result, splits,
                                             log_model=_improves_on_best(trial, result.best_val_accuracy))
        except TRIAL_ERRORS as error:
            checkpoint.remove()
            reason = str(error) if isinstance(error, NonFiniteLossError) else _out_of_memory(error, self.device)
            with self.deferred():
                trial.set_user_attr("fail_reason", reason)
                tracker.failed(reason)
            raise
        except KeyboardInterrupt:
            with self.deferred(raise_after=False):  # a second Ctrl-C must not stop the bookkeeping
                trial.set_user_attr("interrupted", True)  # the next session runs these parameters again
                tracker.failed("interrupted (Ctrl-C)")
            raise
        except optuna.TrialPruned:
            checkpoint.remove()
            raise
        except Exception as error:  # kept: a trial that lost its storage is retried (see _work)
            with self.deferred():
                tracker.failed(repr(error))
            raise
        finally:
            bar.close()  # before the trial's line is printed
            with self.deferred(raise_after=False):
                trial.set_user_attr("epochs_run", epochs_run)
                seconds = time.perf_counter() - started
                trial.set_user_attr("seconds", round(seconds, 2))
                if epochs_run > resumed_epochs:  # this run's pace, MLflow included: what a final phase plans with
                    trial.set_user_attr("epoch_seconds", round(seconds / (epochs_run - resumed_epochs), 3))
                _set_user_attrs(trial, tracker.trial_attributes())  # with its seconds inside MLflow calls
        with self.deferred(raise_after=False):
            trial.set_user_attr("best_epoch", result.best_epoch)
            if model_uri:
                trial.set_user_attr("model_uri", model_uri)
        checkpoint.remove()
        return result.best_val_accuracy

    def checkpoint_for(self, trial: optuna.Trial, config):
        if not self.checkpoints:
            return NoCheckpoint()
        identity = {"params": trial.params, "config": config.to_dict(), "device": self.device.type}
        return TrialCheckpoint.for_trial(self.spec.name, trial.number, earlier_runs(trial), identity)


def earlier_runs(trial: optuna.Trial) -> list[int]:
    """The trials that ran these parameters before this one, oldest first: Optuna's heartbeat retries
    (system attribute `retry_history`) and our Ctrl-C re-queue (user attribute `retry_of`)."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    # A heartbeat retry copies the stale trial's user attributes, so a `retry_of` there is the older one.
    earlier = [frozen.user_attrs["retry_of"]] if "retry_of" in frozen.user_attrs else []
    return earlier + RetryHeartbeatStaleTrialCallback.retry_history(frozen)


def _out_of_memory(error: BaseException, device) -> str:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the next trial the memory this one held
    return f"out of memory ({first_line(error)}); lower batch_size or the layer widths"


def _set_user_attrs(trial: optuna.Trial, attributes: dict) -> None:
    for key, value in attributes.items():
        trial.set_user_attr(key, value)


def _improves_on_best(trial: optuna.Trial, value: float) -> bool:
    try:
        return value > trial.study.best_value
    except ValueError:  # no complete trial yet
        return True


@dataclass(frozen=True)
class Session:
    """What one `make tune` asks for."""

    study_file: str
    storage: str
    target_trials: int  # complete + pruned trials the whole study should reach, across sessions and workers
    timeout: float | None  # seconds for this session
    workers: int = 1
    device: str = "auto"
    settings: tuple[tuple[str, str], ...] = ()  # (field, value) pairs that override the study file's fixed ones
    final_phase: bool = True  # run the study file's [final] phase, if it has one

    def load_spec(self) -> StudySpec:
        return load_study(self.study_file).with_settings(dict(self.settings))


def run_session(session: Session, tracker=None) -> dict:
    """Run or resume the study until it has ``target_trials`` complete or pruned trials or
    ``timeout`` passes; return the summary. ``tracker`` is a SessionTracker (MLflow runs, figures,
    promotion) or, by default, a NullSessionTracker. Ctrl-C ends the running trials (as FAIL,
    re-queued next time) and raises KeyboardInterrupt once every worker has stopped."""
    tracker = tracker or NullSessionTracker()
    study, started = None, time.time()
    try:
        spec = session.load_spec()
        quiet_optuna()
        study = prepare_study(spec, open_storage(session.storage))
        trial_trackers = tracker.trial_trackers()
        search = replace(session, timeout=_search_timeout(session, spec))
        if session.workers == 1:
            _work(search, trial_trackers, worker=0, started=started)
        else:
            _run_worker_processes(search, trial_trackers, started)
        if spec.final and session.final_phase:
            _final_phase(session, spec, study, trial_trackers, started)
    except BaseException as error:  # the parent run ends with the session, never left RUNNING
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        tracker.finish(study, summarize(study, spec, seconds=time.time() - started) if study else None, status=status)
        raise
    summary = summarize(study, spec, seconds=time.time() - started)
    promotion = tracker.promote(study)
    if promotion:
        summary["promotion"] = promotion
    tracker.finish(study, summary)
    summary.update(tracker.summary_fields())
    summary["session_seconds"] = round(time.time() - started, 1)
    return summary


def is_final_run(trial) -> bool:
    """Whether ``trial`` (running or frozen) is a final-phase run: a trial's configuration retrained longer."""
    return "final_of" in trial.user_attrs


def _search_timeout(session: Session, spec: StudySpec) -> float | None:
    """The session's timeout less what the final phase keeps for itself (at most half of it)."""
    if session.timeout is None or not (spec.final and session.final_phase):
        return session.timeout
    return session.timeout - min(spec.final["seconds"], session.timeout / 2)


def _final_phase(session: Session, spec: StudySpec, study: optuna.Study, trial_trackers, started: float) -> None:
    """Retrain the best trial's configuration for longer, as one more trial of the study (so the
    dashboard, MLflow and promotion see it like any other): as many epochs as fit the time left at
    the best trial's pace, at most `final.max_epochs`, and more than the trial ran, or not at all.
    OneCycle and cosine stretch to the new length. It becomes the study's best, and the candidate
    for promotion, only if its validation accuracy beats the trial's. Once per best trial."""
    trials = study.get_trials(deepcopy=False)
    try:
        best = study.best_trial
    except ValueError:
        return  # no complete trial to retrain
    # Done already: the best is a final run, or one for it ran (a failed or interrupted one does not count).
    if is_final_run(best) or any(t.user_attrs.get("final_of") == best.number and t.state != TrialState.FAIL
                                            for t in trials):
        return
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    if waiting:  # Optuna runs queued trials oldest first: they come before a final run
        print(f"final phase: skipped, {waiting} queued trials still to run (the next session runs them, then "
              f"this phase)", flush=True)
        return
    pace = best.user_attrs.get("epoch_seconds")  # seconds an epoch, MLflow included
    if not pace:
        print(f"final phase: skipped, trial {best.number} did not record its pace (epoch_seconds)", flush=True)
        return
    epochs = spec.final["max_epochs"]
    if session.timeout is not None:
        epochs = min(epochs, max(0, int((started + session.timeout - time.time()) / pace)))
    trained = best.user_attrs.get("max_epochs", spec.max_epochs)
    if epochs <= trained:
        print(f"final phase: skipped, {epochs} epochs fit the time left and trial {best.number} ran "
              f"{trained}", flush=True)
        return
    print(f"final phase: trial {best.number}'s configuration ({best.value:.2%} validation) retrained for "
          f"{epochs} epochs, about {clock(epochs * pace)}", flush=True)
    study.enqueue_trial(best.params, user_attrs={"final_of": best.number, "final_epochs": epochs})
    final = replace(session, workers=1, timeout=None, target_trials=_count_complete_or_pruned(study) + 1)
    _work(final, trial_trackers, worker=0, started=started)


def _run_worker_processes(session: Session, trial_trackers, started: float) -> None:
    # spawn, not fork: each worker starts clean (own CUDA context, own SQLite connections).
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_entry, args=(session, trial_trackers, i, started), name=f"worker-{i}")
                 for i in range(session.workers)]
    for process in processes:
        process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:  # a terminal sends SIGINT to all; `kill -INT` reaches only us
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT)
        for process in processes:
            process.join(timeout=60)
        raise
    crashed = [f"{p.name} (exit code {p.exitcode})" for p in processes if p.exitcode != 0]
    if crashed:  # its traceback is above; the session must not look like a success
        raise WorkerFailed(f"{', '.join(crashed)} stopped on an error (its traceback is above); finished trials "
                           f"are kept: run the same command again to continue")


class WorkerFailed(RuntimeError):
    """A worker process ended on an unexpected error."""


def _worker_entry(session: Session, trial_trackers, worker: int, started: float) -> None:
    try:
        _work(session, trial_trackers, worker=worker, started=started)
    except KeyboardInterrupt:
        pass  # the parent reports the interruption


def _work(session: Session, trial_trackers, *, worker: int, started: float) -> None:
    """One worker: load the data once, then run trials until the study's target or the deadline."""
    spec = session.load_spec()
    device = pick_device(session.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", worker % torch.cuda.device_count())  # one worker per GPU
    configure_cpu_threads(session.workers)
    quiet_optuna()
    study = _open_for_worker(session, spec, trial_trackers, worker)
    objective = None
    deadline = None if session.timeout is None else started + session.timeout
    gate = InterruptGate()
    losses_in_a_row = 0
    while True:
        try:
            # Failed trials do not count towards the target, so go round until enough have finished.
            remaining = session.target_trials - _count_complete_or_pruned(study)
            seconds_left = None if deadline is None else deadline - time.time()
            if remaining <= 0 or (seconds_left is not None and seconds_left <= 0):
                return
            if objective is None:
                def new_bar(trial_number, epochs):  # one line per worker on a terminal
                    return epoch_bar(epochs, description=f"trial {trial_number}", deadline=deadline, position=worker)

                objective = Objective(spec, load_fashion_mnist(), device, trial_trackers, gate.deferred, new_bar,
                                      checkpoints=True)
            before = _count_complete_or_pruned(study)
            failed_before = _count_failed(study)
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
                        gate.after_trial,
                    ],
                )
        except Exception as error:
            lost = _storage_loss(error)
            losses_in_a_row += 1
            if lost is None or losses_in_a_row > MAX_STORAGE_LOSSES:
                raise
            print(f"worker {worker}: lost the study storage ({database_problem(session.storage, lost)}); "
                  f"waiting up to {RECONNECT_SECONDS} s for it to come back", flush=True)
            study = _open_for_worker(session, spec, trial_trackers, worker, patience=RECONNECT_SECONDS)
            if objective is not None and objective.current_trial is not None:
                _retry_lost_trial(study, objective.current_trial, trial_trackers)
            continue
        losses_in_a_row = 0
        out_of_time = deadline is not None and time.time() >= deadline
        if _count_complete_or_pruned(study) == before and not out_of_time:
            failed = _count_failed(study) - failed_before
            print(f"worker {worker}: {failed} trials in a row failed; stopping", flush=True)
            return


def _storage_loss(error: BaseException | None) -> BaseException | None:
    """The lost connection behind ``error``, raised as it is or wrapped (Optuna raises a
    StorageInternalError from it); None when the error is something else."""
    while error is not None:
        if isinstance(error, STORAGE_LOST):
            return error
        error = error.__cause__ or error.__context__
    return None


def _open_for_worker(session: Session, spec: StudySpec, trial_trackers, worker: int, patience: float = 0):
    """The study, through a storage whose stale-trial callback also marks the trial's MLflow run;
    with ``patience``, retried until the storage answers again or that many seconds pass."""
    give_up = time.time() + patience
    while True:
        try:
            return open_study(spec, open_storage(session.storage, on_stale_trial=trial_trackers.stale_trial),
                              worker=worker)
        except Exception as error:
            if not (isinstance(error, StorageError) or _storage_loss(error)) or time.time() >= give_up:
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
    if "fail_reason" in trial.user_attrs or trial.user_attrs.get("interrupted"):
        return  # diverged, out of memory or Ctrl-C: it ended for its own reason
    if any(t.user_attrs.get("retry_of") == number or t.system_attrs.get("failed_trial") == number for t in trials):
        return
    if trial.state == TrialState.RUNNING:
        try:
            study.tell(number, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another worker found it stale and failed it first; Optuna re-queues it
    trial_trackers.stale_trial(study, trial, reason="the study storage was lost during this trial; it is retried")
    study.enqueue_trial(trial.params, user_attrs={"retry_of": number})


def _count_complete_or_pruned(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COMPLETE_OR_PRUNED))


def _count_failed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


class ProgressLine:
    """After each trial: what it did, the best so far, counts by state, elapsed time."""

    def __init__(self, started: float, max_epochs: int):
        self.started = started
        self.max_epochs = max_epochs

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        counts = Counter(t.state for t in study.get_trials(deepcopy=False))
        epochs = trial.user_attrs.get("epochs_run", 0)
        if trial.state == TrialState.COMPLETE:
            outcome = f"val {trial.value:.4f} after {epochs} epochs"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned at epoch {epochs}/{self.max_epochs}"
        else:
            outcome = f"failed: {trial.user_attrs.get('fail_reason') or trial.system_attrs.get('fail_reason', '?')}"
        try:
            best = f"best {study.best_value:.4f} (#{study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        print(f"trial {trial.number:3d} {trial.state.name:8s} {outcome:32s} | {best} | "
              f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
              f"{counts[TrialState.FAIL]} failed | {clock(time.time() - self.started)}", flush=True)


def epoch_counts(trials, *, default_max_epochs: int | None = None) -> tuple[int, int]:
    """Epochs the complete and pruned trials ran, and what they would have run without pruning (each
    its maximum epochs; a trial recorded before `max_epochs` existed counts ``default_max_epochs``, or
    what it ran when that is not known). Used by `make tune`'s summary and by `make compare`."""
    finished = [t for t in trials if t.state in COMPLETE_OR_PRUNED]
    run = sum(t.user_attrs.get("epochs_run", 0) for t in finished)
    unpruned = sum(t.user_attrs.get("max_epochs", default_max_epochs or t.user_attrs.get("epochs_run", 0))
                   for t in finished)
    return run, unpruned


def epochs_below_median(trials) -> tuple[int, int]:
    """Epochs the finished trials spent, and how many of them went to trials that ended below the
    median of the finished trials' final values (a pruned trial's is its last report): the share of
    the budget a search spent on configurations it ends up ranking in its worse half."""
    finished = [t for t in trials if t.state in COMPLETE_OR_PRUNED and _final_value(t) is not None]
    if not finished:
        return 0, 0
    median = statistics.median(_final_value(t) for t in finished)
    below = sum(t.user_attrs.get("epochs_run", 0) for t in finished if _final_value(t) < median)
    return below, sum(t.user_attrs.get("epochs_run", 0) for t in finished)


def _final_value(trial) -> float | None:
    if trial.state == TrialState.COMPLETE:
        return trial.value
    return trial.intermediate_values[trial.last_step] if trial.last_step is not None else None


def summarize(study: optuna.Study, spec: StudySpec, *, seconds: float) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    finished = [t for t in trials if t.state in COMPLETE_OR_PRUNED]
    epochs_run, epochs_unpruned = epoch_counts(trials, default_max_epochs=spec.max_epochs)
    summary = {
        "study": spec.name,
        "trials": len(trials),
        "states": dict(counts),
        "epochs_run": epochs_run,
        "epochs_unpruned": epochs_unpruned,
        "epochs_below_median": epochs_below_median(trials)[0],
        "session_seconds": round(seconds, 1),
        "best_trial": None,
    }
    tracked = [t for t in finished if "tracking_seconds" in t.user_attrs]
    if tracked:
        # What MLflow cost the study's trials: their seconds in MLflow calls out of their seconds in all.
        summary["trial_tracking_seconds"] = round(sum(t.user_attrs["tracking_seconds"] for t in tracked), 1)
        summary["tracked_trial_seconds"] = round(sum(t.user_attrs["seconds"] for t in tracked), 1)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        summary["best_trial"] = {"number": best.number, "val_accuracy": best.value, "params": best.params,
                                 "best_epoch": best.user_attrs.get("best_epoch"),
                                 "final_of": best.user_attrs.get("final_of")}
    finals = [t for t in complete if is_final_run(t)]
    if finals:
        final = finals[-1]
        retrained = next(t for t in trials if t.number == final.user_attrs["final_of"])
        summary["final"] = {"number": final.number, "epochs": final.user_attrs["final_epochs"],
                            "val_accuracy": final.value, "of": retrained.number, "of_val_accuracy": retrained.value,
                            "of_epochs": retrained.user_attrs.get("epochs_run")}
    return summary


def format_summary(summary: dict) -> str:
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary["states"].items())) or "none"
    lines = [f"Study {summary['study']}: {summary['trials']} trials ({states})"]
    best = summary["best_trial"]
    if best:
        lines.append(f"Best: trial {best['number']}, validation accuracy {best['val_accuracy']:.2%} "
                     f"(epoch {best['best_epoch']})")
        lines += [f"  {name} = {value}" for name, value in best["params"].items()]
    final = summary.get("final")
    if final:
        if summary["best_trial"]["number"] == final["number"]:
            verdict = "the study's best"
        else:
            verdict = "better" if final["val_accuracy"] > final["of_val_accuracy"] else "no better"
            verdict += f", but trial {summary['best_trial']['number']} is the study's best"
        lines.append(f"Final phase: trial {final['number']} retrained trial {final['of']} for {final['epochs']} epochs "
                     f"(it ran {final['of_epochs']}): {final['val_accuracy']:.2%} against {final['of_val_accuracy']:.2%}, "
                     f"{verdict}")
    unpruned = summary["epochs_unpruned"]
    if unpruned:
        saved = unpruned - summary["epochs_run"]
        lines.append(f"Epochs: {summary['epochs_run']} run of {unpruned} that the finished trials "
                     f"could have used: pruning saved {saved} ({saved / unpruned:.0%})")
    if summary["epochs_run"]:
        below = summary["epochs_below_median"]
        lines.append(f"Epochs on trials that ended below the median: {below} of {summary['epochs_run']} "
                     f"({below / summary['epochs_run']:.0%})")
    lines.append(f"Wall time this session: {clock(summary['session_seconds'])}")
    if "trial_tracking_seconds" in summary:
        in_trials, of = summary["trial_tracking_seconds"], summary["tracked_trial_seconds"]
        line = f"MLflow tracking: {in_trials:.1f} s of the finished trials' {of:.0f} s ({in_trials / of:.1%})"
        if "session_tracking_seconds" in summary:
            line += f", and {summary['session_tracking_seconds']:.1f} s this session for its run and promotion"
        lines.append(line)
    promotion = summary.get("promotion")
    if promotion:
        lines.append(f"Registry: {promotion['model']} version {promotion['version']} "
                     f"({promotion['val_accuracy']:.2%} validation): {promotion['outcome']}")
    return "\n".join(lines)

