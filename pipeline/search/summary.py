"""What a session reports: the line after each trial, and the summary at its end (`make compare`
counts epochs the same way). Optuna and the standard library only: no torch."""

from __future__ import annotations

import bisect
import statistics
import time
from collections import Counter

import optuna
from optuna.trial import TrialState

from pipeline.progress import clock
from pipeline import attrs

# Trials that count towards a study's target: complete or pruned (FAIL does not; its retry will).
COMPLETE_OR_PRUNED = (TrialState.COMPLETE, TrialState.PRUNED)


def count_complete_or_pruned(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COMPLETE_OR_PRUNED))


def count_failed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


class ProgressLine:
    """An Optuna callback: after each trial, what it did, the best so far, counts by state, elapsed time."""

    def __init__(self, started: float, max_epochs: int):
        self.started = started
        self.max_epochs = max_epochs

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        counts = Counter(t.state for t in study.get_trials(deepcopy=False))
        epochs = trial.user_attrs.get(attrs.EPOCHS_RUN, 0)
        if trial.state == TrialState.COMPLETE:
            outcome = f"val {trial.value:.4f} after {epochs} epochs"
        elif trial.state == TrialState.PRUNED:
            outcome = f"pruned at epoch {epochs}/{self.max_epochs}"
        else:
            reason = trial.user_attrs.get(attrs.FAIL_REASON) or trial.system_attrs.get("fail_reason", "?")
            outcome = f"failed: {reason}"
        try:
            best = f"best {study.best_value:.4f} (#{study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        print(f"trial {trial.number:3d} {trial.state.name:8s} {outcome:32s} | {best} | "
              f"{counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
              f"{counts[TrialState.FAIL]} failed | {clock(time.time() - self.started)}", flush=True)


def epoch_counts(trials, *, default_max_epochs: int | None = None) -> tuple[int, int]:
    """Epochs the complete and pruned trials ran, and what they would have run without pruning (each
    its maximum epochs; a trial recorded before `max_epochs` existed counts ``default_max_epochs``, or
    what it ran when that is not known). Used by `make tune`'s summary and by `make compare`."""
    finished = [t for t in trials if t.state in COMPLETE_OR_PRUNED]
    run = sum(t.user_attrs.get(attrs.EPOCHS_RUN, 0) for t in finished)
    unpruned = sum(t.user_attrs.get(attrs.MAX_EPOCHS, default_max_epochs or t.user_attrs.get(attrs.EPOCHS_RUN, 0))
                   for t in finished)
    return run, unpruned


def epochs_below_median(trials) -> tuple[int, int]:
    """Epochs the finished trials spent, and how many of them went to trials that ended below the
    median of the finished trials' final values (a pruned trial's is its last report): the share of
    the budget a search spent on configurations it ends up ranking in its worse half."""
    finished = [t for t in trials if t.state in COMPLETE_OR_PRUNED and _final_value(t) is not None]
    if not finished:
        return 0, 0
    median = statistics.median(_final_value(t) for t in finished)
    below = sum(t.user_attrs.get(attrs.EPOCHS_RUN, 0) for t in finished if _final_value(t) < median)
    return below, sum(t.user_attrs.get(attrs.EPOCHS_RUN, 0) for t in finished)


def rank_correlation(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties share their mean rank); None with fewer than three pairs or
    when either side does not vary. Python 3.11's statistics module has no ranked correlation."""
    if len(xs) < 3:
        return None
    try:
        return statistics.correlation(_ranks(xs), _ranks(ys))
    except statistics.StatisticsError:  # a constant side
        return None


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def searched_trials(trials) -> list:
    """The complete and pruned trials of the search itself: final-phase runs are left out."""
    return [t for t in trials if t.state in COMPLETE_OR_PRUNED and not attrs.is_final_run(t)]


def rung_report(trials, rungs: list[int]) -> dict:
    """How far pruning could be trusted. At each rung (an epoch where the pruner compares trials): the
    rank correlation between the values there and the final values of the trials that ran to the end
    (the measure of whether a rung predicts: only the best reach the end, which narrows their spread and lowers it), and
    between the values there and at the next rung, over every trial that reached the next rung (a
    wider sample of the same question); and how many searched trials reached the last rung."""
    searched = searched_trials(trials)
    ended = [t for t in searched if t.state == TrialState.COMPLETE]
    report = {"rungs": [], "searched": len(searched), "reached_last_rung": None}
    for rung, next_rung in zip(rungs, [*rungs[1:], None]):
        pairs = [(t.intermediate_values[rung], t.value) for t in ended if rung in t.intermediate_values]
        entry = {"epoch": rung, "trials": len(pairs), "rank_correlation": _correlation(pairs)}
        if next_rung is not None:
            onward = [(t.intermediate_values[rung], t.intermediate_values[next_rung]) for t in searched
                      if rung in t.intermediate_values and next_rung in t.intermediate_values]
            entry.update(next_epoch=next_rung, next_trials=len(onward), next_rank_correlation=_correlation(onward))
        report["rungs"].append(entry)
    if rungs:
        report["reached_last_rung"] = sum(t.last_step is not None and t.last_step >= rungs[-1] for t in searched)
    return report


