"""MLflow: where runs go, a parent run per tuning session, a nested run per trial, figures, models,
and promotion in the model registry.

Everything goes through an explicit ``MlflowClient`` and run ids, so several worker processes can
attach their trials to one parent run. ``NullTrialTracker`` has the same methods and does nothing:
the objective never asks whether tracking is on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import time
import warnings
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig
from pipeline.data import CLASSES, Splits
from pipeline.train import EpochMetrics, TrainResult, predict_log_probs

REPO_ROOT = Path(__file__).resolve().parents[1]
MLRUNS_DIR = REPO_ROOT / "mlruns"
DEFAULT_TRACKING_URI = f"sqlite:///{MLRUNS_DIR / 'mlflow.db'}"
REGISTERED_MODEL = "fashion-mnist-classifier"
CHAMPION, CHALLENGER = "champion", "challenger"
SERVER_PROBE_SECONDS = 5  # how long to wait for a tracking server before saying it is not there
PACKAGES = ("torch", "torchvision", "optuna", "mlflow", "numpy", "scikit-learn")


def configure_mlflow() -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI, else the local SQLite store under mlruns/; telemetry off
    (the machines this runs on are often offline). Called by the CLI, never at import."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines between our progress lines
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri == DEFAULT_TRACKING_URI:
        MLRUNS_DIR.mkdir(exist_ok=True)
    if uri.startswith(("http://", "https://")):
        check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


class TrackingServerError(RuntimeError):
    """$MLFLOW_TRACKING_URI names a server that does not answer; the message gives the fix."""


def check_tracking_server(uri: str, timeout: float = SERVER_PROBE_SECONDS) -> None:
    """Fail in seconds when the tracking server is down. MLflow's REST client retries a refused
    connection with backoff for about four minutes before it gives up: right for a blip in a long
    study, wrong for a typo in the URI. Any HTTP answer (even 401 from a proxy) counts as there."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as error:  # refused, DNS, timeout, a malformed URI
        reason = getattr(error, "reason", error)
        raise TrackingServerError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}). Fix: start it (`mlflow server "
            f"--backend-store-uri ...`), or unset MLFLOW_TRACKING_URI to use the local store under mlruns/."
        ) from None


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it. With a SQLite store its artifacts go beside the database
    (mlruns/artifacts/<name> for the default one), not wherever the command ran. Two processes
    creating it at once race; the loser finds the winner's."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    for _ in range(5):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        uri = mlflow.get_tracking_uri()
        location = None  # a tracking server decides for itself
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts" / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            time.sleep(0.2)
    raise RuntimeError(f"could not create or find MLflow experiment {name!r}")


def environment_tags() -> dict[str, str]:
    tags = {"platform": platform.platform(), "python": platform.python_version()}
    tags.update({f"version.{name}": version(name) for name in PACKAGES})
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        tags["git_commit"] = commit or "unknown"
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "unknown"
    return tags


class RawPixelClassifier(nn.Module):
    """What gets logged: raw pixels 0-255, float32 (N, 28, 28) in, class probabilities (N, 10) out.

    It carries the training split's normalization as buffers, so an outside client needs nothing
    from this project.
    """

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        normalized = (pixels / 255.0 - self.mean) / self.std
        return self.model(normalized.unsqueeze(1)).exp()


