"""MLflow runs: the experiment is the study, a parent run per tuning session, a nested run per trial.

Everything goes through an explicit ``MlflowClient`` and run ids, so several worker processes can
attach their trials to one parent run. ``NullSessionTracker`` and ``NullTrialTracker`` have the
real trackers' methods and do nothing: the tuning code never asks whether tracking is on; the
CLI decides which tracker it gets.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

from pipeline.training.config import TrainConfig
from pipeline.data.dataset import Splits
from pipeline.errors import first_line
from pipeline.tracking.experiments import (
    dataset_input,
    end_run,
    ensure_experiment,
    environment_tags,
    log_confusion_matrix,
    log_values,
)
from pipeline import attrs
from pipeline.training.train import EpochMetrics, TrainResult, predict_log_probs


def _timed(method):
    """Adds the method's wall time to ``self.seconds``: what tracking costs, reported by `make tune`."""

    @functools.wraps(method)
    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - started

    return timed


class TrialTracker:
    """One MLflow run per Optuna trial, nested under the session's parent run."""

    def __init__(self, experiment_id: str, parent_run_id: str, tags: dict[str, str]):
        import mlflow

        self.client = mlflow.MlflowClient()
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.tags = tags
        self.run_id: str | None = None
        self.seconds = 0.0  # spent in MLflow calls so far
        # Epoch metrics go out from a thread of our own, not through MLflow's async logging: ending a
        # run shuts MLflow's logging thread down, which waits up to 1 s for it to wake (a second per
        # trial: 9 % of a study of short pruned trials).
        self.sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-epochs")
        self.pending_epochs: list[Future] = []  # epoch metrics still being sent

    @_timed
    def start(self, trial_number: int, config: TrainConfig, sampled: dict, tags: dict[str, str], *,
              dataset=None, seen=()) -> str:
        """Open the trial's run with the full config and the sampled values as parameters, and the data
        it trains and validates on as its dataset inputs."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial_number}",
            tags={**self.tags, **tags, MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial": str(trial_number)},
        )
        self.run_id = run.info.run_id
        log_values(self.client, self.run_id, {},
                   params={**asdict(config), **{f"sampled.{k}": v for k, v in sampled.items()}})
        if seen:  # the pipeline.data.dataset.DataSeen of ``dataset`` this trial trains and validates on
            self.client.log_inputs(self.run_id, datasets=[dataset_input(dataset, part) for part in seen])
        return self.run_id

    def trial_attributes(self) -> dict:
        """What the Optuna trial records of its run: the run's id and the seconds spent in MLflow calls."""
        return {attrs.MLFLOW_RUN_ID: self.run_id, attrs.TRACKING_SECONDS: round(self.seconds, 2)}

    @_timed
    def log_epoch(self, metrics: EpochMetrics) -> None:
        """Sent in the background: training goes on while a tracking server is slow or away (MLflow
        retries for minutes); the trial's end waits for them, so its run is complete when it ends."""
        self.pending_epochs.append(self.sender.submit(
            log_values, self.client, self.run_id, {k: v for k, v in asdict(metrics).items() if k != "epoch"},
            step=metrics.epoch))

    def _sent_epochs(self) -> None:
        """At the trial's end: wait until every epoch's metrics are in the store (raising the first
        error), then let the sending thread go."""
        try:
            for sending in self.pending_epochs:
                sending.result()
        finally:
            self.pending_epochs.clear()
            self.sender.shutdown(wait=False)

    @_timed
    def complete(self, result: TrainResult, splits: Splits, *, log_model: bool) -> str | None:
        """Summary metrics, confusion matrix, per-class metrics, curves; the model when asked.
        Returns the logged model's URI, if any."""
        from pipeline.tracking.export import log_raw_pixel_model
        from pipeline.tracking.figures import learning_curves
        from pipeline.training.metrics import classification_metrics

        self._sent_epochs()
        probabilities = predict_log_probs(result.model, splits.val_images).exp().cpu().numpy()
        validation = classification_metrics(splits.val_labels.cpu().numpy(), probabilities)
        log_values(self.client, self.run_id, {"best_val_accuracy": result.best_val_accuracy,
                                              "best_epoch": result.best_epoch,
                                              "val_macro_f1": validation["macro_f1"]})
        self.client.log_dict(self.run_id, validation["per_class"], "per_class_metrics.json")
        log_confusion_matrix(self.client, self.run_id, validation["confusion_matrix"], "Validation confusion matrix",
                             "confusion_matrix")
        self.client.log_figure(self.run_id, learning_curves(result.history), "learning_curves.png")
        self.client.set_tag(self.run_id, "flip_averaged", str(result.flip_averaged).lower())
        self.client.set_tag(self.run_id, "tta", result.tta)
        model_uri = None
        if log_model:
            model_uri = log_raw_pixel_model(self.run_id, result.model, splits)
            self.client.set_tag(self.run_id, "model_uri", model_uri)
        self.client.set_terminated(self.run_id, "FINISHED")
        return model_uri

    @_timed
    def pruned(self, epoch: int) -> None:
        self._sent_epochs()
        self.client.set_tag(self.run_id, "pruned_at_epoch", str(epoch))
        self.client.set_terminated(self.run_id, "KILLED")

    @_timed
    def failed(self, reason: str) -> None:
        if self.run_id is None:
            return  # the trial ended before its run was opened
        try:
            self._sent_epochs()
        except Exception as error:  # the trial is failing already: its reason matters more than its last epochs
            print(f"note: run {self.run_id}: its last epoch metrics were not all written ({first_line(error)})",
                  flush=True)
        end_run(self.client, self.run_id, "FAILED", reason)


