"""The study's figures as images, for the session's parent run in MLflow: legible at hundreds of
trials. Optuna draws the optimization history and the parameter importances (a handful of legend
entries at any size); the intermediate values and the parallel coordinates are drawn here, coloured
by state or by value with no per-trial legend, because Optuna's matplotlib versions put one legend
entry per trial and let the axis labels collide."""

from __future__ import annotations

import math

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from pipeline.tracking.figures import optuna_figures

STATE_COLOURS = {TrialState.COMPLETE: "tab:blue", TrialState.PRUNED: "tab:orange", TrialState.FAIL: "tab:red"}


def study_images(study: optuna.Study) -> dict:
    """Name -> matplotlib Figure; a figure the study's trials cannot support yet is left out."""
    from optuna.visualization import matplotlib as optuna_matplotlib

    figures = {}
    for name, axes in optuna_figures(study, ("optimization_history", "param_importances"),
                                     plots=optuna_matplotlib).items():
        axes.figure.set_size_inches(9, 5)
        axes.figure.set_layout_engine("constrained")
        figures[name] = axes.figure
    trials = study.get_trials(deepcopy=False, states=tuple(STATE_COLOURS))
    if any(t.intermediate_values for t in trials):
        figures["intermediate_values"] = intermediate_values(trials, study.metric_names)
    if sum(t.state == TrialState.COMPLETE for t in trials) >= 2:
        figures["parallel_coordinate"] = parallel_coordinate(study)
    return figures


def intermediate_values(trials, metric_names=None):
    """Every trial's curve, one thin line each, coloured by how the trial ended. The value axis is
    zoomed to where the good trials are (from the 10th percentile of the values up): a trial that
    learns nothing would otherwise flatten every other curve against the top."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(9, 5), layout="constrained")
    axes = figure.subplots()
    values = []
    for trial in trials:
        steps = sorted(trial.intermediate_values)
        curve = [trial.intermediate_values[s] for s in steps]
        values += curve
        axes.plot(steps, curve, color=STATE_COLOURS[trial.state], linewidth=0.8, alpha=0.6)
    finite = [v for v in values if math.isfinite(v)]
    if finite:
        low, high = np.percentile(finite, 10), max(finite)
        margin = max(high - low, 1e-3) * 0.05
        axes.set_ylim(low - margin, high + margin)
    counts = {state: sum(t.state == state for t in trials) for state in STATE_COLOURS}
    axes.legend(handles=[Line2D([], [], color=colour, label=f"{state.name.lower()} ({counts[state]})")
                         for state, colour in STATE_COLOURS.items() if counts[state]], loc="lower right")
    metric = (metric_names or ["objective"])[0]
    axes.set(title=f"{metric} at each epoch, {len(trials)} trials (axis from the 10th percentile up)",
             xlabel="epoch", ylabel=metric)
    axes.grid(alpha=0.3)
    return figure


def parallel_coordinate(study: optuna.Study):
    """The complete trials across the searched parameters, one vertical axis each (log scale where
    the parameter is sampled on one), lines coloured by the objective, the best trials drawn last,
    on top; parameter names under their axes, turned so that long names do not collide."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    trials = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
                    key=lambda t: t.value, reverse=study.direction != optuna.study.StudyDirection.MAXIMIZE)
    names = sorted({name for t in trials for name in t.params})
    positions = {name: [_position(t, name) for t in trials] for name in names}
    figure = Figure(figsize=(max(8.0, 1.3 * len(names) + 2), 5.5), layout="constrained")
    axes = figure.subplots()
    colours = Normalize(min(t.value for t in trials), max(t.value for t in trials))
    cmap = colormaps["viridis"]
    for i, trial in enumerate(trials):
        ys = [positions[name][i] for name in names]
        axes.plot(range(len(names)), ys, color=cmap(colours(trial.value)), linewidth=1.0, alpha=0.7)
    for x, name in enumerate(names):
        axes.axvline(x, color="black", linewidth=0.6)
        low, high = _range_label(trials, name)
        axes.annotate(high, (x, 1.0), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                      fontsize=7)
        axes.annotate(low, (x, 0.0), xytext=(0, -3), textcoords="offset points", ha="center", va="top", fontsize=7)
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.tick_params(axis="x", pad=14)
    axes.set_yticks([])
    axes.set_ylim(-0.08, 1.08)
    axes.set_title(f"Complete trials ({len(trials)}) across the searched parameters; each axis from its "
                   f"lowest to its highest value")
    figure.colorbar(ScalarMappable(colours, cmap), ax=axes, label=(study.metric_names or ["objective"])[0])
    return figure


def _position(trial, name: str) -> float:
    """Where the trial's value of ``name`` sits on its axis, 0 to 1 (NaN when the trial lacks it)."""
    if name not in trial.params:
        return float("nan")
    distribution = trial.distributions[name]
    if isinstance(distribution, CategoricalDistribution):
        choices = distribution.choices
        return choices.index(trial.params[name]) / max(1, len(choices) - 1)
    low, high, value = distribution.low, distribution.high, trial.params[name]
    if getattr(distribution, "log", False):
        low, high, value = math.log(low), math.log(high), math.log(value)
    return (value - low) / (high - low) if high > low else 0.5


def _range_label(trials, name: str) -> tuple[str, str]:
    distribution = next(t.distributions[name] for t in trials if name in t.distributions)
    if isinstance(distribution, CategoricalDistribution):
        return str(distribution.choices[0]), str(distribution.choices[-1])
    return f"{distribution.low:g}", f"{distribution.high:g}"
