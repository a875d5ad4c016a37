"""The figures say what they show."""

from pipeline.tracking.figures import learning_curves
from pipeline.training.train import EpochMetrics


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


def study_of(n_trials: int):
    """A study of ``n_trials`` written by hand (no training): curves rising to values that depend on
    the parameters, most trials stopped early as a pruner would, one that learns nothing."""
    import math

    import optuna

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    study.set_metric_names(["val_accuracy"])
    for number in range(n_trials):
        trial = study.ask()
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.suggest_categorical("optimizer_with_a_long_name", ["adam", "adamw", "sgd"])
        trial.suggest_int("hidden_sizes_1_and_more_words", 64, 512)
        top = 0.1 if number == 3 else 0.92 - abs(math.log10(lr) + 2.5) * 0.02
        epochs = 20 if number % 5 == 0 else 4
        for epoch in range(1, epochs + 1):
            trial.report(top - 0.2 * math.exp(-epoch / 3), epoch)
        study.tell(trial, top if epochs == 20 else None,
                   state=optuna.trial.TrialState.COMPLETE if epochs == 20 else optuna.trial.TrialState.PRUNED)
    return study


def test_the_study_images_stay_legible_at_hundreds_of_trials():
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from pipeline.tracking.study_figures import study_images

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. matplotlib's "Tight layout not applied"
        figures = study_images(study_of(300))
        for figure in figures.values():  # layout warnings come when a figure is drawn
            FigureCanvasAgg(figure).draw()
    assert {"optimization_history", "intermediate_values", "parallel_coordinate"} <= set(figures)
    curves = figures["intermediate_values"].axes[0]
    assert len(curves.get_legend().get_texts()) == 2  # one entry per state, not one per trial
    assert curves.get_ylim()[0] > 0.5  # the trial that learned nothing does not flatten the others
    coordinates = figures["parallel_coordinate"]
    boxes = [label.get_window_extent() for label in coordinates.axes[0].get_xticklabels()]
    assert len(boxes) == 3 and not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