class NullTrialTracker:
    """Tracking off: a trial tracker with the same methods, doing nothing."""

    def start(self, trial_number, config, sampled, tags, *, dataset=None, seen=()):
        return None

    def trial_attributes(self):
        return {}

    def log_epoch(self, metrics):
        pass

    def complete(self, result, splits, *, log_model):
        return None

    def pruned(self, epoch):
        pass

    def failed(self, reason):
        pass


class NullTrialTrackers:
    """Tracking off: makes NullTrialTracker instances, and has no runs to mark when a trial goes stale."""

    def __call__(self) -> NullTrialTracker:
        return NullTrialTracker()

    def stale_trial(self, study, trial, reason=None):
        pass


@dataclass(frozen=True)
class TrialTrackers:
    """Makes a TrialTracker per trial, under one parent run. Picklable, so spawned worker processes
    get it too; the first call in a process points MLflow at the store."""

    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]

    def __call__(self) -> TrialTracker:
        _configure_once()
        return TrialTracker(self.experiment_id, self.parent_run_id, self.tags)

    def stale_trial(self, study, trial, reason: str | None = None) -> None:
        """A trial another worker ran and lost (killed: no heartbeat; or its storage went away): mark
        its MLflow run FAILED, so that no run stays RUNNING forever. Called by whichever worker fails it."""
        import mlflow

        run_id = trial.user_attrs.get(attrs.MLFLOW_RUN_ID)
        if not run_id:
            return
        try:
            _configure_once()
            client = mlflow.MlflowClient()
            if client.get_run(run_id).info.status != "RUNNING":
                return
            end_run(client, run_id, "FAILED", reason or "its worker stopped (killed?): no heartbeat; the trial is retried")
        except Exception as error:  # the tracking store is away: Optuna's retry of the trial must still happen
            print(f"could not mark MLflow run {run_id} of trial {trial.number} FAILED: {error}", flush=True)


@functools.cache
def _configure_once() -> None:
    from pipeline.stores import configure_mlflow

    configure_mlflow()


