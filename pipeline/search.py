"""Optuna: storage, the objective (through the shared trainer), worker processes, the session summary.

Pruning lives in the trainer's ``on_epoch_end`` callback: report the epoch's validation
accuracy, ask the pruner, raise ``optuna.TrialPruned``. The trainer stays Optuna-free.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import warnings
from collections import Counter
from dataclasses import dataclass, replace

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from pipeline.data import FashionMNIST, Splits, load_fashion_mnist, make_splits
from pipeline.device import configure_cpu_threads, pick_device
from pipeline.interrupts import InterruptGate
from pipeline.study_file import STUDIES_DIR, StudySpec, load_study
from pipeline.train import NonFiniteLossError, train
from pipeline.tracking import NullTrialTracker

STORAGE_ENV = "OPTUNA_STORAGE"
DEFAULT_STORAGE = f"sqlite:///{STUDIES_DIR / 'optuna.db'}"  # one file: the dashboard shows every study
HEARTBEAT_SECONDS = 10  # a RUNNING trial whose worker stops beating for GRACE_SECONDS is failed and retried
GRACE_SECONDS = 30
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def storage_url(requested: str | None = None) -> str:
    """--storage, else $OPTUNA_STORAGE, else the SQLite file under studies/."""
    return requested or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage (SQLite, PostgreSQL, MySQL) with heartbeats, or a journal file for a path."""
    quiet_optuna()
    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,  # SQLite: wait for a busy writer instead of "database is locked"
        heartbeat_interval=HEARTBEAT_SECONDS,
        grace_period=GRACE_SECONDS,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
    )


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, worker: int = 0) -> optuna.Study:
    """Create the study or load it (``load_if_exists``): running `make tune` again continues it."""
    study = optuna.create_study(
        study_name=spec.name, storage=storage, direction=spec.direction,
        sampler=spec.make_sampler(worker), pruner=spec.make_pruner(), load_if_exists=True,
    )
    return study


