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
from pathlib import Path

import numpy as np

from pipeline.training.config import NOTEBOOK_TEST_ACCURACY
from pipeline.data.dataset import CLASSES, load_fashion_mnist, test_seen
from pipeline.tracking.experiments import dataset_input
from pipeline.training.metrics import CALIBRATION_BINS, classification_metrics
from pipeline.paths import REPORTS_DIR
from pipeline.tracking.registry import CHAMPION, REGISTERED_MODEL, resolve_version, val_accuracy_of

# The share of weights set to zero at each point of the pruning sweep: where accuracy holds, and where
# it breaks. Each level is a full pass over the test set (six views for a CNN champion); 0 % is the
# main prediction, not computed again.
SPARSITIES = [0.0, 0.5, 0.7, 0.9]
# Images per forward pass when scoring: small enough for a six-view CNN's activations to stay in the
# CPU's caches; 2,048 at a time left two Zen 4 cores waiting on memory.
EVALUATE_BATCH_SIZE = 64


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
    metrics = classification_metrics(labels, probabilities)
    result = {"test_accuracy": metrics.pop("accuracy"), "n_test_images": metrics.pop("n_images"), **metrics}
    result.update({
        "model": name,
        "version": int(model_version.version),
        "alias": alias if version is None else None,
        "model_uri": model_uri,
        "val_accuracy": val_accuracy_of(model_version),
        "dataset": dataset.kind,
        "study": model_version.tags.get("study"),
        "trial": model_version.tags.get("trial"),
    })
    if prune_sweep:
        result["prune_sweep"] = magnitude_prune_sweep(mlflow.pytorch.load_model(model_uri), images, labels,
                                                      unpruned_accuracy=result["test_accuracy"])

    folder = reports_dir / f"{name}-v{model_version.version}"
    folder.mkdir(parents=True, exist_ok=True)
    result["report"] = str(folder / "report.html")
    (folder / "metrics.json").write_text(json.dumps(result, indent=2))
    (folder / "report.html").write_text(render_report(result, images, labels, predictions, probabilities))
    result["mlflow_run_id"] = log_evaluation_run(result, folder, inputs=[dataset_input(dataset, test_seen(dataset))])
    return result


def predict(predict_fn, images: np.ndarray) -> np.ndarray:
    """``predict_fn`` over the images a chunk at a time (bounds a CNN's activation memory)."""
    return np.concatenate([np.asarray(predict_fn(images[i:i + EVALUATE_BATCH_SIZE]))
                           for i in range(0, len(images), EVALUATE_BATCH_SIZE)])


def magnitude_prune_sweep(module, images: np.ndarray, labels: np.ndarray, *, unpruned_accuracy: float) -> list[dict]:
    """Global magnitude (L1) pruning of every weight matrix and kernel at each sparsity: test accuracy
    against the share of weights set to zero. Batch-norm scales and biases are left alone. At 0 % the
    model is the one already scored: ``unpruned_accuracy``."""
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
        if sparsity:
            with torch.inference_mode():
                probabilities = predict(lambda x: pruned(torch.as_tensor(x)).numpy(), inputs.numpy())
            accuracy = float((probabilities.argmax(axis=1) == labels).mean())
        else:
            accuracy = unpruned_accuracy
        zeros = sum(int((m.weight == 0).sum()) for m, _ in weights)
        total = sum(m.weight.numel() for m, _ in weights)
        sweep.append({"sparsity": sparsity, "zero_weights": zeros / total, "test_accuracy": accuracy})
    return sweep


def log_evaluation_run(result: dict, folder: Path, *, inputs=()) -> str:
    """An MLflow run beside the model's study runs (or in `evaluation`), tagged with the version, with
    the test split as its dataset input; the version gets `test_accuracy` and `evaluation_run_id` tags."""
    import mlflow

    from pipeline.tracking.experiments import ensure_experiment, log_confusion_matrix, log_values

    client = mlflow.MlflowClient()
    experiment_id = ensure_experiment(result["study"] or "evaluation")
    run = client.create_run(experiment_id, run_name=f"evaluate {result['model']} v{result['version']}",
                            tags={"kind": "evaluation", "model": result["model"], "model_version": str(result["version"]),
                                  "model_uri": result["model_uri"], "dataset": result["dataset"]})
    run_id = run.info.run_id
    metrics = {"test_accuracy": result["test_accuracy"], "test_macro_f1": result["macro_f1"],
               "test_expected_calibration_error": result["expected_calibration_error"]}
    metrics.update({f"test_f1.{name.replace('/', '-')}": v["f1-score"] for name, v in result["per_class"].items()})
    log_values(client, run_id, metrics, params={"model_uri": result["model_uri"]})
    if inputs:
        client.log_inputs(run_id, datasets=list(inputs))
    for point in result.get("prune_sweep", []):  # step = the percentage of weights removed
        log_values(client, run_id, {"pruned_test_accuracy": point["test_accuracy"]}, step=round(point["sparsity"] * 100))
    client.log_artifact(run_id, str(folder / "report.html"))
    client.log_artifact(run_id, str(folder / "metrics.json"))
    log_confusion_matrix(client, run_id, result["confusion_matrix"], "Test confusion matrix", "test_confusion_matrix")
    client.set_terminated(run_id, "FINISHED")
    if result["dataset"] == "official":  # a custom dataset's score is not the version's test accuracy
        client.set_model_version_tag(result["model"], str(result["version"]), "test_accuracy",
                                     f"{result['test_accuracy']:.6f}")
        client.set_model_version_tag(result["model"], str(result["version"]), "evaluation_run_id", run_id)
    return run_id


def format_report(result: dict) -> str:
    val = _validation_accuracy_text(result)
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
    from pipeline.tracking import figures as draw

    figures = [draw.confusion_matrix_plotly(np.asarray(result["confusion_matrix"]), "Test confusion matrix"),
               draw.per_class_bars(result["per_class"]),
               draw.reliability_diagram(result["reliability"], result["expected_calibration_error"], CALIBRATION_BINS)]
    if result.get("prune_sweep"):
        figures.append(draw.pruning_curve(result["prune_sweep"]))
    plots = "\n".join(f.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
                      for i, f in enumerate(figures))

    val = _validation_accuracy_text(result)
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


def _validation_accuracy_text(result: dict) -> str:
    """The version's validation accuracy, or "unknown" for a version registered without the tag."""
    return f"{result['val_accuracy']:.2%}" if result["val_accuracy"] is not None else "unknown"
