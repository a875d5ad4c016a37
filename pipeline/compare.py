"""Studies side by side: did TPE with pruning beat random search, did the CNN beat the MLP, for
the time and epochs spent? A table, a self-contained HTML page of best-so-far curves, and an MLflow run.

Time is the study's busy wall time: the union of its trials' running intervals, so the gaps
between sessions do not count and parallel workers are not counted twice.
"""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field

import optuna
from optuna.trial import TrialState

from pipeline.paths import REPORTS_DIR
from pipeline.progress import clock
from pipeline.search import attrs
from pipeline.search.summary import epoch_counts

NEAR_BEST = 0.002  # "came within 0.2 points of its own best"


@dataclass
class StudyRecord:
    """One study, as `make compare` sees it."""

    study: str
    model_family: str
    sampler: str
    pruner: str
    best_val_accuracy: float | None
    complete: int
    pruned: int
    failed: int
    epochs_run: int  # by the complete and pruned trials, as `make tune`'s summary counts them
    epochs_unpruned: int  # what they would have run without pruning
    wall_seconds: float  # busy wall time (see the module's docstring)
    seconds_to_near_best: float | None  # busy wall time until best-so-far came within NEAR_BEST of the best
    epochs_to_near_best: int | None
    # Best-so-far as each trial ended, in that order: (busy seconds, epochs spent by all ended trials, best).
    curve: list[tuple[float, int, float]] = field(default_factory=list, repr=False)
    values: list[float] = field(default_factory=list, repr=False)  # the complete trials' validation accuracies


def study_names(storage) -> list[str]:
    return sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


def describe(study: optuna.Study) -> StudyRecord:
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    trials.sort(key=lambda t: t.datetime_complete)
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials]
    curve, best, epochs_spent = [], None, 0
    for trial in trials:
        # Epochs spent by every trial that has ended, failed ones too: what the study has paid so far.
        epochs_spent += trial.user_attrs.get(attrs.EPOCHS_RUN, len(trial.intermediate_values))
        if trial.state == TrialState.COMPLETE and (best is None or (trial.value > best) == maximize):
            best = trial.value
        if best is not None:
            curve.append((busy_seconds(spans, until=trial.datetime_complete.timestamp()), epochs_spent, best))
    epochs_run, epochs_unpruned = epoch_counts(trials)
    near = next(((s, e) for s, e, b in curve if abs(best - b) <= NEAR_BEST + 1e-12), (None, None)) if curve else (None, None)
    about = study.user_attrs
    return StudyRecord(
        study=study.study_name, model_family=about.get(attrs.STUDY_MODEL_FAMILY, "?"),
        sampler=about.get(attrs.STUDY_SAMPLER, "?"), pruner=about.get(attrs.STUDY_PRUNER, "?"), best_val_accuracy=best, complete=counts[TrialState.COMPLETE],
        pruned=counts[TrialState.PRUNED], failed=counts[TrialState.FAIL], epochs_run=epochs_run,
        epochs_unpruned=epochs_unpruned, wall_seconds=busy_seconds(spans), seconds_to_near_best=near[0],
        epochs_to_near_best=near[1], curve=curve,
        values=[t.value for t in trials if t.state == TrialState.COMPLETE])


