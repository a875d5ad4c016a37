"""A study that has run for weeks holds thousands of trials: what a command reads of the Optuna storage
must be the rows it needs (a study by name, its failed trials, the complete trials of a warm start's
study), not every trial of every study. Counted, not timed: SQLAlchemy's load event, listened to on
every mapper (no Optuna internals imported), counts the rows of the database's `trials` table each
read brings back."""

from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from pipeline.reports.compare import compare
from pipeline import attrs
from pipeline.search.study import check_study_matches, prepare_study, warm_start_params
from pipeline.search.study_file import load_study
from pipeline.stores import close_storage, open_storage

COMPLETE, PRUNED = 4, 8  # trials of the big study; a third complete, as under successive halving


@pytest.fixture
def trial_rows_loaded():
    """Rows of the `trials` table read from the database, by study id. The schema's table name is the
    seam (it is what is on disk), not the Python class Optuna maps it to. The tests that count more
    than zero rows show that the storage's reads do come through here."""
    from sqlalchemy import event
    from sqlalchemy.orm import Mapper

    counts = Counter()

    def loaded(row, _context):
        if getattr(row, "__tablename__", None) == "trials":
            counts[row.study_id] += 1

    event.listen(Mapper, "load", loaded)
    yield counts
    event.remove(Mapper, "load", loaded)


@pytest.fixture
def storage(tmp_path, _filled_database):
    """A SQLite storage with the study `mlp` (studies/mlp.toml's space; COMPLETE + PRUNED trials, as
    prepare_study leaves a study) and another study, `other`, of as many trials: a copy of one database
    filled once for the module (each trial added is a commit of its own: a second a test)."""
    import shutil

    shutil.copyfile(_filled_database, tmp_path / "optuna.db")
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    yield storage
    close_storage(storage)


@pytest.fixture(scope="module")
def _filled_database(tmp_path_factory):
    path = tmp_path_factory.mktemp("storage-reads") / "optuna.db"
    storage = open_storage(f"sqlite:///{path}")
    spec = load_study("mlp")
    sampled = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))  # in memory: values in the space
    for name in ("mlp", "other"):
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        for number in range(COMPLETE + PRUNED):
            trial = sampled.ask()
            spec.config_for(trial)
            complete = number < COMPLETE
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.COMPLETE if complete else TrialState.PRUNED, value=0.8 + number / 100,
                params=trial.params, distributions=trial.distributions, intermediate_values={1: 0.7, 2: 0.75},
                user_attrs={attrs.EPOCHS_RUN: 2}))
    prepare_study(spec, storage)  # the study's attributes, as a session records them
    close_storage(storage)
    return path


def study_id(storage, name: str) -> int:
    return storage.get_study_id_from_name(name)


def test_checking_a_studys_family_reads_no_trial(storage, trial_rows_loaded):
    check_study_matches(load_study("mlp"), storage)
    assert sum(trial_rows_loaded.values()) == 0


def test_resuming_a_study_reads_none_of_its_trials_but_the_failed_ones(storage, trial_rows_loaded):
    prepare_study(load_study("mlp"), storage)
    assert sum(trial_rows_loaded.values()) == 0  # none failed


def test_a_ctrl_c_interrupted_trial_is_still_queued_again_on_resuming(storage):
    study = optuna.load_study(study_name="mlp", storage=storage)
    interrupted = study.ask(dict(study.trials[0].distributions))
    interrupted.set_user_attr(attrs.INTERRUPTED, True)
    study.tell(interrupted, state=TrialState.FAIL)
    prepare_study(load_study("mlp"), storage)
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.user_attrs[attrs.RETRY_OF] == interrupted.number


def test_a_warm_start_reads_only_the_earlier_studys_complete_trials(storage, trial_rows_loaded, tmp_path):
    from pipeline.paths import REPO_ROOT

    warm = tmp_path / "mlp-warm.toml"
    warm.write_text((REPO_ROOT / "studies" / "mlp.toml").read_text() + '\n[warm_start]\nstudy = "mlp"\nbest = 3\n')
    spec = load_study(warm)
    study = prepare_study(spec, storage)
    assert trial_rows_loaded[study_id(storage, "mlp")] == COMPLETE
    assert trial_rows_loaded[study_id(storage, "other")] == 0
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 3 + len(spec.enqueue)
    earlier = optuna.load_study(study_name="mlp", storage=storage)
    best_three = sorted(earlier.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value, reverse=True)[:3]
    assert warm_start_params(spec, storage) == [t.params for t in best_three]  # best first


def test_compare_reads_the_trials_of_the_studies_asked_only(storage, trial_rows_loaded):
    (record,) = compare(storage, ["mlp"])
    assert record.complete == COMPLETE and record.pruned == PRUNED
    assert trial_rows_loaded[study_id(storage, "mlp")] == COMPLETE + PRUNED
    assert trial_rows_loaded[study_id(storage, "other")] == 0


# make compare's busy-time curve: one pass over the spans, not one sort of every span per trial (13 s of a
# study of 10,000 trials).

def reference_busy_seconds(spans, until):
    """The union's length up to ``until``, the plain way (every span sorted again): the oracle."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        end = min(end, until)
        if end > reach and start < until:
            total += end - max(start, reach)
            reach = end
    return total


def test_the_busy_time_at_each_moment_is_the_union_of_the_trials_spans_until_then():
    import random

    from pipeline.search.summary import busy_seconds, busy_seconds_until

    assert busy_seconds([(0, 10), (5, 15), (20, 25)]) == 20  # two workers overlapping, then a gap

    rng = random.Random(0)
    spans = []
    for _ in range(200):  # overlapping workers, touching spans, gaps between sessions
        start = rng.choice([rng.uniform(0, 1000), rng.uniform(5000, 6000)])
        spans.append((start, start + rng.choice([0, 10, rng.uniform(0, 100)])))
    moments = sorted({end for _, end in spans} | {start for start, _ in spans} | {-1, 3000, 10_000})
    assert busy_seconds_until(spans, moments) == pytest.approx([reference_busy_seconds(spans, m) for m in moments])


def test_compare_works_out_the_busy_time_once_not_once_per_trial(monkeypatch):
    from datetime import datetime, timedelta

    import pipeline.reports.compare

    calls = []
    real = pipeline.reports.compare.busy_seconds
    monkeypatch.setattr(pipeline.reports.compare, "busy_seconds", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    study = optuna.create_study(direction="maximize")
    began = datetime(2026, 11, 1)
    for number in range(30):
        trial = optuna.trial.create_trial(
            state=TrialState.COMPLETE, value=0.8 + number / 1000, params={}, distributions={},
            intermediate_values={1: 0.8}, user_attrs={attrs.EPOCHS_RUN: 1})
        trial.datetime_start = began + timedelta(minutes=number)
        trial.datetime_complete = trial.datetime_start + timedelta(seconds=30)
        study.add_trial(trial)
    record = pipeline.reports.compare.describe(study)
    assert [seconds for seconds, _, _ in record.curve] == pytest.approx([30 * (n + 1) for n in range(30)])
    assert len(calls) <= 1  # the study's wall time; the curve comes from one pass
