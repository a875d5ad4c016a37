"""One `make tune`: prepare the study, run its workers within the session's budget, then the final
phase (the best configuration retrained for the time kept for it), promotion and the summary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import optuna
from optuna.trial import TrialState

from pipeline.errors import first_line
from pipeline.progress import clock
from pipeline import attrs
from pipeline.search.study import prepare_study, quiet_optuna
from pipeline.search.study_file import FINAL_PHASE, StudySpec, new_session_seed
from pipeline.search.summary import count_complete_or_pruned, epochs_that_fit, summarize
from pipeline.search.workers import run_worker_processes, work
from pipeline.stores import close_storage, open_storage
from pipeline.tracking.runs import NullSessionTracker


@dataclass(frozen=True)
class Session:
    """What one `make tune` asks for. ``spec`` is the study file as validated when the session
    started (with its `--set` settings): editing the file mid-session changes nothing in it."""

    spec: StudySpec
    storage: str
    target_trials: int  # complete + pruned trials the whole study should reach, across sessions and workers
    timeout: float | None  # seconds for this session
    workers: int = 1
    device: str = "auto"
    final_phase: bool = True  # run the study file's [final] phase, if it has one
    promote: bool = True  # register the best model and offer it as champion (a baseline is not offered)
    # Seeds this session's samplers (with the study's seed and the worker): each session draws its own
    # configurations. Recorded on the session's run and its trials; `tune --session-seed` replays one.
    session_seed: int = field(default_factory=new_session_seed)


def run_session(session: Session, tracker=None) -> dict:
    """Run or resume the study until it has ``target_trials`` complete or pruned trials or
    ``timeout`` passes; return the summary. ``tracker`` is a SessionTracker (MLflow runs, figures,
    promotion) or, by default, a NullSessionTracker. Ctrl-C ends the running trials (as FAIL,
    re-queued next time) and raises KeyboardInterrupt once every worker has stopped. Whatever
    fails, promotion included, the parent run ends (FAILED, or KILLED on Ctrl-C) and the first error
    is the one raised."""
    tracker = tracker or NullSessionTracker()
    spec, storage, study, started = session.spec, None, None, time.time()
    try:
        try:
            quiet_optuna()
            storage = open_storage(session.storage)
            study = prepare_study(spec, storage)
            trial_trackers = tracker.trial_trackers()
            search = replace(session, timeout=_search_timeout(session))
            if session.workers == 1:
                work(search, trial_trackers, worker=0, started=started)
            else:
                run_worker_processes(search, trial_trackers, started)
            if spec.final and session.final_phase:
                _final_phase(session, study, trial_trackers, started)
            summary = summarize(study, max_epochs=spec.max_epochs, seconds=time.time() - started)
            promotion = tracker.promote(study) if session.promote else None
        except BaseException as error:  # the parent run ends with the session, never left RUNNING
            _finish_after(error, tracker, study, spec, started)
            raise
        if promotion:
            summary["promotion"] = promotion
        tracker.finish(study, summary)  # its figures read the study: the storage closes after
    finally:
        if storage is not None:
            close_storage(storage)
    summary.update(tracker.summary_fields())
    summary["session_seconds"] = round(time.time() - started, 1)
    summary["session_seed"] = session.session_seed
    return summary


def _finish_after(error: BaseException, tracker, study, spec: StudySpec, started: float) -> None:
    """End the parent run of a session that ``error`` ended, with what can still be summarized; a
    failure on the way is a note, so that ``error``, the cause, is what the user sees."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    summary = None
    try:
        if study is not None:
            summary = summarize(study, max_epochs=spec.max_epochs, seconds=time.time() - started)
    except Exception as summary_error:  # the storage that failed the session may fail this too
        print(f"note: the session's summary could not be read ({first_line(summary_error)})", flush=True)
    try:
        tracker.finish(study, summary, status=status)
    except Exception as finish_error:
        print(f"note: the session's MLflow run was not ended {status} ({first_line(finish_error)}); the next "
              f"session's start ends it", flush=True)


def _search_timeout(session: Session) -> float | None:
    """The session's timeout less what the final phase keeps for itself (at most half of it)."""
    final = session.spec.final
    if session.timeout is None or not (final and session.final_phase):
        return session.timeout
    return session.timeout - min(final.seconds, session.timeout / 2)


def _final_phase(session: Session, study: optuna.Study, trial_trackers, started: float) -> None:
    """Retrain the best trial's configuration for longer, as one more trial of the study (so the
    dashboard, MLflow and promotion see it like any other): as many epochs as fit the time left at
    the best trial's pace, at most `final.max_epochs`, and more than the trial ran, or not at all.
    OneCycle and cosine stretch to the new length. It becomes the study's best, and the candidate
    for promotion, only if its validation accuracy beats the trial's. Once per best trial."""
    spec = session.spec
    trials = study.get_trials(deepcopy=False)
    try:
        best = study.best_trial
    except ValueError:
        return  # no complete trial to retrain
    # Done already: the best is a final run, or one for it ran (a failed or interrupted one does not count).
    if attrs.is_final_run(best) or any(t.user_attrs.get(attrs.FINAL_OF) == best.number and t.state != TrialState.FAIL
                                       for t in trials):
        return
    waiting = sum(t.state == TrialState.WAITING for t in trials)
    if waiting:  # Optuna runs queued trials oldest first: they come before a final run
        print(f"final phase: skipped, {waiting} queued trials still to run (the next session runs them, then "
              f"this phase)", flush=True)
        return
    pace = best.user_attrs.get(attrs.EPOCH_SECONDS)  # seconds an epoch, MLflow included
    if not pace:
        print(f"final phase: skipped, trial {best.number} did not record its pace ({attrs.EPOCH_SECONDS})", flush=True)
        return
    epochs = spec.final.max_epochs
    if session.timeout is not None:
        epochs = epochs_that_fit(started + session.timeout - time.time(), pace, cap=epochs)
    trained = best.user_attrs.get(attrs.MAX_EPOCHS, spec.max_epochs)
    if epochs <= trained:
        print(f"final phase: skipped, {epochs} epochs fit the time left and trial {best.number} ran "
              f"{trained}", flush=True)
        return
    print(f"final phase: trial {best.number}'s configuration ({best.value:.2%} validation) retrained for "
          f"{epochs} epochs, about {clock(epochs * pace)}", flush=True)
    study.enqueue_trial(best.params, user_attrs={attrs.FINAL_OF: best.number, attrs.FINAL_EPOCHS: epochs,
                                                 attrs.QUEUED_AT: time.time()})
    final = replace(session, workers=1, timeout=None, target_trials=count_complete_or_pruned(study) + 1)
    # Its own sampler stream: should another session take the queued run first, this worker samples
    # a trial, which must not repeat the first one the session's worker 0 drew.
    work(final, trial_trackers, worker=0, started=started, phase=FINAL_PHASE)