def _timed(method):
    """Adds the method's wall time to ``self.seconds``: what tracking costs the trial, reported by `make tune`."""

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

    @_timed
    def start(self, trial_number: int, config: TrainConfig, sampled: dict) -> str:
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        run = self.client.create_run(
            self.experiment_id, run_name=f"trial-{trial_number}",
            tags={**self.tags, MLFLOW_PARENT_RUN_ID: self.parent_run_id, "trial": str(trial_number)},
        )
        self.run_id = run.info.run_id
        params = {**{k: _param_value(v) for k, v in asdict(config).items()},
                  **{f"sampled.{k}": _param_value(v) for k, v in sampled.items()}}
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        return self.run_id

    @_timed
    def log_epoch(self, metrics: EpochMetrics) -> None:
        """One batched call per epoch: a call per metric costs about 8 ms each on SQLite."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = {k: v for k, v in asdict(metrics).items() if k != "epoch"}
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, metrics.epoch) for k, v in values.items()])

    @_timed
    def complete(self, result: TrainResult, splits: Splits, *, log_model: bool) -> str | None:
        """Summary metrics, confusion matrix, per-class metrics, curves; the model when asked.
        Returns the logged model's URI, if any."""
        from mlflow.entities import Metric

        log_probs = predict_log_probs(result.model, splits.val_images).cpu()
        predictions = log_probs.argmax(dim=1).numpy()
        labels = splits.val_labels.cpu().numpy()
        report = per_class_report(labels, predictions)
        now = int(time.time() * 1000)
        summary = {"best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch,
                   "val_macro_f1": report["macro avg"]["f1-score"]}
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, 0) for k, v in summary.items()])
        matrix = confusion(labels, predictions)
        self.client.log_dict(self.run_id, {"classes": list(CLASSES), "counts": matrix.tolist()},
                             "confusion_matrix.json")
        self.client.log_dict(self.run_id, report, "per_class_metrics.json")
        log_confusion_figures(self.client, self.run_id, matrix, "Validation confusion matrix", "confusion_matrix")
        self.client.log_figure(self.run_id, learning_curves_figure(result.history), "learning_curves.html")
        model_uri = self._log_model(result.model, splits) if log_model else None
        self.client.set_terminated(self.run_id, "FINISHED")
        return model_uri

    @_timed
    def pruned(self, epoch: int) -> None:
        self.client.set_tag(self.run_id, "pruned_at_epoch", str(epoch))
        self.client.set_terminated(self.run_id, "KILLED")

    @_timed
    def failed(self, reason: str) -> None:
        self.client.set_tag(self.run_id, "fail_reason", reason[:5000])
        self.client.set_terminated(self.run_id, "FAILED")

    def _log_model(self, model: nn.Module, splits: Splits) -> str:
        import mlflow
        from mlflow.models import infer_signature

        wrapped = RawPixelClassifier(model, splits.mean, splits.std).cpu().eval()
        example = (splits.val_images[:4, 0].cpu() * splits.std + splits.mean).mul(255).round().numpy().astype(np.float32)
        with torch.inference_mode():
            output = wrapped(torch.from_numpy(example)).numpy()
        with mlflow.start_run(run_id=self.run_id):  # log_model writes to the active run
            info = mlflow.pytorch.log_model(
                wrapped, name="model", input_example=example, signature=infer_signature(example, output),
                # Explicit requirements: inferring them costs 10-16 s a call.
                pip_requirements=[f"torch=={version('torch').split('+')[0]}", f"mlflow=={version('mlflow')}",
                                  f"numpy=={version('numpy')}"],
            )
        self.client.set_tag(self.run_id, "model_uri", info.model_uri)
        return info.model_uri


class NullTrialTracker:
    """Tracking off: the same methods, doing nothing."""

    run_id = None
    seconds = 0.0

    def start(self, trial_number, config, sampled):
        return None

    def log_epoch(self, metrics):
        pass

    def complete(self, result, splits, *, log_model):
        return None

    def pruned(self, epoch):
        pass

    def failed(self, reason):
        pass


def per_class_report(labels: np.ndarray, predictions: np.ndarray) -> dict:
    from sklearn.metrics import classification_report

    return classification_report(labels, predictions, labels=list(range(len(CLASSES))), target_names=list(CLASSES),
                                 output_dict=True, zero_division=0)


def confusion(labels: np.ndarray, predictions: np.ndarray) -> np.ndarray:
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(labels, predictions, labels=list(range(len(CLASSES))))


def confusion_figure(matrix: np.ndarray, title: str):
    import plotly.graph_objects as go

    figure = go.Figure(go.Heatmap(z=matrix, x=list(CLASSES), y=list(CLASSES), colorscale="Blues",
                                  text=matrix, texttemplate="%{text}", hovertemplate="true %{y}<br>predicted %{x}<br>%{z}"))
    figure.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed")
    return figure


def log_confusion_figures(client, run_id: str, matrix: np.ndarray, title: str, stem: str) -> None:
    """<stem>.html, an interactive plotly heatmap, and <stem>.png: the HTML that ``log_figure``
    writes loads plotly.js from its CDN, so only the PNG shows in an offline MLflow UI."""
    client.log_figure(run_id, confusion_figure(matrix, title), f"{stem}.html")
    client.log_figure(run_id, confusion_image(matrix, title), f"{stem}.png")