def prepare_study(spec: StudySpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Once per session, before any worker starts: create the study, record what it is, enqueue the
    study file's known configurations on a new study, and re-queue trials a Ctrl-C interrupted."""
    study = open_study(spec, storage)
    if not study.get_trials(deepcopy=False):
        study.set_user_attr("description", spec.description)
        study.set_user_attr("study_file", str(spec.path))
        for params in spec.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
    _requeue_interrupted(study)
    return study


def _requeue_interrupted(study: optuna.Study) -> None:
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get("retry_of") for t in trials}
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted") and trial.number not in requeued:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def quiet_optuna() -> None:
    """Our progress line replaces Optuna's per-trial log; heartbeats are marked experimental but are
    the documented way to recover trials of killed workers."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's reason is on our line
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class Objective:
    """Train one sampled configuration; report each epoch's validation accuracy; prune on request.

    The dataset is loaded once per worker process and the splits made once per distinct
    (val_size, train_subset), not per trial.
    """

    def __init__(self, spec: StudySpec, dataset: FashionMNIST, device, new_tracker=NullTrialTracker):
        self.spec = spec
        self.dataset = dataset
        self.device = device
        self.new_tracker = new_tracker  # () -> a TrialTracker (MLflow) or a NullTrialTracker
        self._splits: dict[tuple[int, int], Splits] = {}

    def splits_for(self, val_size: int, train_subset: int) -> Splits:
        key = (val_size, train_subset)
        if key not in self._splits:
            self._splits[key] = make_splits(self.dataset, val_size=val_size, train_subset=train_subset).to(self.device)
        return self._splits[key]

    def __call__(self, trial: optuna.Trial) -> float:
        config = self.spec.config_for(trial)
        splits = self.splits_for(config.val_size, config.train_subset)
        started = time.perf_counter()
        epochs_run = 0
        tracker = self.new_tracker()
        run_id = tracker.start(trial.number, config, trial.params)
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)  # and the run carries the study and trial as tags

        def on_epoch_end(epoch, metrics):
            nonlocal epochs_run
            epochs_run = epoch
            tracker.log_epoch(metrics)
            trial.report(metrics.val_accuracy, epoch)
            if trial.should_prune():
                tracker.pruned(epoch)
                raise optuna.TrialPruned(f"pruned after epoch {epoch} at val_accuracy {metrics.val_accuracy:.4f}")

        try:
            result = train(config, splits, device=self.device, on_epoch_end=on_epoch_end)
            # The model is logged only when the trial beats the study's best so far: the best trial
            # always has one, and the cost stays off the trials that cannot be promoted.
            model_uri = tracker.complete(result, splits, log_model=_improves_on_best(trial, result.best_val_accuracy))
        except NonFiniteLossError as error:
            trial.set_user_attr("fail_reason", str(error))
            tracker.failed(str(error))
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # the next session runs these parameters again
            tracker.failed("interrupted (Ctrl-C)")
            raise
        except optuna.TrialPruned:
            raise
        except Exception as error:
            tracker.failed(repr(error))
            raise
        finally:
            trial.set_user_attr("epochs_run", epochs_run)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            if run_id:
                trial.set_user_attr("tracking_seconds", round(tracker.seconds, 2))  # of which in MLflow calls
        trial.set_user_attr("best_epoch", result.best_epoch)
        if model_uri:
            trial.set_user_attr("model_uri", model_uri)
        return result.best_val_accuracy


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
    trials: int  # the study's total of finished (complete + pruned) trials to reach
    timeout: float | None  # seconds for this session
    workers: int = 1
    device: str = "auto"
    tracking: bool = True  # MLflow runs, figures, models and promotion
    experiment_id: str | None = None  # set by run_session: where the workers' trial runs go
    parent_run_id: str | None = None


def run_session(session: Session) -> dict:
    """Run or resume the study until it has ``trials`` finished trials or ``timeout`` passes; return
    the summary. Ctrl-C ends the running trials (as FAIL, re-queued next time) and raises
    KeyboardInterrupt once every worker has stopped."""
    spec = load_study(session.study_file)
    storage = open_storage(session.storage)
    study = prepare_study(spec, storage)
    started = time.time()
    session_tracker = None
    tracking_started = time.perf_counter()
    if session.tracking:
        from pipeline.tracking import SessionTracker, configure_mlflow

        configure_mlflow()
        session_tracker = SessionTracker(spec.name, _study_tags(spec, session.storage))
        session = replace(session, experiment_id=session_tracker.experiment_id,
                          parent_run_id=session_tracker.run_id)
    session_tracking_seconds = time.perf_counter() - tracking_started
    try:
        if session.workers == 1:
            _work(session, worker=0, started=started)
        else:
            _run_worker_processes(session, started)
    except KeyboardInterrupt:
        if session_tracker:
            session_tracker.finish(study, summarize(study, spec, seconds=time.time() - started), status="KILLED")
        raise
    summary = summarize(study, spec, seconds=time.time() - started)
    if session_tracker:
        from pipeline.tracking import promote_best

        tracking_started = time.perf_counter()
        summary["promotion"] = promote_best(study, spec.name)
        session_tracker.finish(study, summary)
        summary["mlflow_parent_run_id"] = session_tracker.run_id
        # Outside the trials: the parent run, Optuna's figures, registration and aliases.
        summary["session_tracking_seconds"] = round(
            session_tracking_seconds + time.perf_counter() - tracking_started, 1)
        summary["session_seconds"] = round(time.time() - started, 1)
    return summary


def _study_tags(spec: StudySpec, storage: str) -> dict[str, str]:
    return {"study": spec.name, "sampler": spec.sampler["name"], "pruner": spec.pruner["name"],
            "optuna_storage": storage.split("@")[-1]}  # no password in a tag


def _run_worker_processes(session: Session, started: float) -> None:
    # spawn, not fork: each worker starts clean (own CUDA context, own SQLite connections).
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_worker_entry, args=(session, i, started), name=f"worker-{i}")
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


def _worker_entry(session: Session, worker: int, started: float) -> None:
    try:
        _work(session, worker=worker, started=started)
    except KeyboardInterrupt:
        pass  # the parent reports the interruption


def _work(session: Session, *, worker: int, started: float) -> None:
    spec = load_study(session.study_file)
    device = pick_device(session.device)
    if device.type == "cuda" and device.index is None:
        import torch

        device = torch.device("cuda", worker % torch.cuda.device_count())  # one worker per GPU
    configure_cpu_threads(session.workers)
    study = open_study(spec, open_storage(session.storage), worker=worker)
    objective = None
    new_tracker = NullTrialTracker
    deadline = None if session.timeout is None else started + session.timeout
    gate = InterruptGate()
    while True:
        # Failed trials do not count towards the budget, so go round until enough have finished.
        remaining = session.trials - len(study.get_trials(deepcopy=False, states=FINISHED))
        seconds_left = None if deadline is None else deadline - time.time()
        if remaining <= 0 or (seconds_left is not None and seconds_left <= 0):
            return
        if objective is None:
            dataset = load_fashion_mnist()
            if session.tracking:
                new_tracker = _trial_trackers(session, spec, device, dataset.checksum)
            objective = gate.objective(Objective(spec, dataset, device, new_tracker))
        before = len(study.get_trials(deepcopy=False, states=FINISHED))
        with gate.holding():  # Ctrl-C ends the training trial, never one Optuna is creating or telling
            study.optimize(
                objective,
                n_trials=remaining,
                timeout=seconds_left,
                catch=(NonFiniteLossError,),  # a diverged trial is FAIL with its reason; the study goes on
                callbacks=[
                    optuna.study.MaxTrialsCallback(session.trials, states=FINISHED),  # the total across workers
                    ProgressLine(started, spec.max_epochs),
                    gate.after_trial,
                ],
            )
        if len(study.get_trials(deepcopy=False, states=FINISHED)) == before:
            print(f"worker {worker}: {remaining} trials in a row failed; stopping", flush=True)
            return


def _trial_trackers(session: Session, spec: StudySpec, device, dataset_checksum: str):
    """A factory of MLflow trial trackers for this worker process, all under the session's parent run."""
    from pipeline.tracking import TrialTracker, configure_mlflow, environment_tags

    configure_mlflow()  # spawned workers start with MLflow unconfigured
    tags = {**_study_tags(spec, session.storage), **environment_tags(), "device": str(device),
            "dataset_checksum": dataset_checksum}
    return lambda: TrialTracker(session.experiment_id, session.parent_run_id, tags)


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
              f"{counts[TrialState.FAIL]} failed | {_clock(time.time() - self.started)}", flush=True)


