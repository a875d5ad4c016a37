"""A worker's trial loop as a session runs it: the lost-connection errors it recovers from and the
ones that end it, and a study file edited while the session runs.

Here the storage never goes away: the trainer raises the error a lost connection raises, on the calls
chosen, so the counting (how many losses, which trials are failed and run again) is exact and takes
seconds. A storage that really goes away and comes back, a PostgreSQL server restarted under two
worker processes, is test_services.py::test_workers_ride_out_a_postgresql_restart."""

from __future__ import annotations

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

import pipeline.search.objective as objective
from pipeline.paths import STUDIES_DIR
from pipeline import attrs
from pipeline.search.session import run_session
from pipeline.search.workers import MAX_LOSSES_WITHOUT_A_FINISHED_TRIAL
from tests.shrunk import LEARNS, enqueue, session, storage_in


def raise_lost_connection_on(monkeypatch, calls_that_fail: set[int]) -> list[int]:
    """The trainer raises the error of a lost database connection (what a PostgreSQL restart raises
    mid-epoch), while the storage itself stays up, on these calls, counted from 1, and trains
    normally on the others; returns the call log."""
    real_train, calls = objective.train, []

    def train(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) in calls_that_fail:
            raise sqlalchemy.exc.OperationalError("UPDATE trials", {}, Exception("server closed the connection"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(objective, "train", train)
    return calls


def test_a_worker_rides_out_storage_losses_that_finished_trials_separate(tmp_path, synthetic_env, monkeypatch,
                                                                        capsys):
    # One more loss than the limit, each after a trial finished: blips hours apart, never a dead storage.
    # Each loss is the lost-connection error alone (the storage stays up): see the module's docstring.
    losses = MAX_LOSSES_WITHOUT_A_FINISHED_TRIAL + 1
    calls = raise_lost_connection_on(monkeypatch, {2 * i for i in range(1, losses + 1)})
    enqueue(tmp_path, "mlp", *[LEARNS] * (losses + 1))
    summary = run_session(session(tmp_path, trials=losses + 1, epochs=1))
    assert summary["states"].get("COMPLETE", 0) + summary["states"].get("PRUNED", 0) == losses + 1
    trials = optuna.load_study(study_name="mlp", storage=storage_in(tmp_path)).trials
    lost = [t for t in trials if t.state == TrialState.FAIL]
    assert len(lost) == losses and len(calls) == 2 * losses + 1
    retried = {t.user_attrs.get(attrs.RETRY_OF) for t in trials}
    assert all(t.number in retried for t in lost)  # each lost trial was run again
    assert capsys.readouterr().out.count("lost the study storage") == losses


def test_a_worker_that_reconnects_draws_new_configurations_not_its_first_ones_again(tmp_path, synthetic_env,
                                                                                   monkeypatch):
    # Reopening the study builds a new sampler; seeded as the first one was, random search would draw
    # the session's first configurations again (each lost trial's retry repeats its own, by design).
    raise_lost_connection_on(monkeypatch, {2, 4})
    run_session(session(tmp_path, "mlp-random", trials=4, epochs=1))
    trials = optuna.load_study(study_name="mlp-random", storage=storage_in(tmp_path)).trials
    drawn = [t.params for t in trials if attrs.RETRY_OF not in t.user_attrs]
    assert len(drawn) >= 4 and all(drawn.count(params) == 1 for params in drawn), drawn
    seeds = {t.user_attrs[attrs.WORKER_SAMPLER_SEED] for t in trials if attrs.RETRY_OF not in t.user_attrs}
    assert len(seeds) == 3  # one stream per opening of the study, each recorded on the trials it drew


def test_a_storage_that_keeps_failing_ends_the_worker_with_its_error(tmp_path, synthetic_env, monkeypatch):
    # Losses with no trial finishing between them: the limit is recovered from, the next one ends it.
    calls = raise_lost_connection_on(monkeypatch, set(range(1, 100)))
    enqueue(tmp_path, "mlp", LEARNS)
    with pytest.raises(sqlalchemy.exc.OperationalError, match="server closed the connection"):
        run_session(session(tmp_path, trials=2, epochs=1))
    assert len(calls) == MAX_LOSSES_WITHOUT_A_FINISHED_TRIAL + 1


def test_a_study_file_edited_during_a_session_changes_nothing_in_it(tmp_path, synthetic_env, monkeypatch):
    # The session runs what was validated when it started; the file is read once, not per worker or phase.
    study_file = tmp_path / "mlp.toml"
    shipped = (STUDIES_DIR / "mlp.toml").read_text()
    study_file.write_text(shipped.replace("max_epochs = 60", "max_epochs = 3"))  # a short final phase
    tuning = session(tmp_path, str(study_file), trials=2, epochs=2, final_phase=True)
    real_train, epochs_trained = objective.train, []

    def train_and_edit(config, *args, **kwargs):
        study_file.write_text("this is not TOML any more [")  # a user saves a half-edited file
        epochs_trained.append(config.epochs)
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(objective, "train", train_and_edit)
    enqueue(tmp_path, "mlp", LEARNS, LEARNS)
    summary = run_session(tuning)
    assert epochs_trained == [2, 2, 3]  # both trials, then the final phase the file asked for at the start
    assert summary["final"]["epochs"] == 3


def test_an_unreadable_checkpoint_is_named_and_not_resumed_from(tmp_path, capsys):
    # Saves are atomic, so a damaged file came from a disk or a hand: say so rather than start silently.
    from pipeline.training.checkpoints import TrialCheckpoint

    earlier = tmp_path / "checkpoints" / "mlp" / "trial-3.pt"  # conftest points CHECKPOINT_DIR at tmp_path
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"not a checkpoint")
    checkpoint = TrialCheckpoint.for_trial("mlp", 7, [3], identity={"params": {}})
    assert checkpoint.load() is None and checkpoint.resumed_from is None
    assert f"note: checkpoint {earlier} cannot be read" in capsys.readouterr().out


@pytest.mark.slow
def test_one_workers_error_stops_the_others_and_the_session(tmp_path, synthetic_env):
    """Worker processes on one study: when one stops on an error, the session stops the others now, not
    at its deadline, and their trials end interrupted (re-queued by the next session), none RUNNING."""
    import subprocess

    from tests.shrunk import tune_command

    # One trial trains for minutes; the other's configuration cannot even be built (batch_size 0), an
    # error no trial is expected to raise: its worker stops on it.
    enqueue(tmp_path, "mlp", LEARNS, {**LEARNS, "batch_size": 0})
    done = subprocess.run(tune_command(tmp_path, "mlp", "--workers", "2", "--trials", "4", "--no-tracking",
                                       epochs=3000),
                          env=synthetic_env, text=True, capture_output=True, timeout=240)
    assert done.returncode != 0 and "stopped on an error" in done.stderr, done.stderr[-2000:]
    trials = optuna.load_study(study_name="mlp", storage=storage_in(tmp_path)).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert all(len(t.intermediate_values) < 3000 for t in trials)  # the long trial was stopped, not run out
    assert [t.user_attrs.get(attrs.INTERRUPTED) for t in trials if t.params.get("batch_size") == 64] == [True], (
        [(t.number, t.state, t.params, t.user_attrs) for t in trials], done.stdout, done.stderr)
