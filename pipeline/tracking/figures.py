"""Every figure the project draws: for trial runs, tuning sessions and the evaluation report.

Two kinds: plotly figures (interactive, for self-contained HTML pages: the session's and the
evaluation report) and matplotlib figures (images: what a trial run holds, shown by the MLflow UI
without loading anything). Functions only build figures; logging them is tracking's job,
embedding them is the report's.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch stays out of commands that draw no model's figures (`make compare`)
    from pipeline.training.train import EpochMetrics

OPTUNA_FIGURES = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")


def confusion_matrix_plotly(matrix: np.ndarray, title: str):
    import plotly.graph_objects as go

    from pipeline.data.dataset import CLASSES

    figure = go.Figure(go.Heatmap(z=matrix, x=list(CLASSES), y=list(CLASSES), colorscale="Blues",
                                  text=matrix, texttemplate="%{text}", hovertemplate="true %{y}<br>predicted %{x}<br>%{z}"))
    figure.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed")
    return figure


def confusion_matrix_matplotlib(matrix: np.ndarray, title: str):
    """The same heatmap as an image (no pyplot: no global state, no display needed)."""
    from matplotlib.figure import Figure

    from pipeline.data.dataset import CLASSES

    matrix = np.asarray(matrix)
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


def learning_curves(history: list[EpochMetrics]):
    """Loss and accuracy per epoch, as an image. The training loss is what the optimizer minimized
    (label-smoothed, on augmented batches with dropout on); the validation loss is plain NLL in eval
    mode. They are not the same quantity, so each gets its own axes; the accuracies share one."""
    from matplotlib.figure import Figure

    epochs = [m.epoch for m in history]
    figure = Figure(figsize=(13, 3.6), layout="constrained")
    train_loss, val_loss, accuracy = figure.subplots(1, 3)
    train_loss.plot(epochs, [m.train_batch_loss for m in history], marker=".")
    train_loss.set(title="training loss (label-smoothed, as optimized)", xlabel="epoch")
    val_loss.plot(epochs, [m.val_loss for m in history], marker=".", color="tab:orange")
    val_loss.set(title="validation loss (NLL)", xlabel="epoch")
    accuracy.plot(epochs, [m.train_batch_accuracy for m in history], marker=".",
                  label="train (training batches, dropout on)")
    accuracy.plot(epochs, [m.val_accuracy for m in history], marker=".", label="validation")
    accuracy.set(title="accuracy", xlabel="epoch")
    accuracy.legend()
    return figure


def self_contained_html(figures: dict, title: str) -> str:
    """One HTML page holding plotly figures, with plotly.js inlined once: it opens offline, in the
    MLflow UI too, for about 3.5 MB however many figures it holds."""
    import html

    parts = [figure.to_html(full_html=False, include_plotlyjs="inline" if i == 0 else False)
             for i, figure in enumerate(figures.values())]
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body style='font-family:sans-serif'><h1>{html.escape(title)}</h1>{''.join(parts)}</body></html>")


def optuna_figures(study, names=OPTUNA_FIGURES, plots=None) -> dict:
    """Optuna's figures for the study: interactive (plotly) ones for the study's page, or with ``plots``
    = optuna.visualization.matplotlib its matplotlib Axes (study_figures.py's images). A figure its
    trials cannot support yet is left out."""
    from optuna import visualization

    figures = {}
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "too few trials to compute importances", "experimental"
                figures[name] = getattr(plots or visualization, f"plot_{name}")(study)
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # e.g. parameter importances need two complete trials with different values
    return figures


def per_class_bars(per_class: dict):
    import plotly.graph_objects as go

    from pipeline.data.dataset import CLASSES

    figure = go.Figure([go.Bar(name=label, x=list(CLASSES), y=[per_class[c][key] for c in CLASSES])
                        for label, key in (("precision", "precision"), ("recall", "recall"), ("F1", "f1-score"))])
    figure.update_layout(title="Per-class precision, recall and F1", barmode="group", yaxis_range=[0, 1])
    return figure


def reliability_diagram(bins: list[dict], expected_calibration_error: float, n_bins: int):
    import plotly.graph_objects as go

    figure = go.Figure([
        go.Bar(x=[(b["low"] + b["high"]) / 2 for b in bins], y=[b["accuracy"] for b in bins],
               width=1 / n_bins, name="accuracy", customdata=[b["count"] for b in bins],
               hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.3f}<br>%{customdata} images"),
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration", line={"dash": "dash"}),
    ])
    figure.update_layout(title=f"Reliability diagram (expected calibration error {expected_calibration_error:.4f})",
                         xaxis_title="confidence", yaxis_title="accuracy", xaxis_range=[0, 1], yaxis_range=[0, 1])
    return figure


def pruning_curve(sweep: list[dict]):
    import plotly.graph_objects as go

    figure = go.Figure(go.Scatter(x=[p["sparsity"] * 100 for p in sweep], y=[p["test_accuracy"] for p in sweep],
                                  mode="lines+markers"))
    figure.update_layout(title="Test accuracy against weight sparsity (global magnitude pruning)",
                         xaxis_title="weights set to zero (%)", yaxis_title="test accuracy")
    return figure