class SessionTracker:
    """The parent run of one tuning session; its trials' runs nest under it."""

    def __init__(self, study_name: str, tags: dict[str, str]):
        import mlflow

        from pipeline.tracking.session_runs import SESSION_KIND, SessionHeartbeat, end_runs_of_gone_sessions, identity_tags
        from pipeline.stores import configure_mlflow, heartbeat_seconds

        started = time.perf_counter()
        configure_mlflow()
        self.client = mlflow.MlflowClient()
        self.experiment_id = ensure_experiment(study_name)
        interval = heartbeat_seconds()
        for line in end_runs_of_gone_sessions(self.client, self.experiment_id, interval):
            print(line, flush=True)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        run = self.client.create_run(self.experiment_id, run_name=f"{study_name} session {stamp}",
                                     tags={**tags, **identity_tags(interval), "study": study_name, "kind": SESSION_KIND})
        self.run_id = run.info.run_id
        self.heartbeat = SessionHeartbeat(self.client, self.run_id, interval).start()
        self.tags = tags
        self.seconds = time.perf_counter() - started  # in MLflow calls outside the trials

    def summary_fields(self) -> dict:
        """The session summary's tracking lines: the parent run, and the seconds spent in MLflow calls
        outside the trials (the parent run, Optuna's figures, registration and aliases)."""
        return {"mlflow_parent_run_id": self.run_id, "session_tracking_seconds": round(self.seconds, 1)}

    def trial_trackers(self) -> TrialTrackers:
        return TrialTrackers(self.experiment_id, self.run_id, {**self.tags, **environment_tags()})

    @_timed
    def promote(self, study) -> dict | None:
        """Register the study's best model and move `champion` to it if it beats the champion's."""
        from pipeline.tracking.registry import promote_best_trial

        return promote_best_trial(study)

    @_timed
    def finish(self, study, summary: dict | None, *, status: str = "FINISHED") -> None:
        """Optuna's figures, the best value and parameters, and the summary, on the parent run; then end
        it with ``status``. Without a study (the session failed before it had one) it only ends the run;
        when logging fails, the run still ends (FAILED, unless it was ending KILLED) and the error is raised."""
        try:
            if study is not None:
                self._log_study(study, summary)
        except BaseException as error:  # ended all the same, never left RUNNING; the error is the one raised
            ending = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED" if status == "FINISHED" else status
            try:
                self._end(ending)
            except Exception as end_error:
                print(f"note: the session's MLflow run was not ended {ending} ({first_line(end_error)})", flush=True)
            raise
        self._end(status)

    def _log_study(self, study, summary: dict | None) -> None:
        import matplotlib.pyplot as plt  # Optuna's matplotlib plots draw through pyplot

        from pipeline.tracking.figures import optuna_figures, self_contained_html
        from pipeline.tracking.study_figures import study_images

        page = self_contained_html(optuna_figures(study), f"Optuna study {study.study_name}")
        self.client.log_text(self.run_id, page, "optuna/figures.html")  # interactive, offline: plotly.js inside
        for name, figure in study_images(study).items():  # shown offline too, legible at hundreds of trials
            self.client.log_figure(self.run_id, figure, f"optuna/{name}.png")
            plt.close(figure)
        if summary is None:
            return
        self.client.log_dict(self.run_id, summary, "summary.json")
        best = summary.get("best_trial")
        if best:
            log_values(self.client, self.run_id,
                       {"best_val_accuracy": best["val_accuracy"], "epochs_run": summary["epochs_run"],
                        "epochs_unpruned": summary["epochs_unpruned"]},
                       params={**{f"best.{k}": v for k, v in best["params"].items()}, "best.trial": best["number"]})

    def _end(self, status: str) -> None:
        """Stop beating only now: the figures above can take minutes on a large study, and a session
        starting meanwhile must not take this one for gone."""
        self.heartbeat.stop()
        self.client.set_terminated(self.run_id, status)


def session_tracker(session, *, enabled: bool = True):
    """The tracker a tuning Session gets: a SessionTracker (MLflow), or with ``enabled`` False the null
    one. The session's seed tags its run and its trials' runs."""
    if not enabled:
        return NullSessionTracker()
    return SessionTracker(session.spec.name, {**study_tags(session.spec, session.storage),
                                              "session_seed": str(session.session_seed)})


def study_tags(spec, storage: str) -> dict[str, str]:
    """What every run of the study is tagged with: the study, its sampler and pruner, and where it is stored."""
    from pipeline.stores import redact

    return {"study": spec.name, "sampler": spec.sampler["name"], "pruner": spec.pruner["name"],
            "optuna_storage": redact(storage)}


class NullSessionTracker:
    """Tracking off: no parent run, trial runs, figures or promotion."""

    def summary_fields(self):
        return {}

    def trial_trackers(self):
        return NullTrialTrackers()

    def promote(self, study):
        return None

    def finish(self, study, summary, *, status="FINISHED"):
        pass
