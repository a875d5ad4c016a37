"""MLflow pieces every command that logs shares: the experiment (created once, tagged for the UI),
metrics and parameters in one batched call, where a run ran, a confusion matrix as an artifact.
Light to import (no torch): `make compare` logs through it too."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from importlib.metadata import version

import numpy as np

from pipeline.attrs import FAIL_REASON
from pipeline.paths import REPO_ROOT

PACKAGES = ("torch", "torchvision", "optuna", "mlflow", "numpy", "scikit-learn")
# MLflow 3's UI opens an experiment in its GenAI view unless told it holds model training.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def ensure_experiment(name: str) -> str:
    """The experiment's id, creating it. With a SQLite store its artifacts go beside the database
    (mlruns/artifacts/<name> for the default one), not wherever the command ran. Two processes
    creating it at once race; the loser finds the winner's."""
    from pathlib import Path

    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    for _ in range(5):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            for key, value in EXPERIMENT_TAGS.items():  # experiments made before the tag existed get it too
                if experiment.tags.get(key) != value:
                    client.set_experiment_tag(experiment.experiment_id, key, value)
            return experiment.experiment_id
        uri = mlflow.get_tracking_uri()
        location = None  # a tracking server decides for itself
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "artifacts" / name).as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException:
            time.sleep(0.2)
    raise RuntimeError(f"could not create or find MLflow experiment {name!r} after 5 tries")


def environment_tags() -> dict[str, str]:
    """Where a run ran: platform, Python, package versions and the git commit."""
    tags = {"platform": platform.platform(), "python": platform.python_version()}
    tags.update({f"version.{name}": version(name) for name in PACKAGES})
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        tags["git_commit"] = commit or "unknown"
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "unknown"
    return tags


def log_values(client, run_id: str, values: dict[str, float], *, step: int = 0, params: dict | None = None) -> None:
    """Metrics (and parameters) in one batched call: one call per metric costs about 8 ms on SQLite."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()],
                     params=[Param(k, param_value(v)) for k, v in (params or {}).items()])


def end_run(client, run_id: str, status: str, reason: str, *, reason_tag: str = FAIL_REASON) -> None:
    """End a run with ``status`` (FAILED, or KILLED for a session), saying why in ``reason_tag``: the
    tag is written first, so a run the UI shows ended always says why."""
    client.set_tag(run_id, reason_tag, reason[:5000])  # MLflow's limit on a tag's value is 8,000
    client.set_terminated(run_id, status)


def dataset_input(dataset, seen):
    """What a run saw of ``dataset`` (a pipeline.data.dataset.DataSeen) as an MLflow dataset input: the run page's
    Datasets. Its digest names the images (the dataset's checksum with the split's indices); its
    profile carries their count, the cut in words and the dataset's full checksum."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entity = Dataset(name="fashion-mnist" if dataset.kind == "official" else f"custom:{dataset.source.name}",
                     digest=seen.digest, source_type="local", source=json.dumps({"uri": str(dataset.source)}),
                     profile=json.dumps({"images": seen.images, "split": seen.cut,
                                         "dataset_checksum": dataset.checksum}))
    return DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, seen.context)])


def log_confusion_matrix(client, run_id: str, matrix, title: str, stem: str) -> None:
    """<stem>.png, the heatmap as an image, and <stem>.json, the counts. An image, not plotly HTML:
    the HTML ``log_figure`` writes loads plotly.js from a CDN (blank in an offline UI), and inlining it
    costs 3.5 MB a file."""
    from pipeline.data.dataset import CLASSES
    from pipeline.tracking.figures import confusion_matrix_matplotlib

    matrix = np.asarray(matrix)
    client.log_figure(run_id, confusion_matrix_matplotlib(matrix, title), f"{stem}.png")
    client.log_dict(run_id, {"classes": list(CLASSES), "counts": matrix.tolist()}, f"{stem}.json")


def param_value(value) -> str:
    return json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
