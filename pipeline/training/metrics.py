"""Classification metrics from labels, predictions and class probabilities: one definition, used
for a trial's validation split and for the champion's test split alike."""

from __future__ import annotations

import numpy as np

from pipeline.data.dataset import CLASSES, N_CLASSES

CALIBRATION_BINS = 15


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1, the confusion matrix and its most frequent
    confusions, and the calibration of the top probability. ``probabilities``: (N, 10)."""
    from sklearn.metrics import classification_report, confusion_matrix

    predictions = probabilities.argmax(axis=1)
    report = classification_report(labels, predictions, labels=list(range(N_CLASSES)), target_names=list(CLASSES),
                                   output_dict=True, zero_division=0)
    matrix = confusion_matrix(labels, predictions, labels=list(range(N_CLASSES)))
    calibration = reliability(labels, probabilities)
    return {
        "accuracy": float((predictions == labels).mean()),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "per_class": {name: {k: float(report[name][k]) for k in ("precision", "recall", "f1-score", "support")}
                      for name in CLASSES},
        "confusion_matrix": matrix.tolist(),
        "top_confusions": top_confusions(matrix),
        "expected_calibration_error": calibration["ece"],
        "reliability": calibration["bins"],
        "n_images": int(len(labels)),
    }


def top_confusions(matrix: np.ndarray, count: int = 5) -> list[dict]:
    """The ``count`` largest off-diagonal cells (true class, predicted class), largest first."""
    matrix = np.asarray(matrix)
    off_diagonal = [(int(matrix[t, p]), t, p) for t in range(len(matrix)) for p in range(len(matrix)) if t != p]
    return [{"true": CLASSES[t], "predicted": CLASSES[p], "count": n}
            for n, t, p in sorted(off_diagonal, key=lambda cell: -cell[0])[:count] if n > 0]


def reliability(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = CALIBRATION_BINS) -> dict:
    """Accuracy against confidence (the top probability) in equal-width bins, and the expected
    calibration error: the bins' |accuracy - confidence| weighted by their share of the images.
    Empty bins are left out."""
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
