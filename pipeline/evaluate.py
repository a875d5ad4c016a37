"""The registered champion on the test set: the only use of the 10,000 test images in the pipeline.

The model is loaded from the MLflow registry exactly as an outside client would
(``mlflow.pyfunc.load_model("models:/<name>@<alias>")``) and fed raw pixels. The results go to
the terminal, to a self-contained HTML report with metrics.json beside it, and to an MLflow
evaluation run linked to the model version.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import time
from pathlib import Path

import numpy as np

from pipeline.config import NOTEBOOK_TEST_ACCURACY
from pipeline.data import CLASSES, load_fashion_mnist
from pipeline.tracking import (CHAMPION, REGISTERED_MODEL, REPO_ROOT, confusion, confusion_figure,
                               log_confusion_figures, per_class_report)

REPORTS_DIR = REPO_ROOT / "reports"
PREDICT_CHUNK = 2000  # images per predict call: bounds a CNN's activation memory
CALIBRATION_BINS = 15
SPARSITIES = [round(0.1 * i, 1) for i in range(10)]  # 0 % to 90 % of the weights set to zero


class RegistryError(RuntimeError):
    """The registry, the model or the alias cannot be found or reached; the message gives the fix."""


def resolve_version(name: str, *, alias: str | None, version: int | None):
    """The model version to evaluate, with one clear error for each way it can be missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    uri = mlflow.get_tracking_uri()
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(error.error_code):
            raise RegistryError(f"no registered model {name!r} in {uri}. Fix: run `make tune` first (it "
                                f"registers the best model), or set MLFLOW_TRACKING_URI to the store that has it.") from None
        raise RegistryError(f"cannot read the model registry at {uri}: {_first_line(error)}. Fix: check "
                            f"MLFLOW_TRACKING_URI (is the server running?).") from None
    except Exception as error:  # connection refused, DNS, ... (raised by the REST client)
        raise RegistryError(f"cannot reach the tracking server at {uri}: {_first_line(error)}. Fix: start it, "
                            f"or set MLFLOW_TRACKING_URI to a reachable one.") from None
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        wanted = f"version {version}" if version is not None else f"alias {alias!r}"
        raise RegistryError(f"model {name!r} has no {wanted} in {uri}. Fix: run `make tune` until a model is "
                            f"promoted, or pick another with --version N / --alias NAME.") from None


def evaluate_registered(name: str = REGISTERED_MODEL, *, alias: str | None = CHAMPION, version: int | None = None,
                        prune_sweep: bool = False, reports_dir: Path = REPORTS_DIR) -> dict:
    """Evaluate a registered model version on the test split; write the report; log the MLflow run."""
    import mlflow

    model_version = resolve_version(name, alias=alias, version=version)
    model_uri = f"models:/{name}/{model_version.version}"
    dataset = load_fashion_mnist()
    images = dataset.test_images.numpy().astype(np.float32)  # raw pixels 0-255, as an outside client has them
    labels = dataset.test_labels.numpy()

    model = mlflow.pyfunc.load_model(model_uri)
    probabilities = predict(model.predict, images)
    predictions = probabilities.argmax(axis=1)
    result = metrics_for(labels, predictions, probabilities)
    result.update({
        "model": name,
        "version": int(model_version.version),
        "alias": alias if version is None else None,
        "model_uri": model_uri,
        "val_accuracy": _float_tag(model_version.tags.get("val_accuracy")),
        "study": model_version.tags.get("study"),
        "trial": model_version.tags.get("trial"),
    })
    if prune_sweep:
        result["prune_sweep"] = magnitude_prune_sweep(mlflow.pytorch.load_model(model_uri), images, labels)

    folder = reports_dir / f"{name}-v{model_version.version}"
    folder.mkdir(parents=True, exist_ok=True)
    result["report"] = str(folder / "report.html")
    (folder / "metrics.json").write_text(json.dumps(result, indent=2))
    (folder / "report.html").write_text(render_report(result, images, labels, predictions, probabilities))
    result["mlflow_run_id"] = log_evaluation_run(result, folder)
    return result


def predict(predict_fn, images: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(predict_fn(images[i:i + PREDICT_CHUNK]))
                           for i in range(0, len(images), PREDICT_CHUNK)])


def metrics_for(labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray) -> dict:
    report = per_class_report(labels, predictions)
    matrix = confusion(labels, predictions)
    calibration = reliability(labels, probabilities)
    return {
        "test_accuracy": float((predictions == labels).mean()),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "per_class": {name: {k: float(report[name][k]) for k in ("precision", "recall", "f1-score", "support")}
                      for name in CLASSES},
        "confusion_matrix": matrix.tolist(),
        "top_confusions": top_confusions(matrix),
        "expected_calibration_error": calibration["ece"],
        "reliability": calibration["bins"],
        "n_test_images": int(len(labels)),
    }


def top_confusions(matrix: np.ndarray, count: int = 5) -> list[dict]:
    off_diagonal = [(int(matrix[t, p]), t, p) for t in range(len(matrix)) for p in range(len(matrix)) if t != p]
    return [{"true": CLASSES[t], "predicted": CLASSES[p], "count": n}
            for n, t, p in sorted(off_diagonal, reverse=True)[:count] if n > 0]


