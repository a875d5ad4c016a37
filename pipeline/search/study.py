"""Open or prepare a study: create it or load it, record what it is, queue what it runs first."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline import attrs
from pipeline.search.study_file import FIRST_STREAM, StudyFileError, StudySpec


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage, worker: int = 0,
               session_seed: int | None = None, stream: tuple[int, int] = FIRST_STREAM) -> optuna.Study:
    """Create the study or load it (``load_if_exists``): running `make tune` again continues it. Its
    sampler is ``worker``'s of the session seeded ``session_seed``, on ``stream`` (StudySpec.make_sampler)."""
    return optuna.create_study(
        study_name=spec.name, storage=storage, direction=spec.direction,
        sampler=spec.make_sampler(worker, session_seed, stream), pruner=spec.make_pruner(), load_if_exists=True,
    )


def study_family(spec: StudySpec) -> str:
    """The model family a study trains: its fixed one, or "searched"."""
    return "searched" if "model" in {p.name for p in spec.space} else spec.base_config().model


def study_rules(spec: StudySpec) -> dict[str, Any]:
    """What makes a study's trials comparable with one another, flat: the settings its file sets (its
    `[fixed]` table and its recipe's, after `--set`), the search space, the pruner that compares them
    and the objective. Sampler, budget and final phase may change between sessions: they change which
    trials run, not what a trial's value means. TrainConfig's own defaults are left out: a field the
    code gains, or a default it changes, must not lock every study out."""
    fixed = {f"fixed.{key}": value for key, value in spec.fixed.items()}
    space = {f"search.{param.name}": _described(param) for param in spec.space}
    pruner = {f"pruner.{key}": value for key, value in spec.pruner.items()}
    return json.loads(json.dumps({**fixed, **space, **pruner, "objective": spec.objective}))  # as stored


def _described(param) -> str:
    """A searched field's range in a few words: what differs from a Param's defaults."""
    return ", ".join(f"{field.name}={getattr(param, field.name)}" for field in dataclasses.fields(param)
                     if field.name != "name" and getattr(param, field.name) != field.default)


def check_study_matches(spec: StudySpec, storage: optuna.storages.BaseStorage) -> None:
    """Refuse to add this file's trials to a study of the same name that trains another model family
    (two files with one stem, say: its best trial would compare an MLP with a CNN), or that ran under
    other rules (an edited file, another `--set`: the sampler and the pruner would compare trials
    trained differently)."""
    # The study's own row and attributes: optuna.get_all_study_summaries would read every trial of every study.
    try:
        existing = storage.get_study_user_attrs(storage.get_study_id_from_name(spec.name))
    except KeyError:
        return
    theirs = existing.get(attrs.STUDY_MODEL_FAMILY)
    if theirs is not None and theirs != study_family(spec):
        raise StudyFileError(f"{spec.path}: the storage already holds a study {spec.name!r} of the {theirs} family "
                             f"(from {existing.get(attrs.STUDY_FILE, 'another file')}), and this file "
                             f"trains {study_family(spec)}. Fix: rename the file (the study takes its name), or use "
                             f"another storage.")
    recorded = existing.get(attrs.STUDY_RULES)
    if recorded is None:
        return  # a study from before the rules were recorded: this session records them
    ours = study_rules(spec)
    changed = [f"{key.removeprefix('fixed.')} {recorded.get(key, '(none)')} -> {ours.get(key, '(none)')}"
               for key in sorted(set(recorded) | set(ours)) if recorded.get(key) != ours.get(key)]
    if changed:
        raise StudyFileError(f"{spec.path}: study {spec.name!r} in this storage ran with other settings "
                             f"({'; '.join(changed)}); its trials and new ones would not compare. Fix: run it as "
                             f"it was (undo the edit or the --set), or start a new study: copy the file to "
                             f"studies/<new name>.toml, or delete the old one (optuna delete-study --study-name "
                             f"{spec.name} --storage URL).")