def confusion_image(matrix: np.ndarray, title: str):
    """The confusion matrix as a matplotlib figure (no pyplot: no global state, no display needed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 6), layout="constrained")
    axes = figure.subplots()
    axes.imshow(matrix, cmap="Blues")
    threshold = matrix.max() / 2
    for (true, predicted), count in np.ndenumerate(matrix):
        axes.text(predicted, true, str(count), ha="center", va="center", fontsize=8,
                  color="white" if count > threshold else "black")
    axes.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    axes.set_yticks(range(len(CLASSES)), CLASSES)
    axes.set(title=title, xlabel="predicted", ylabel="true")
    return figure


def learning_curves_figure(history: list[EpochMetrics]):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    epochs = [m.epoch for m in history]
    figure = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for split in ("train", "val"):
        figure.add_trace(go.Scatter(x=epochs, y=[getattr(m, f"{split}_loss") for m in history], name=f"{split} loss"),
                         row=1, col=1)
        figure.add_trace(go.Scatter(x=epochs, y=[getattr(m, f"{split}_accuracy") for m in history],
                                    name=f"{split} accuracy"), row=1, col=2)
    figure.update_xaxes(title_text="epoch")
    return figure


def _param_value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)


STUDY_FIGURES = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


def study_figures(study, *, backend: str = "plotly") -> dict:
    """Optuna's figures for the study, plotly (interactive) or matplotlib (images); a figure its
    trials cannot support yet is left out."""
    from optuna import visualization

    plots = visualization if backend == "plotly" else visualization.matplotlib
    figures = {}
    for name in STUDY_FIGURES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "too few trials to compute importances", "experimental"
                figure = getattr(plots, f"plot_{name}")(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # e.g. parameter importances need two complete trials with different values
        figures[name] = figure if backend == "plotly" else figure.figure  # matplotlib's plots return Axes
    return figures


class SessionTracker:
    """The parent run of one tuning session: the experiment is the study, nested runs are its trials."""

    def __init__(self, study_name: str, tags: dict[str, str]):
        import mlflow

        self.client = mlflow.MlflowClient()
        self.experiment_id = ensure_experiment(study_name)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        run = self.client.create_run(self.experiment_id, run_name=f"{study_name} session {stamp}",
                                     tags={**tags, "study": study_name, "kind": "tuning-session"})
        self.run_id = run.info.run_id

    def finish(self, study, summary: dict, *, status: str = "FINISHED") -> None:
        """Optuna's figures, the best value and parameters, and the summary, on the parent run."""
        from mlflow.entities import Metric, Param

        for name, figure in study_figures(study).items():
            self.client.log_figure(self.run_id, figure, f"optuna/{name}.html")
        import matplotlib.pyplot as plt  # Optuna's matplotlib plots draw through pyplot

        for name, figure in study_figures(study, backend="matplotlib").items():
            # Shown offline too; "tight" keeps the long parameter names Optuna's layout cuts off.
            self.client.log_figure(self.run_id, figure, f"optuna/{name}.png", save_kwargs={"bbox_inches": "tight"})
            plt.close(figure)
        self.client.log_dict(self.run_id, summary, "summary.json")
        best = summary.get("best_trial")
        if best:
            now = int(time.time() * 1000)
            self.client.log_batch(
                self.run_id,
                metrics=[Metric("best_val_accuracy", best["val_accuracy"], now, 0),
                         Metric("epochs_run", summary["epochs_run"], now, 0),
                         Metric("epochs_budget", summary["epochs_budget"], now, 0)],
                params=[Param(f"best.{k}", _param_value(v)) for k, v in best["params"].items()]
                + [Param("best.trial", str(best["number"]))],
            )
        self.client.set_terminated(self.run_id, status)


def promote_best(study, study_name: str) -> dict | None:
    """Register the best trial's model as a new version of the registered model; move ``champion`` to
    it only if its validation accuracy beats the current champion's, else call it ``challenger``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        best = study.best_trial
    except ValueError:
        return None
    model_uri, run_id = best.user_attrs.get("model_uri"), best.user_attrs.get("mlflow_run_id")
    if not model_uri:
        return None
    client = mlflow.MlflowClient()
    existing = client.search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{run_id}'")
    if existing:  # the same study ran again without a new best: do not register it twice
        version = existing[0]
    else:
        version = mlflow.register_model(model_uri, REGISTERED_MODEL, tags={
            "val_accuracy": f"{best.value:.6f}", "study": study_name, "trial": str(best.number), "run_id": run_id})
        client.update_model_version(REGISTERED_MODEL, version.version, description=(
            f"Best trial ({best.number}) of Optuna study {study_name}: validation accuracy {best.value:.4%}. "
            f"Takes raw pixels 0-255, float32 (N, 28, 28); returns class probabilities (N, 10)."))
    try:
        champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
        champion_accuracy = float(champion.tags.get("val_accuracy", "nan"))
    except MlflowException:
        champion, champion_accuracy = None, float("nan")
    if champion is not None and champion.version == version.version:
        outcome = "already champion"
    elif champion is None or not best.value <= champion_accuracy:
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version.version)
        outcome = "promoted to champion"
    else:
        client.set_registered_model_alias(REGISTERED_MODEL, CHALLENGER, version.version)
        outcome = f"challenger (champion v{champion.version} has {champion_accuracy:.2%})"
    return {"model": REGISTERED_MODEL, "version": int(version.version), "val_accuracy": best.value,
            "outcome": outcome}