def _correlation(pairs: list[tuple[float, float]]) -> float | None:
    return rank_correlation(*zip(*pairs)) if pairs else None


def default_trials(trials, default_params: dict | None = None) -> list:
    """The trials of the study's default configuration, final-phase runs left out: marked so when
    prepare_study queued them (their retries carry the mark), or, in a study from before the mark,
    those that ran ``default_params`` (the study file's first configuration), when given."""
    return [t for t in trials if not attrs.is_final_run(t) and (
        t.user_attrs.get(attrs.DEFAULT_CONFIGURATION) or (default_params is not None and t.params == default_params))]


def default_trial(trials):
    """The study's default configuration's trial, once one of them completed."""
    return next((t for t in default_trials(trials) if t.state == TrialState.COMPLETE), None)


def best_searched_trial(trials):
    """The best complete trial of the search itself. A final-phase run is left out: the default
    retrained longer is not the search beating the default (the baseline is that comparison)."""
    complete = [t for t in searched_trials(trials) if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: t.value, default=None)


def against_default(trials) -> dict | None:
    """The best searched trial against the default configuration's trial, for a search (not a baseline)."""
    default, best = default_trial(trials), best_searched_trial(trials)
    if default is None or best is None:
        return None
    return {"default_number": default.number, "default_val_accuracy": default.value,
            "best_searched_number": best.number, "best_searched_val_accuracy": best.value}


def epochs_that_fit(seconds: float, pace: float, cap: int | None = None) -> int:
    """Whole epochs of ``pace`` seconds each that fit in ``seconds`` (none when no time is left), at
    most ``cap``: a final phase's length, and a baseline's."""
    fit = max(0, int(seconds / pace))
    return fit if cap is None else min(fit, cap)


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the intervals: the time some trial was running. Gaps between
    sessions do not count, parallel workers are not counted twice."""
    return busy_seconds_until(spans, [float("inf")])[0]


def busy_seconds_until(spans: list[tuple[float, float]], moments: list[float]) -> list[float]:
    """The busy seconds (see busy_seconds) up to each of ``moments``, from one pass over the spans:
    their union is merged once, then each moment is a binary search into it (a curve of a study of
    10,000 trials took 13 s when each moment sorted every span again)."""
    merged: list[list[float]] = []  # the union of the spans: disjoint, sorted
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    starts = [start for start, _ in merged]
    before = [0.0]  # busy seconds before each merged interval
    for start, end in merged:
        before.append(before[-1] + end - start)
    result = []
    for moment in moments:
        i = bisect.bisect_left(starts, moment)  # intervals that start before the moment
        result.append(before[i - 1] + max(0.0, min(merged[i - 1][1], moment) - merged[i - 1][0]) if i else 0.0)
    return result


def format_correlation(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _final_value(trial) -> float | None:
    if trial.state == TrialState.COMPLETE:
        return trial.value
    return trial.intermediate_values[trial.last_step] if trial.last_step is not None else None


def summarize(study: optuna.Study, *, max_epochs: int, seconds: float) -> dict:
    """The session's numbers (``max_epochs``: what a trial recorded before `max_epochs` existed ran)."""
    trials = study.get_trials(deepcopy=False)
    rungs = study.user_attrs.get(attrs.STUDY_RUNGS, [])
    is_search = study.user_attrs.get(attrs.STUDY_KIND, "search") == "search"
    counts = Counter(t.state.name for t in trials)
    finished = [t for t in trials if t.state in COMPLETE_OR_PRUNED]
    epochs_run, epochs_unpruned = epoch_counts(trials, default_max_epochs=max_epochs)
    summary = {
        "study": study.study_name,
        "trials": len(trials),
        "states": dict(counts),
        "epochs_run": epochs_run,
        "epochs_unpruned": epochs_unpruned,
        "epochs_below_median": epochs_below_median(trials)[0],
        "session_seconds": round(seconds, 1),
        "best_trial": None,
        "pruning": rung_report(trials, rungs) if rungs else None,
        "against_default": against_default(trials) if is_search else None,
    }
    tracked = [t for t in finished if attrs.TRACKING_SECONDS in t.user_attrs]
    if tracked:
        # What MLflow cost the study's trials: their seconds in MLflow calls out of their seconds in all.
        summary["trial_tracking_seconds"] = round(sum(t.user_attrs[attrs.TRACKING_SECONDS] for t in tracked), 1)
        summary["tracked_trial_seconds"] = round(sum(t.user_attrs[attrs.SECONDS] for t in tracked), 1)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        summary["best_trial"] = {"number": best.number, "val_accuracy": best.value, "params": best.params,
                                 "best_epoch": best.user_attrs.get(attrs.BEST_EPOCH),
                                 "final_of": best.user_attrs.get(attrs.FINAL_OF)}
    finals = [t for t in complete if attrs.is_final_run(t)]
    if finals:
        final = finals[-1]
        retrained = next(t for t in trials if t.number == final.user_attrs[attrs.FINAL_OF])
        summary["final"] = {"number": final.number, "epochs": final.user_attrs[attrs.FINAL_EPOCHS],
                            "val_accuracy": final.value, "of": retrained.number, "of_val_accuracy": retrained.value,
                            "of_epochs": retrained.user_attrs.get(attrs.EPOCHS_RUN)}
    return summary


