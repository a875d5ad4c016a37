"""The classification metrics against values worked out by hand."""

import numpy as np
import pytest

from pipeline.data.dataset import CLASSES
from pipeline.training.metrics import classification_metrics, reliability, top_confusions


def one_hot_ish(top_class: int, confidence: float) -> np.ndarray:
    """Probabilities with ``confidence`` on ``top_class`` and the rest spread evenly."""
    row = np.full(10, (1 - confidence) / 9)
    row[top_class] = confidence
    return row


def test_reliability_bins_and_expected_calibration_error_by_hand():
    # Four images. Two at confidence 0.95, one right and one wrong: accuracy 0.5 in the bin [0.8, 1.0].
    # Two at confidence 0.65, both right: accuracy 1.0 in the bin [0.6, 0.8].
    labels = np.array([0, 1, 2, 3])
    probabilities = np.stack([one_hot_ish(0, 0.95), one_hot_ish(0, 0.95), one_hot_ish(2, 0.65),
                              one_hot_ish(3, 0.65)])
    result = reliability(labels, probabilities, n_bins=5)
    assert [(b["low"], b["high"], b["count"]) for b in result["bins"]] == [
        pytest.approx((0.6, 0.8, 2)), pytest.approx((0.8, 1.0, 2))]
    assert [b["accuracy"] for b in result["bins"]] == [1.0, 0.5]
    assert [b["confidence"] for b in result["bins"]] == pytest.approx([0.65, 0.95])
    # ECE = 2/4 * |1.0 - 0.65| + 2/4 * |0.5 - 0.95| = 0.175 + 0.225
    assert result["ece"] == pytest.approx(0.4)


def test_a_perfectly_calibrated_model_has_zero_calibration_error():
    labels = np.array([0, 0, 0, 0])
    probabilities = np.stack([one_hot_ish(0, 1.0)] * 4)
    assert reliability(labels, probabilities)["ece"] == pytest.approx(0.0)


def test_top_confusions_are_the_largest_off_diagonal_cells_largest_first():
    matrix = np.zeros((10, 10), dtype=int)
    np.fill_diagonal(matrix, 100)  # the diagonal is never a confusion, however large
    matrix[6, 0] = 95  # Shirt taken for T-shirt/top
    matrix[2, 4] = 40  # Pullover taken for Coat
    matrix[9, 7] = 3   # Ankle boot taken for Sneaker
    assert top_confusions(matrix, count=2) == [
        {"true": "Shirt", "predicted": "T-shirt/top", "count": 95},
        {"true": "Pullover", "predicted": "Coat", "count": 40},
    ]
    assert len(top_confusions(matrix)) == 3  # empty cells are not listed


def test_classification_metrics_by_hand():
    # Class 0: 3 images, 2 right, 1 taken for class 1. Class 1: 1 image, right.
    labels = np.array([0, 0, 0, 1])
    probabilities = np.stack([one_hot_ish(0, 0.9), one_hot_ish(0, 0.9), one_hot_ish(1, 0.9), one_hot_ish(1, 0.9)])
    metrics = classification_metrics(labels, probabilities)
    assert metrics["accuracy"] == 0.75 and metrics["n_images"] == 4
    zero, one = metrics["per_class"][CLASSES[0]], metrics["per_class"][CLASSES[1]]
    assert (zero["precision"], zero["recall"]) == (1.0, pytest.approx(2 / 3))
    assert (one["precision"], one["recall"]) == (0.5, 1.0)
    assert zero["f1-score"] == pytest.approx(0.8) and one["f1-score"] == pytest.approx(2 / 3)
    # Macro F1 averages over all ten classes; the eight without images score 0.
    assert metrics["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 10)
    assert metrics["confusion_matrix"][0][:2] == [2, 1] and metrics["confusion_matrix"][1][:2] == [0, 1]
    assert metrics["top_confusions"] == [{"true": CLASSES[0], "predicted": CLASSES[1], "count": 1}]
