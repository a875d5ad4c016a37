"""`make baseline STUDY=cnn`: what the search is measured against. The study's default configuration
(the first one it queues: its recipe's, or its first [[enqueue]]) trained once, for the epochs that fit
the study's busy wall time at that configuration's own pace, as the final phase fits its epochs.

It runs as a one-trial study, `<study>-baseline`, in the same storage and through the same trainer and
tracking as any trial, so the dashboard, the MLflow UI and `make compare` show it beside the search. It
is a control, not a candidate: it is never registered or promoted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import optuna

from pipeline.progress import clock
from pipeline import attrs
from pipeline.search.study_file import StudyFileError, StudySpec
from pipeline.search.summary import busy_seconds, default_trials, epochs_that_fit


@dataclass(frozen=True)
class BaselinePlan:
    params: dict  # the default configuration's parameters, as its trial in the study ran them
    seconds: float  # the time to match: the study's busy wall time, or --seconds
    pace: float  # seconds an epoch of the default configuration, as its trial in the study ran it
    epochs: int
    capped: bool  # the epochs that fit were more than the cap (the final phase's max_epochs or --max-epochs)


def check_has_default(spec: StudySpec) -> None:
    if not spec.enqueue:
        raise StudyFileError(f"{spec.path}: a baseline trains the study's default configuration, and this file "
                             f"has none. Fix: add a `recipe = \"<name>\"` or an [[enqueue]] table with the "
                             f"default's values")


def plan_baseline(spec: StudySpec, storage, *, seconds: float | None = None,
                  max_epochs: int | None = None) -> BaselinePlan:
    """The epochs the default gets: the study's busy wall time (every session, final phases included) at
    the pace its trial ran in the study (MLflow included), capped like the final phase."""
    try:
        study = optuna.load_study(study_name=spec.name, storage=storage)
    except KeyError:
        raise StudyFileError(f"no study {spec.name!r} in the storage yet: the baseline matches its time and "
                             f"pace. Fix: run `make tune STUDY={spec.name}` first") from None
    check_has_default(spec)
    trials = study.get_trials(deepcopy=False)
    # Its own parameters, sampled ones included when the recipe sets only some of the searched fields.
    ran_default = [t for t in default_trials(trials, spec.enqueue[0]) if t.user_attrs.get(attrs.EPOCH_SECONDS)]
    if not ran_default:
        raise StudyFileError(f"study {spec.name!r} has no trial of its default configuration with a recorded "
                             f"pace ({attrs.EPOCH_SECONDS}) to plan the baseline with. Fix: run `make tune "
                             f"STUDY={spec.name}` (its first trial is the default)")
    default = ran_default[0]
    pace = default.user_attrs[attrs.EPOCH_SECONDS]
    if seconds is None:
        spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in trials
                 if t.datetime_start and t.datetime_complete]
        seconds = busy_seconds(spans)
    cap = max_epochs or (spec.final.max_epochs if spec.final else None)
    epochs = max(1, epochs_that_fit(seconds, pace, cap))
    return BaselinePlan(params=default.params, seconds=seconds, pace=pace, epochs=epochs,
                        capped=bool(cap and epochs_that_fit(seconds, pace) > cap))


def baseline_spec(spec: StudySpec, plan: BaselinePlan) -> StudySpec:
    """The one-trial study that trains the default for the planned epochs: the study's fixed settings
    and search space (so the dashboard shows the same parameters), no pruning, no final phase. The
    sampler samples nothing (the trial is queued with every parameter); its seed is the study's, so
    that `make compare` files the baseline of seed n beside seed n."""
    return replace(spec, name=f"{spec.name}-baseline", fixed={**spec.fixed, "epochs": plan.epochs},
                   sampler={"name": "random", "seed": spec.sampler.get("seed")}, pruner={"name": "none"}, trials=1,
                   timeout=None, enqueue=(plan.params,), warm_start=None, final=None, baseline_of=spec.name)


def describe_plan(spec: StudySpec, plan: BaselinePlan) -> str:
    cap = " (capped: `--max-epochs` or the study's final.max_epochs)" if plan.capped else ""
    return (f"baseline: study {spec.name}'s default configuration trained for {plan.epochs} epochs{cap} at "
            f"{plan.pace:.1f} s an epoch, about {clock(plan.epochs * plan.pace)}, to match the study's "
            f"{clock(plan.seconds)} of busy wall time; study {spec.name}-baseline")


def queue_baseline(spec: StudySpec, study: optuna.Study) -> None:
    """A baseline run again (after more sessions of its study, say) is one more trial of the same study."""
    if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        return
    if study.get_trials(deepcopy=False):
        study.enqueue_trial(spec.enqueue[0], user_attrs={attrs.DEFAULT_CONFIGURATION: True})