def _pruning_lines(pruning: dict | None) -> list[str]:
    if not pruning or not pruning["searched"] or not pruning["rungs"]:
        return []
    rungs, reached = pruning["rungs"], pruning["reached_last_rung"]
    to_end = ", ".join(f"{format_correlation(r['rank_correlation'])} at epoch {r['epoch']} ({r['trials']} trials)"
                       for r in rungs)
    lines = [f"Pruning rungs: rank correlation with the final value, over the trials that ran to the end: {to_end}"]
    onward = [r for r in rungs if "next_epoch" in r]
    if onward:
        lines.append("  and with the next rung, over every trial that reached it: " + ", ".join(
            f"{format_correlation(r['next_rank_correlation'])} from epoch {r['epoch']} to {r['next_epoch']} "
            f"({r['next_trials']} trials)" for r in onward))
    lines.append(f"  {reached} of {pruning['searched']} searched trials ({reached / pruning['searched']:.0%}) "
                 f"reached the last rung (epoch {rungs[-1]['epoch']})")
    return lines


def _against_default_lines(against: dict | None) -> list[str]:
    if not against:
        return []
    if against["best_searched_number"] == against["default_number"]:
        return [f"The default configuration (trial {against['default_number']}, "
                f"{against['default_val_accuracy']:.2%}) is still the best searched trial: the search has not "
                f"beaten it"]
    lead = (against["best_searched_val_accuracy"] - against["default_val_accuracy"]) * 100
    return [f"Best searched trial against the default configuration (trial {against['default_number']}, "
            f"{against['default_val_accuracy']:.2%}): {lead:+.2f} points (final phase left out)"]


def format_summary(summary: dict) -> str:
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary["states"].items())) or "none"
    lines = [f"Study {summary['study']}: {summary['trials']} trials ({states})"]
    best = summary["best_trial"]
    if best:
        lines.append(f"Best: trial {best['number']}, validation accuracy {best['val_accuracy']:.2%} "
                     f"(epoch {best['best_epoch']})")
        lines += [f"  {name} = {value}" for name, value in best["params"].items()]
    final = summary.get("final")
    if final:
        if summary["best_trial"]["number"] == final["number"]:
            verdict = "the study's best"
        else:
            verdict = "better" if final["val_accuracy"] > final["of_val_accuracy"] else "no better"
            verdict += f", but trial {summary['best_trial']['number']} is the study's best"
        lines.append(f"Final phase: trial {final['number']} retrained trial {final['of']} for {final['epochs']} epochs "
                     f"(it ran {final['of_epochs']}): {final['val_accuracy']:.2%} against {final['of_val_accuracy']:.2%}, "
                     f"{verdict}")
    unpruned = summary["epochs_unpruned"]
    if unpruned:
        saved = unpruned - summary["epochs_run"]
        lines.append(f"Epochs: {summary['epochs_run']} run of {unpruned} that the finished trials "
                     f"could have used: pruning saved {saved} ({saved / unpruned:.0%})")
    if summary["epochs_run"]:
        below = summary["epochs_below_median"]
        lines.append(f"Epochs on trials that ended below the median: {below} of {summary['epochs_run']} "
                     f"({below / summary['epochs_run']:.0%})")
    lines += _pruning_lines(summary.get("pruning"))
    lines += _against_default_lines(summary.get("against_default"))
    lines.append(f"Wall time this session: {clock(summary['session_seconds'])}")
    if "trial_tracking_seconds" in summary:
        in_trials, of = summary["trial_tracking_seconds"], summary["tracked_trial_seconds"]
        line = f"MLflow tracking: {in_trials:.1f} s of the finished trials' {of:.0f} s ({in_trials / of:.1%})"
        if "session_tracking_seconds" in summary:
            line += f", and {summary['session_tracking_seconds']:.1f} s this session for its run and promotion"
        lines.append(line)
    promotion = summary.get("promotion")
    if promotion:
        lines.append(f"Registry: {promotion['model']} version {promotion['version']} "
                     f"({promotion['val_accuracy']:.2%} validation): {promotion['outcome']}")
    return "\n".join(lines)