def busy_seconds(spans: list[tuple[float, float]], until: float = float("inf")) -> float:
    """The length of the union of the intervals, counted up to ``until``: the time some trial was running."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        end = min(end, until)
        if end > reach and start < until:
            total += end - max(start, reach)
            reach = end
    return total


def format_table(records: list[StudyRecord]) -> str:
    header = (f"{'study':<14}{'model':<6}{'sampler':<8}{'pruner':<20}{'best val':>9}{'C/P/F':>10}"
              f"{'epochs':>15}{'wall':>9}{'to best-0.2':>16}")
    lines = [header, "-" * len(header)]
    for r in records:
        best = f"{r.best_val_accuracy:.2%}" if r.best_val_accuracy is not None else "-"
        near = (f"{clock(r.seconds_to_near_best)} / {r.epochs_to_near_best} ep"
                if r.seconds_to_near_best is not None else "-")
        lines.append(f"{r.study:<14}{r.model_family:<6}{r.sampler:<8}{r.pruner:<20}{best:>9}"
                     f"{f'{r.complete}/{r.pruned}/{r.failed}':>10}{f'{r.epochs_run} of {r.epochs_unpruned}':>15}"
                     f"{clock(r.wall_seconds):>9}{near:>16}")
    lines.append("C/P/F: trials complete / pruned / failed. epochs: run, of what the finished trials would have run "
                 "unpruned. wall: busy wall time. to best-0.2: time and epochs until within 0.2 points of the best.")
    return "\n".join(lines)


def comparison_page(records: list[StudyRecord]) -> str:
    """Best-so-far against wall time and against epochs, and the spread of the complete trials'
    accuracies: one self-contained page (plotly.js inlined once)."""
    import plotly.graph_objects as go

    from pipeline.figures import self_contained_html

    against_time, against_epochs, spread = go.Figure(), go.Figure(), go.Figure()
    for r in records:
        seconds, epochs, best = zip(*r.curve) if r.curve else ((), (), ())
        against_time.add_trace(go.Scatter(x=[s / 60 for s in seconds], y=best, name=r.study, mode="lines+markers",
                                          line_shape="hv"))
        against_epochs.add_trace(go.Scatter(x=epochs, y=best, name=r.study, mode="lines+markers", line_shape="hv"))
        spread.add_trace(go.Box(y=r.values, name=r.study, boxpoints="all", jitter=0.4))
    against_time.update_layout(title="Best validation accuracy so far, against busy wall time",
                               xaxis_title="minutes", yaxis_title="val_accuracy")
    against_epochs.update_layout(title="Best validation accuracy so far, against epochs spent",
                                 xaxis_title="epochs", yaxis_title="val_accuracy")
    spread.update_layout(title="Validation accuracy of the complete trials", yaxis_title="val_accuracy")
    page = self_contained_html({"time": against_time, "epochs": against_epochs, "spread": spread},
                               "Studies compared")
    table = f"<pre>{html.escape(format_table(records))}</pre>"
    return page.replace("</h1>", "</h1>" + table, 1)


def compare(storage, names: list[str] | None = None) -> list[StudyRecord]:
    """One record per study (every study in the storage by default), in the order asked."""
    from pipeline.search.study_file import StudyFileError

    known = study_names(storage)
    if not known:
        raise StudyFileError("the storage holds no study yet. Fix: run `make tune` first (or point STORAGE / "
                             "OPTUNA_STORAGE at the storage that has them).")
    names = names or known
    missing = [n for n in names if n not in known]
    if missing:
        raise StudyFileError(f"no study {missing[0]!r} in the storage (studies there: {', '.join(known) or 'none'}). "
                             f"Fix: run `make tune STUDY={missing[0]}` first, or pick from the list.")
    return [describe(optuna.load_study(study_name=name, storage=storage)) for name in names]


def write_page(records: list[StudyRecord], folder=REPORTS_DIR):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "compare.html"
    path.write_text(comparison_page(records))
    return path


def log_comparison(records: list[StudyRecord], page_path) -> str:
    """A run in the `compare` experiment holding the page and the table, so the MLflow UI has it too."""
    import time

    import mlflow

    from pipeline.experiments import ensure_experiment, log_values

    client = mlflow.MlflowClient()
    run = client.create_run(ensure_experiment("compare"), run_name=f"compare {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={"kind": "comparison", "studies": ",".join(r.study for r in records)})
    log_values(client, run.info.run_id, {f"best_val_accuracy.{r.study}": r.best_val_accuracy for r in records
                                         if r.best_val_accuracy is not None})
    client.log_artifact(run.info.run_id, str(page_path))
    client.log_dict(run.info.run_id, [as_dict(r) for r in records], "compare.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def as_dict(record: StudyRecord) -> dict:
    return asdict(record)