def prepare_study(spec: StudySpec, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Once per session, before any worker starts: create the study, record what it is (the dashboard
    shows these attributes, and names the objective's axis), enqueue the study file's known
    configurations on a new study, and re-queue trials a Ctrl-C interrupted."""
    study = open_study(spec, storage)
    study.set_metric_names([spec.objective])
    if attrs.STUDY_UID not in study.user_attrs:  # unlike its name, this tells it from a namesake in another storage
        study.set_user_attr(attrs.STUDY_UID, uuid.uuid4().hex[:12])
    if attrs.STUDY_RULES not in study.user_attrs:  # what the next session's check_study_matches holds it to
        study.set_user_attr(attrs.STUDY_RULES, study_rules(spec))
    family = study_family(spec)
    for key, value in ((attrs.STUDY_DESCRIPTION, spec.description), (attrs.STUDY_MODEL_FAMILY, family),
                       (attrs.STUDY_SAMPLER, spec.sampler["name"]), (attrs.STUDY_PRUNER, spec.pruner["name"]),
                       (attrs.STUDY_FILE, str(spec.path)), (attrs.STUDY_SEED, spec.sampler.get("seed")),
                       (attrs.STUDY_KIND, spec.kind), (attrs.STUDY_RUNGS, spec.pruning_rungs()),
                       (attrs.BASELINE_OF, spec.baseline_of)):
        if value is not None and study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)
    # A study of thousands of trials is read here by queries (its first trial, its failed ones), not
    # loaded whole: the session's workers load it once, for the sampler.
    study_id = storage.get_study_id_from_name(spec.name)
    if not has_trials(storage, study_id):
        for params in warm_start_params(spec, storage):
            study.enqueue_trial(params, skip_if_exists=True)
        for i, params in enumerate(spec.enqueue):  # the first is the default every result is measured against
            study.enqueue_trial(params, user_attrs={attrs.DEFAULT_CONFIGURATION: True} if i == 0 else None,
                                skip_if_exists=True)
    drop_abandoned_final_runs(storage, study_id)
    failed = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.FAIL,))
    if any(t.user_attrs.get(attrs.INTERRUPTED) for t in failed):
        requeue_interrupted(study)
    return study


# A final-phase run is queued by its session and taken by it at once; one still waiting after this
# many seconds was left by a session killed in between.
ABANDONED_AFTER_SECONDS = 120


def drop_abandoned_final_runs(storage: optuna.storages.BaseStorage, study_id: int) -> None:
    """Fail the final-phase runs a killed session queued and never started: run later, they would
    train for the epochs that session's time allowed, not this one's. This session's final phase
    then plans its own."""
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        queued_at = trial.user_attrs.get(attrs.QUEUED_AT)
        if attrs.is_final_run(trial) and (queued_at is None or time.time() - queued_at > ABANDONED_AFTER_SECONDS):
            storage.set_trial_user_attr(trial._trial_id, attrs.FAIL_REASON, "a final-phase run its session, killed, "
                                        "never started; the next session's final phase plans its own")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


def has_trials(storage: optuna.storages.BaseStorage, study_id: int) -> bool:
    """Whether the study has a trial, from one indexed row: trial numbers start at 0."""
    try:
        storage.get_trial_id_from_study_id_trial_number(study_id, 0)
        return True
    except KeyError:
        return False


def warm_start_params(spec: StudySpec, storage: optuna.storages.BaseStorage) -> list[dict]:
    """The parameters of the earlier study's best complete trials (`[warm_start]`) that lie in this
    study's space, best first; none, with a note, when that study is not in the storage."""
    if spec.warm_start is None:
        return []
    name, wanted = spec.warm_start.study, spec.warm_start.best
    try:
        earlier = storage.get_study_id_from_name(name)
    except KeyError:
        print(f"note: warm start: no study {name!r} in this storage yet; starting from the study file alone",
              flush=True)
        return []
    # Its complete trials only, selected by the database (the storage itself, not a Study: a Study's cache
    # loads every trial first, and an earlier study may hold thousands of pruned ones).
    maximize = storage.get_study_directions(earlier)[0] == optuna.study.StudyDirection.MAXIMIZE
    complete = sorted(storage.get_all_trials(earlier, deepcopy=False, states=(TrialState.COMPLETE,)),
                      key=lambda t: t.value, reverse=maximize)
    chosen = []  # what this study searches of each; what it searches and the earlier one did not is sampled
    for params in (spec.in_space(t.params) for t in complete):
        if params and spec.fits(params) and params not in chosen:
            chosen.append(params)
    print(f"warm start: {len(chosen[:wanted])} best configurations of study {name!r} queued first", flush=True)
    return chosen[:wanted]


def requeue_interrupted(study: optuna.Study) -> None:
    """Queue again the parameters of trials a Ctrl-C ended (once each); an interrupted final phase
    is left to the end of the next session, which fits it to its own time."""
    trials = study.get_trials(deepcopy=False)
    requeued = {t.user_attrs.get(attrs.RETRY_OF) for t in trials}
    for trial in trials:
        if (trial.state == TrialState.FAIL and trial.user_attrs.get(attrs.INTERRUPTED)
                and trial.number not in requeued and not attrs.is_final_run(trial)):
            study.enqueue_trial(trial.params, user_attrs=attrs.retry_attrs(trial))


def quiet_optuna() -> None:
    """Our progress line replaces Optuna's per-trial log; heartbeats are marked experimental but are
    the documented way to recover trials of killed workers."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial's reason is on our line
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