def reliability(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = CALIBRATION_BINS) -> dict:
    """Accuracy against confidence (the top probability) in equal-width bins, and the expected
    calibration error: the bins' |accuracy - confidence| weighted by their share of the images."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        members = which == b
        if members.any():
            accuracy, mean_confidence = float(correct[members].mean()), float(confidence[members].mean())
            ece += members.mean() * abs(accuracy - mean_confidence)
            bins.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": int(members.sum()),
                         "accuracy": accuracy, "confidence": mean_confidence})
    return {"ece": float(ece), "bins": bins}


def magnitude_prune_sweep(module, images: np.ndarray, labels: np.ndarray) -> list[dict]:
    """Global magnitude (L1) pruning of every weight matrix and kernel at each sparsity: test accuracy
    against the share of weights set to zero. Batch-norm scales and biases are left alone."""
    import torch
    from torch.nn.utils import prune

    inputs = torch.from_numpy(images)
    sweep = []
    for sparsity in SPARSITIES:
        pruned = copy.deepcopy(module)
        weights = [(m, "weight") for m in pruned.modules()
                   if isinstance(getattr(m, "weight", None), torch.nn.Parameter) and m.weight.dim() > 1]
        if sparsity:
            prune.global_unstructured(weights, pruning_method=prune.L1Unstructured, amount=sparsity)
            for m, name in weights:
                prune.remove(m, name)  # make the zeros permanent: the exported graph reads the attribute
        with torch.inference_mode():
            probabilities = predict(lambda x: pruned(torch.as_tensor(x)).numpy(), inputs.numpy())
        zeros = sum(int((m.weight == 0).sum()) for m, _ in weights)
        total = sum(m.weight.numel() for m, _ in weights)
        sweep.append({"sparsity": sparsity, "zero_weights": zeros / total,
                      "test_accuracy": float((probabilities.argmax(axis=1) == labels).mean())})
    return sweep


def log_evaluation_run(result: dict, folder: Path) -> str:
    """An MLflow run beside the model's study runs (or in `evaluation`), tagged with the version;
    the version gets `test_accuracy` and `evaluation_run_id` tags."""
    import mlflow
    from mlflow.entities import Metric, Param

    from pipeline.tracking import ensure_experiment

    client = mlflow.MlflowClient()
    experiment_id = ensure_experiment(result["study"] or "evaluation")
    run = client.create_run(experiment_id, run_name=f"evaluate {result['model']} v{result['version']}",
                            tags={"kind": "evaluation", "model": result["model"], "model_version": str(result["version"]),
                                  "model_uri": result["model_uri"]})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = {"test_accuracy": result["test_accuracy"], "test_macro_f1": result["macro_f1"],
               "test_expected_calibration_error": result["expected_calibration_error"]}
    metrics.update({f"test_f1.{name.replace('/', '-')}": v["f1-score"] for name, v in result["per_class"].items()})
    metric_list = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for point in result.get("prune_sweep", []):
        metric_list.append(Metric("pruned_test_accuracy", point["test_accuracy"], now, int(point["sparsity"] * 100)))
    client.log_batch(run_id, metrics=metric_list, params=[Param("model_uri", result["model_uri"])])
    client.log_artifact(run_id, str(folder / "report.html"))
    client.log_artifact(run_id, str(folder / "metrics.json"))
    log_confusion_figures(client, run_id, np.asarray(result["confusion_matrix"]), "Test confusion matrix",
                          "test_confusion_matrix")
    client.set_terminated(run_id, "FINISHED")
    client.set_model_version_tag(result["model"], str(result["version"]), "test_accuracy", f"{result['test_accuracy']:.6f}")
    client.set_model_version_tag(result["model"], str(result["version"]), "evaluation_run_id", run_id)
    return run_id


def format_report(result: dict) -> str:
    val = f"{result['val_accuracy']:.2%}" if result["val_accuracy"] is not None else "unknown"
    lines = [
        f"{result['model']} version {result['version']}" + (f" (@{result['alias']})" if result["alias"] else "")
        + (f", from study {result['study']} trial {result['trial']}" if result["study"] else ""),
        f"test accuracy        {result['test_accuracy']:.2%}   (notebook {NOTEBOOK_TEST_ACCURACY:.2%}, this version's validation {val})",
        f"macro F1             {result['macro_f1']:.4f}",
        f"calibration error    {result['expected_calibration_error']:.4f}  (expected, {CALIBRATION_BINS} bins)",
        "",
        f"{'class':<14}{'precision':>10}{'recall':>10}{'F1':>10}{'support':>9}",
    ]
    for name, m in result["per_class"].items():
        lines.append(f"{name:<14}{m['precision']:>10.3f}{m['recall']:>10.3f}{m['f1-score']:>10.3f}{int(m['support']):>9d}")
    lines += ["", "most frequent confusions (true -> predicted):"]
    lines += [f"  {c['true']} -> {c['predicted']}: {c['count']}" for c in result["top_confusions"]]
    if result.get("prune_sweep"):
        lines += ["", "weight pruning (global magnitude):", f"  {'sparsity':>8}  {'test accuracy':>13}"]
        lines += [f"  {p['sparsity']:>8.0%}  {p['test_accuracy']:>13.2%}" for p in result["prune_sweep"]]
    lines += ["", f"report: {result['report']}", f"MLflow evaluation run: {result['mlflow_run_id']}"]
    return "\n".join(lines)


def render_report(result: dict, images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                  probabilities: np.ndarray) -> str:
    """One self-contained HTML page (plotly.js inlined once): it opens offline."""
    import plotly.graph_objects as go

    figures = [confusion_figure(np.asarray(result["confusion_matrix"]), "Test confusion matrix")]
    per_class = go.Figure([go.Bar(name=metric, x=list(CLASSES), y=[result["per_class"][c][key] for c in CLASSES])
                           for metric, key in (("precision", "precision"), ("recall", "recall"), ("F1", "f1-score"))])
    per_class.update_layout(title="Per-class precision, recall and F1", barmode="group", yaxis_range=[0, 1])
    figures.append(per_class)
    bins = result["reliability"]
    calibration = go.Figure([
        go.Bar(x=[(b["low"] + b["high"]) / 2 for b in bins], y=[b["accuracy"] for b in bins],
               width=1 / CALIBRATION_BINS, name="accuracy", customdata=[b["count"] for b in bins],
               hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.3f}<br>%{customdata} images"),
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration", line={"dash": "dash"}),
    ])
    calibration.update_layout(title=f"Reliability diagram (expected calibration error "
                                    f"{result['expected_calibration_error']:.4f})",
                              xaxis_title="confidence", yaxis_title="accuracy", xaxis_range=[0, 1], yaxis_range=[0, 1])
    figures.append(calibration)
    if result.get("prune_sweep"):
        sweep = result["prune_sweep"]
        pruning = go.Figure(go.Scatter(x=[p["sparsity"] * 100 for p in sweep], y=[p["test_accuracy"] for p in sweep],
                                       mode="lines+markers"))
        pruning.update_layout(title="Test accuracy against weight sparsity (global magnitude pruning)",
                              xaxis_title="weights set to zero (%)", yaxis_title="test accuracy")
        figures.append(pruning)
    plots = "\n".join(f.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
                      for i, f in enumerate(figures))

    val = f"{result['val_accuracy']:.2%}" if result["val_accuracy"] is not None else "unknown"
    title = f"{result['model']} v{result['version']} on the Fashion-MNIST test set"
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
                   f"<td>{m['f1-score']:.3f}</td><td>{int(m['support'])}</td></tr>" for n, m in result["per_class"].items())
    confusions = "".join(f"<li>{html.escape(c['true'])} &rarr; {html.escape(c['predicted'])}: {c['count']}</li>"
                         for c in result["top_confusions"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}} table{{border-collapse:collapse}}
td,th{{padding:2px 10px;text-align:right}} td:first-child{{text-align:left}} .grid{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0;text-align:center;font-size:11px;width:100px}} .wrong{{color:#b00}} .right{{color:#070}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p><b>Test accuracy {result['test_accuracy']:.2%}</b> on {result['n_test_images']:,} images (the notebook: {NOTEBOOK_TEST_ACCURACY:.2%};
this version's validation accuracy: {val}). Macro F1 {result['macro_f1']:.4f}.
Source: {html.escape(result['model_uri'])}{f", study {html.escape(result['study'])} trial {result['trial']}" if result['study'] else ""}.</p>
<h2>Per class</h2><table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{rows}</table>
<h2>Most frequent confusions</h2><ul>{confusions}</ul>
{plots}
<h2>Examples</h2><p>Mistakes first (true &rarr; predicted, confidence), then correct predictions.</p>
<div class="grid">{example_grid(images, labels, predictions, probabilities)}</div>
</body></html>
"""


def example_grid(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray, probabilities: np.ndarray,
                 mistakes: int = 30, correct: int = 10) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    wrong_idx = np.flatnonzero(predictions != labels)
    right_idx = np.flatnonzero(predictions == labels)
    chosen = [(i, False) for i in rng.permutation(wrong_idx)[:mistakes]] + \
             [(i, True) for i in rng.permutation(right_idx)[:correct]]
    cells = []
    for i, is_right in chosen:
        buffer = io.BytesIO()
        Image.fromarray(images[i].astype(np.uint8)).resize((84, 84), Image.NEAREST).save(buffer, format="PNG")
        data = base64.b64encode(buffer.getvalue()).decode()
        caption = (f"{CLASSES[labels[i]]}" if is_right else
                   f"{CLASSES[labels[i]]} &rarr; {CLASSES[predictions[i]]}")
        cells.append(f'<figure><img src="data:image/png;base64,{data}" width="84" height="84">'
                     f'<figcaption class="{"right" if is_right else "wrong"}">{caption} '
                     f'({probabilities[i].max():.2f})</figcaption></figure>')
    return "".join(cells)


def _float_tag(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
