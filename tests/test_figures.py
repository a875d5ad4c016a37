"""The figures say what they show."""

from pipeline.figures import learning_curves
from pipeline.train import EpochMetrics


def test_the_learning_curves_keep_the_two_different_losses_apart():
    history = [EpochMetrics(epoch=e, train_batch_loss=1.0 / e, train_batch_accuracy=0.5 + e / 10, val_loss=0.8 / e,
                            val_accuracy=0.6 + e / 10, lr=1e-3, train_seconds=1.0, epoch_seconds=1.2) for e in (1, 2, 3)]
    figure = learning_curves(history)
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == ["training loss (label-smoothed, as optimized)", "validation loss (NLL)", "accuracy"]
    train_loss, val_loss, accuracy = figure.axes
    assert list(train_loss.lines[0].get_ydata()) == [1.0, 0.5, 1.0 / 3]
    assert list(val_loss.lines[0].get_ydata()) == [0.8, 0.4, 0.8 / 3]
    assert len(accuracy.lines) == 2  # training batches and validation, on one scale
