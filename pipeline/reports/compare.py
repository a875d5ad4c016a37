"""Studies side by side: did the search beat its default trained alone, did TPE with pruning beat
random search, did the CNN beat the MLP, for the time and epochs spent? Records per study, grouped
across sampler seeds (`make tune SEED=n`), a table, a page (compare_page.py) and an MLflow run.

Time is the study's busy wall time: the union of its trials' running intervals, so the gaps
between sessions do not count and parallel workers are not counted twice.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline.training.config import ConfigError
from pipeline.progress import clock
from pipeline import attrs
from pipeline.search.summary import (
    against_default,
    busy_seconds,
    busy_seconds_until,
    epoch_counts,
    format_correlation,
    rung_report,
)

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
    group: str = ""  # the study file's name (seeds of one search share it), "<name>-baseline" for a baseline
    kind: str = "search"  # or "baseline"
    seed: int | None = None  # the sampler's
    against_default: dict | None = None  # summary.against_default: the best searched trial and the default's
    pruning: dict | None = None  # summary.rung_report: rank correlation at each rung, trials reaching the last
    seconds_to_reference: float | None = None  # busy time until best-so-far reached the family's reference

    @property
    def lead_over_default(self) -> float | None:
        """The best searched trial's validation accuracy less the default configuration's, in points."""
        against = self.against_default
        if against is None:
            return None
        return (against["best_searched_val_accuracy"] - against["default_val_accuracy"]) * 100


def study_names(storage) -> list[str]:
    """The names alone: optuna.get_all_study_summaries would read every trial of every study to count them."""
    return sorted(optuna.get_all_study_names(storage))


def describe(study: optuna.Study, rungs: list[int] | None = None) -> StudyRecord:
    """The study's record; ``rungs`` (epochs) replace the pruning rungs it recorded for the rank
    correlations: an unpruned study shows where rungs would predict the end. A baseline is its latest
    complete run (`make baseline` again after more sessions adds a run fitted to the longer time)."""
    about = study.user_attrs
    kind = about.get(attrs.STUDY_KIND, "search")
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    trials.sort(key=lambda t: t.datetime_complete)
    if kind == "baseline":
        trials = [t for t in trials if t.state == TrialState.COMPLETE][-1:]
    counts = {state: sum(t.state == state for t in trials) for state in TrialState}
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials]
    busy_until = busy_seconds_until(spans, [end for _, end in spans])
    curve, best, epochs_spent = [], None, 0
    for trial, busy in zip(trials, busy_until):
        # Epochs spent by every trial that has ended, failed ones too: what the study has paid so far.
        epochs_spent += trial.user_attrs.get(attrs.EPOCHS_RUN, len(trial.intermediate_values))
        if trial.state == TrialState.COMPLETE and (best is None or (trial.value > best) == maximize):
            best = trial.value
        if best is not None:
            curve.append((busy, epochs_spent, best))
    epochs_run, epochs_unpruned = epoch_counts(trials)
    rungs = rungs or about.get(attrs.STUDY_RUNGS, [])
    near = next(((s, e) for s, e, b in curve if abs(best - b) <= NEAR_BEST + 1e-12), (None, None))
    return StudyRecord(
        study=study.study_name, model_family=about.get(attrs.STUDY_MODEL_FAMILY, "?"),
        sampler=about.get(attrs.STUDY_SAMPLER, "?"), pruner=about.get(attrs.STUDY_PRUNER, "?"),
        best_val_accuracy=best, complete=counts[TrialState.COMPLETE], pruned=counts[TrialState.PRUNED],
        failed=counts[TrialState.FAIL], epochs_run=epochs_run, epochs_unpruned=epochs_unpruned,
        wall_seconds=busy_seconds(spans), seconds_to_near_best=near[0], epochs_to_near_best=near[1], curve=curve,
        values=[t.value for t in trials if t.state == TrialState.COMPLETE], group=study_group(study), kind=kind,
        seed=about.get(attrs.STUDY_SEED), against_default=against_default(trials) if kind == "search" else None,
        pruning=rung_report(trials, rungs) if rungs else None)


def study_group(study: optuna.Study) -> str:
    """Studies that differ only by the sampler's seed share a group: their study file's name (and the
    baselines of its seeds, with "-baseline"). A study recorded before files were is its own group."""
    file = study.user_attrs.get(attrs.STUDY_FILE)
    if file is None:
        return study.study_name
    stem = Path(file).stem
    return f"{stem}-baseline" if study.user_attrs.get(attrs.STUDY_KIND) == "baseline" else stem


@dataclass
class GroupRecord:
    """A search over its seeds (or the baselines of its seeds): the spread `make compare` shows."""

    group: str
    kind: str
    model_family: str
    sampler: str
    pruner: str
    studies: list[str]
    best_median: float | None
    best_low: float | None
    best_high: float | None
    beat_default: int  # studies whose best searched trial is better than their default configuration's
    with_default: int  # studies whose default configuration ran
    seconds_to_reference_median: float | None  # None when a seed never got there, or there is no reference
    reached_reference: int  # studies that did
    first_rung_correlation_median: float | None  # with the final values of the trials that ran to the end
    first_rung_next_correlation_median: float | None  # with the next rung's values, over the trials reaching it
    reached_last_rung_share: float | None  # of all the group's searched trials


@dataclass(frozen=True)
class Reference:
    """A model family's yardstick for "how long until the search was as good as ...": a group's median
    best validation accuracy less NEAR_BEST."""

    group: str
    level: float


def group_records(records: list[StudyRecord]) -> list[GroupRecord]:
    groups: dict[str, list[StudyRecord]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    return [_group(name, members) for name, members in groups.items()]


def pick_references(records: list[StudyRecord], reference: str | None = None) -> dict[str, Reference]:
    """Each model family's reference: the group named ``reference`` (for its family), or else the family's
    random search with pruning (the same fidelity as the search it is measured against), the first by name
    when there are several; a family with no random search has none."""
    groups = {r.group: r for r in records}  # a group's first study stands for its sampler, pruner and family
    if reference is not None and reference not in groups:
        raise ConfigError(f"--reference {reference!r} is not a group of the studies compared "
                          f"(groups: {', '.join(groups)})")
    chosen: dict[str, str] = {}
    if reference is not None:
        chosen[groups[reference].model_family] = reference
    for name in sorted(groups):
        first = groups[name]
        if first.sampler == "random" and first.kind == "search" and first.pruner != "none":
            chosen.setdefault(first.model_family, name)
    references = {}
    for family, name in chosen.items():
        bests = [r.best_val_accuracy for r in records if r.group == name and r.best_val_accuracy is not None]
        if bests:
            references[family] = Reference(name, statistics.median(bests) - NEAR_BEST)
    return references


def time_to_reference(records: list[StudyRecord], references: dict[str, Reference]) -> None:
    """Fill in each study's busy time until its best so far reached its family's reference level."""
    for r in records:
        reference = references.get(r.model_family)
        if reference is not None:
            r.seconds_to_reference = next((s for s, _, best in r.curve if best >= reference.level - 1e-12), None)


def _group(name: str, members: list[StudyRecord]) -> GroupRecord:
    bests = [m.best_val_accuracy for m in members if m.best_val_accuracy is not None]
    leads = [m.lead_over_default for m in members if m.lead_over_default is not None]
    times = [m.seconds_to_reference for m in members]
    first_rungs = [m.pruning["rungs"][0] for m in members if m.pruning and m.pruning["rungs"]]
    searched = sum(m.pruning["searched"] for m in members if m.pruning)
    reached = sum(m.pruning["reached_last_rung"] or 0 for m in members if m.pruning)
    first = members[0]
    return GroupRecord(
        group=name, kind=first.kind, model_family=first.model_family, sampler=first.sampler, pruner=first.pruner,
        studies=[m.study for m in members], best_median=statistics.median(bests) if bests else None,
        best_low=min(bests, default=None), best_high=max(bests, default=None),
        beat_default=sum(lead > 0 for lead in leads), with_default=len(leads),
        seconds_to_reference_median=statistics.median(times) if times and None not in times else None,
        reached_reference=sum(t is not None for t in times),
        first_rung_correlation_median=_median_of(first_rungs, "rank_correlation"),
        first_rung_next_correlation_median=_median_of(first_rungs, "next_rank_correlation"),
        reached_last_rung_share=reached / searched if searched else None)


def _median_of(entries: list[dict], key: str) -> float | None:
    values = [e[key] for e in entries if e.get(key) is not None]
    return statistics.median(values) if values else None


def percent(value: float | None) -> str:
    return f"{value:.2%}" if value is not None else "-"


def format_table(records: list[StudyRecord], references: dict[str, Reference]) -> str:
    width = max([len("study"), *(len(r.study) for r in records)]) + 2
    header = (f"{'study':<{width}}{'sampler':<8}{'pruner':<20}{'best val':>9}{'vs default':>11}{'C/P/F':>10}"
              f"{'epochs':>15}{'wall':>9}{'to best-0.2':>16}{'to ref':>8}{'rung rho':>14}")
    lines = [header, "-" * len(header)]
    for r in records:
        near = (f"{clock(r.seconds_to_near_best)} / {r.epochs_to_near_best} ep"
                if r.seconds_to_near_best is not None else "-")
        lines.append(f"{r.study:<{width}}{r.sampler:<8}{r.pruner:<20}{percent(r.best_val_accuracy):>9}"
                     f"{points_over_default(r):>11}{f'{r.complete}/{r.pruned}/{r.failed}':>10}"
                     f"{f'{r.epochs_run} of {r.epochs_unpruned}':>15}{clock(r.wall_seconds):>9}{near:>16}"
                     f"{study_to_reference(r, references):>8}{first_rung_correlation(r):>14}")
    lines.append("vs default: the best searched trial (final phase left out) minus the default configuration's "
                 "trial, in points. C/P/F: trials complete / pruned / failed. epochs: run, of what the finished "
                 "trials would have run unpruned. wall: busy wall time. to best-0.2: time and epochs until within "
                 "0.2 points of the study's best. to ref: time until within 0.2 points of "
                 f"{describe_references(references)}. rung rho: rank correlation of the first pruning rung's "
                 "values with the final values of the trials that ran to the end / with the next rung's values.")
    return "\n".join(lines)


def format_groups(groups: list[GroupRecord], references: dict[str, Reference]) -> str:
    width = max([len("group"), *(len(g.group) for g in groups)]) + 2
    header = (f"{'group':<{width}}{'studies':>8}{'best: median (low-high)':>28}{'beat default':>14}"
              f"{'to ref, median':>24}")
    lines = [header, "-" * len(header)]
    for g in groups:
        spread = f"{percent(g.best_median)} ({percent(g.best_low)}-{percent(g.best_high)})"
        beat = f"{g.beat_default} of {g.with_default}" if g.kind == "search" else "-"
        lines.append(f"{g.group:<{width}}{len(g.studies):>8}{spread:>28}{beat:>14}"
                     f"{group_to_reference(g, references):>24}")
    return "\n".join(lines)


def describe_references(references: dict[str, Reference]) -> str:
    if not references:
        return "a reference (none here: no random search with pruning among the studies)"
    return ", ".join(f"{r.group}'s median best ({percent(r.level + NEAR_BEST)})" for r in references.values())


def study_to_reference(record: StudyRecord, references: dict[str, Reference]) -> str:
    if record.model_family not in references or record.seconds_to_reference is None:
        return "-"
    return clock(record.seconds_to_reference)


def group_to_reference(group: GroupRecord, references: dict[str, Reference]) -> str:
    """The median time to the reference, or how many seeds got there when some did not."""
    if group.model_family not in references:
        return "-"
    if group.seconds_to_reference_median is not None:
        return clock(group.seconds_to_reference_median)
    return f"{group.reached_reference} of {len(group.studies)} got there"


def points_over_default(record: StudyRecord) -> str:
    lead = record.lead_over_default
    return "-" if lead is None else f"{lead:+.2f}"


def first_rung_correlation(record: StudyRecord) -> str:
    """The first rung's rank correlations: with the final values / with the next rung's."""
    rungs = record.pruning["rungs"] if record.pruning else []
    if not rungs:
        return "-"
    return " / ".join(format_correlation(rungs[0].get(key)) for key in ("rank_correlation", "next_rank_correlation"))


def compare(storage, names: list[str] | None = None, rungs: list[int] | None = None) -> list[StudyRecord]:
    """One record per study, in the order asked, or every study in the storage, each group's seeds
    together; ``rungs`` replace each study's own for the rank correlations."""
    from pipeline.search.study_file import StudyFileError

    known = study_names(storage)
    if not known:
        raise StudyFileError("the storage holds no study yet. Fix: run `make tune` first (or point STORAGE / "
                             "OPTUNA_STORAGE at the storage that has them).")
    missing = [n for n in names or [] if n not in known]
    if missing:
        raise StudyFileError(f"no study {missing[0]!r} in the storage (studies there: {', '.join(known) or 'none'}). "
                             f"Fix: run `make tune STUDY={missing[0]}` first, or pick from the list.")
    records = [describe(optuna.load_study(study_name=name, storage=storage), rungs) for name in names or known]
    return records if names else sorted(records, key=lambda r: (r.group, r.seed or 0, r.study))


def log_comparison(records: list[StudyRecord], groups: list[GroupRecord], page_path) -> str:
    """A run in the `compare` experiment holding the page and the table, so the MLflow UI has it too."""
    import time

    import mlflow

    from pipeline.tracking.experiments import ensure_experiment, log_values

    client = mlflow.MlflowClient()
    run = client.create_run(ensure_experiment("compare"), run_name=f"compare {time.strftime('%Y-%m-%d %H:%M:%S')}",
                            tags={"kind": "comparison", "studies": ",".join(r.study for r in records)})
    log_values(client, run.info.run_id, {f"best_val_accuracy.{r.study}": r.best_val_accuracy for r in records
                                         if r.best_val_accuracy is not None})
    client.log_artifact(run.info.run_id, str(page_path))
    client.log_dict(run.info.run_id, {"studies": [as_dict(r) for r in records],
                                      "groups": [asdict(g) for g in groups]}, "compare.json")
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def as_dict(record: StudyRecord) -> dict:
    return asdict(record)