def summarize(study: optuna.Study, spec: StudySpec, *, seconds: float) -> dict:
    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name for t in trials)
    finished = [t for t in trials if t.state in FINISHED]
    epochs_run = sum(t.user_attrs.get("epochs_run", 0) for t in finished)
    epochs_budget = len(finished) * spec.max_epochs
    summary = {
        "study": spec.name,
        "trials": len(trials),
        "states": dict(counts),
        "epochs_run": epochs_run,
        "epochs_budget": epochs_budget,  # finished trials x maximum epochs: what no pruning would cost
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
                                 "best_epoch": best.user_attrs.get("best_epoch")}
    return summary


def format_summary(summary: dict) -> str:
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary["states"].items())) or "none"
    lines = [f"Study {summary['study']}: {summary['trials']} trials ({states})"]
    best = summary["best_trial"]
    if best:
        lines.append(f"Best: trial {best['number']}, validation accuracy {best['val_accuracy']:.2%} "
                     f"(epoch {best['best_epoch']})")
        lines += [f"  {name} = {value}" for name, value in best["params"].items()]
    saved = summary["epochs_budget"] - summary["epochs_run"]
    if summary["epochs_budget"]:
        lines.append(f"Epochs: {summary['epochs_run']} run of {summary['epochs_budget']} that the finished trials "
                     f"could have used: pruning saved {saved} ({saved / summary['epochs_budget']:.0%})")
    lines.append(f"Wall time this session: {_clock(summary['session_seconds'])}")
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


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"
