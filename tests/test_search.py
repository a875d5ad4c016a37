"""Tuning end to end on the synthetic dataset, with the shipped study files shrunk (tests/shrunk.py):
pruning, failures, budgets, storages, resuming after Ctrl-C or a kill, parallel workers."""

import dataclasses
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from pipeline.paths import STUDIES_DIR
from pipeline import attrs
from pipeline.search.objective import Objective
from pipeline.search.session import run_session
from pipeline.search.study import open_study
from pipeline.search.study_file import PRUNERS, SAMPLERS, load_study
from pipeline.search.summary import format_summary
from pipeline.stores import open_storage
from tests.shrunk import DIVERGES, HOPELESS, LEARNS, enqueue, session, storage_in, tune_command

COMPLETE_OR_PRUNED = (TrialState.COMPLETE, TrialState.PRUNED)


def load(folder, study="mlp"):
    return optuna.load_study(study_name=study, storage=storage_in(folder))


@pytest.mark.slow
def test_a_study_prunes_bad_trials_fails_diverging_ones_and_goes_on(tmp_path, synthetic_env):
    # The mlp study prunes at epoch 3 (its first successive-halving rung): two trials that learn come first.
    enqueue(tmp_path, "mlp", LEARNS, {**LEARNS, "lr": 2e-3}, HOPELESS, DIVERGES)
    summary = run_session(session(tmp_path, trials=6, epochs=5))
    trials = load(tmp_path).trials

    good, hopeless, diverged = trials[0], trials[2], trials[3]
    assert good.state == TrialState.COMPLETE and good.value > 0.9
    assert good.user_attrs[attrs.EPOCHS_RUN] == 5 and good.user_attrs[attrs.BEST_EPOCH] >= 1 and good.user_attrs[attrs.SECONDS] > 0
    assert hopeless.state == TrialState.PRUNED and hopeless.user_attrs[attrs.EPOCHS_RUN] < 5
    assert diverged.state == TrialState.FAIL and "lower the learning rate" in diverged.user_attrs[attrs.FAIL_REASON]

    finished = [t for t in trials if t.state in COMPLETE_OR_PRUNED]
    assert len(finished) == 6  # the failure did not stop the study, nor count towards its target
    study = load(tmp_path)  # what optuna-dashboard shows of it: the objective's name, what the study is
    assert study.metric_names == ["val_accuracy"]
    assert study.user_attrs[attrs.STUDY_MODEL_FAMILY] == "mlp" and study.user_attrs[attrs.STUDY_DESCRIPTION].startswith("The notebook")
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert summary["best_trial"]["number"] == best.number and best.number in (0, 1)
    assert summary["epochs_unpruned"] == 6 * 5 and summary["epochs_run"] < summary["epochs_unpruned"]
    assert "pruning saved" in format_summary(summary)
    # Successive halving's one rung in 5 epochs is epoch 3; the summary says how many got there (those
    # pruned there too: every trial here, as none can be pruned before its first rung).
    assert [r["epoch"] for r in summary["pruning"]["rungs"]] == [3]
    assert summary["pruning"]["reached_last_rung"] == sum(t.last_step >= 3 for t in finished) == 6


def test_a_new_study_starts_with_the_study_files_configuration(tmp_path, synthetic_env):
    run_session(session(tmp_path, trials=1, epochs=1))
    first = load(tmp_path).trials[0]
    assert first.params == load_study("mlp").enqueue[0]  # `make train`'s defaults, as mlp.toml promises


def test_running_a_finished_study_again_adds_nothing(tmp_path, synthetic_env):
    run_session(session(tmp_path, trials=2, epochs=1))
    again = run_session(session(tmp_path, trials=2, epochs=1))
    assert again["trials"] == 2
    bigger = run_session(session(tmp_path, trials=3, epochs=1))
    assert bigger["trials"] == 3


def test_pruning_savings_count_each_trial_at_its_own_length(tmp_path, synthetic_env):
    # mlp-unpruned never prunes (mlp-random's first rung, epoch 3, would be past these trials' ends anyway).
    run_session(session(tmp_path, "mlp-unpruned", trials=2, epochs=2))
    summary = run_session(session(tmp_path, "mlp-unpruned", trials=3, epochs=3))  # resumed with longer trials
    assert summary["epochs_unpruned"] == summary["epochs_run"] == 2 + 2 + 3


def test_a_journal_file_holds_a_study_that_resumes(tmp_path, synthetic_env):
    journal = str(tmp_path / "mlp.journal")  # a path, not a URL: Optuna's journal file storage
    first = dataclasses.replace(session(tmp_path, trials=2, epochs=1), storage=journal)
    run_session(first)
    run_session(dataclasses.replace(first, target_trials=3))
    study = optuna.load_study(study_name="mlp", storage=open_storage(journal))
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state in COMPLETE_OR_PRUNED for t in study.trials)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_a_study_file_can_name_runs_trials(tmp_path, synthetic_dataset, sampler):
    spec = dataclasses.replace(load_study("mlp").with_settings({"epochs": 1, "val_size": 200}),
                               sampler={"name": sampler, "seed": 0})
    study = open_study(spec, open_storage(storage_in(tmp_path)))
    study.optimize(Objective(spec, synthetic_dataset, "cpu"), n_trials=2)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert isinstance(study.sampler, SAMPLERS[sampler])  # the one the study file named
    assert study.trials[0].params != study.trials[1].params  # and it sampled


# Each pruner set to act from the first epoch, as a study file can set it.
PRUNER_SETTINGS = {
    "median": {"n_startup_trials": 1, "n_warmup_steps": 0},
    "successive_halving": {"min_resource": 1, "reduction_factor": 2},
    "hyperband": {"min_resource": 1, "max_resource": 1, "reduction_factor": 2},  # one bracket: both trials in it
    "none": {},
}


@pytest.mark.parametrize("pruner", sorted(PRUNERS))
def test_every_pruner_a_study_file_can_name_stops_a_trial_that_falls_behind(tmp_path, synthetic_dataset, pruner):
    spec = dataclasses.replace(load_study("mlp").with_settings({"epochs": 3, "val_size": 200}),
                               pruner={"name": pruner, **PRUNER_SETTINGS[pruner]})
    study = open_study(spec, open_storage(storage_in(tmp_path)))
    enqueue(tmp_path, "mlp", LEARNS, HOPELESS)
    study.optimize(Objective(spec, synthetic_dataset, "cpu"), n_trials=2)
    learns, hopeless = study.trials
    assert learns.state == TrialState.COMPLETE
    assert hopeless.state == (TrialState.COMPLETE if pruner == "none" else TrialState.PRUNED)


def test_parallel_workers_draw_from_different_sampler_seeds(tmp_path, synthetic_dataset):
    spec = load_study("mlp").with_settings({"epochs": 1, "val_size": 200})
    firsts = []
    for worker in (0, 1):
        study = open_study(dataclasses.replace(spec, name=f"worker-{worker}"), open_storage(storage_in(tmp_path)),
                           worker=worker)
        study.optimize(Objective(spec, synthetic_dataset, "cpu"), n_trials=1)
        firsts.append(study.trials[0].params)
    assert firsts[0] != firsts[1]  # the same seed would have made both workers try the same configuration


def sampled_params(folder, study):
    """The parameters of every trial the sampler drew (the study file's queued default left out)."""
    return [t.params for t in load(folder, study).trials if not t.user_attrs.get(attrs.DEFAULT_CONFIGURATION)]


def test_a_resumed_study_samples_configurations_it_has_not_tried(tmp_path, synthetic_env):
    # Random search: with one seed for every session, the second would draw the first's configurations again.
    first = run_session(session(tmp_path, "mlp-random", trials=3, epochs=1))
    run_session(session(tmp_path, "mlp-random", trials=6, epochs=1))
    drawn = sampled_params(tmp_path, "mlp-random")
    assert len(drawn) == 5 and all(drawn.count(params) == 1 for params in drawn)
    # Each trial names the session that drew it, and the seed its sampler had: the replay key.
    trials = load(tmp_path, "mlp-random").trials
    assert {t.user_attrs[attrs.SESSION_SEED] for t in trials[:3]} == {first["session_seed"]}
    assert len({t.user_attrs[attrs.SESSION_SEED] for t in trials}) == 2


def test_a_session_replays_from_its_recorded_seed(tmp_path, synthetic_env):
    original, replay = tmp_path / "original", tmp_path / "replay"
    for folder in (original, replay):
        folder.mkdir()
    run_session(session(original, "mlp-random", trials=3, epochs=1))
    recorded = load(original, "mlp-random").trials[-1].user_attrs[attrs.SESSION_SEED]
    run_session(session(replay, "mlp-random", trials=3, epochs=1, session_seed=recorded))
    assert sampled_params(replay, "mlp-random") == sampled_params(original, "mlp-random")


@pytest.mark.slow
def test_two_sessions_at_once_on_one_study_sample_different_configurations(tmp_path, synthetic_env):
    """Two `make tune` on one storage at the same moment (two machines on one PostgreSQL, in miniature)."""
    command = tune_command(tmp_path, "mlp-random", "--trials", "8", "--no-tracking", epochs=1)
    sessions = [subprocess.Popen(command, env=synthetic_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                for _ in range(2)]
    outputs = [s.communicate(timeout=300)[0] for s in sessions]
    assert [s.returncode for s in sessions] == [0, 0], outputs
    trials = load(tmp_path, "mlp-random").trials
    assert len({t.user_attrs[attrs.SESSION_SEED] for t in trials if attrs.SESSION_SEED in t.user_attrs}) == 2, outputs
    drawn = sampled_params(tmp_path, "mlp-random")
    assert len(drawn) >= 7 and all(drawn.count(params) == 1 for params in drawn), drawn


def test_a_session_that_loses_the_race_to_create_a_new_storages_tables_opens_it(tmp_path):
    """Two sessions start on a new SQLite file at the same moment: both look for Optuna's tables, the
    other one creates one first, and this one's CREATE TABLE fails ("table studies already exists",
    seen in CI). The loser must wait for the winner and open the storage, not stop."""
    import sqlalchemy

    url = f"sqlite:///{tmp_path}/new.db"
    other_session, raced = sqlalchemy.create_engine(url), []

    def other_session_first(table, connection, **_):
        if not raced:  # between this session's look and its CREATE, the other session's CREATE
            raced.append(table.name)
            table.create(other_session)

    sqlalchemy.event.listen(sqlalchemy.Table, "before_create", other_session_first)
    try:
        storage = open_storage(url)
    finally:
        sqlalchemy.event.remove(sqlalchemy.Table, "before_create", other_session_first)
        other_session.dispose()
    optuna.create_study(study_name="opened", storage=storage)
    assert raced and optuna.get_all_study_names(url) == ["opened"]


def open_files_under(folder) -> list[str]:
    """The files under ``folder`` this process holds open (its database connections, on SQLite)."""
    import os

    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return sorted(path for path in held if path.startswith(str(folder)))


def test_a_session_gives_back_its_storage_connections(tmp_path, synthetic_env):
    # A process that runs sessions one after another (a notebook, a scheduler) must not pile up
    # connections: file handles here, a PostgreSQL server's connection slots in the shared setup.
    for trials in (1, 2, 3):
        run_session(session(tmp_path, trials=trials, epochs=1))
        assert open_files_under(tmp_path) == []


def test_a_garbage_test_split_does_not_change_a_study(tmp_path, synthetic_dir, monkeypatch):
    """Two stores, two datasets that differ only in their test files (the second's are noise): the same
    seeded study must come out the same, trial for trial."""
    import shutil

    from pipeline.data.dataset import CUSTOM_ENV_VAR
    from tests.conftest import idx_bytes

    garbage = tmp_path / "garbage-test-split"
    shutil.copytree(synthetic_dir, garbage)
    noise = __import__("numpy").random.default_rng(1)
    import gzip

    (garbage / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(noise.integers(0, 256, (200, 28, 28)))))
    (garbage / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(noise.integers(0, 10, 200))))

    outcomes = []
    for name, folder in (("clean", synthetic_dir), ("garbage", garbage)):
        monkeypatch.setenv(CUSTOM_ENV_VAR, str(folder))
        store = tmp_path / name
        store.mkdir()
        run_session(session(store, trials=3, epochs=2, session_seed=7))  # one session, replayed
        outcomes.append([(t.params, t.value, t.intermediate_values) for t in load(store).trials])
    assert outcomes[0] == outcomes[1]


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def trials_now(folder, states=None):
    try:
        return load(folder).get_trials(states=states)
    except KeyError:  # not created yet
        return []


def training_mid_epoch(folder):
    """A trial that has reported an epoch and has more to go: all its parameters are sampled."""
    return [t for t in trials_now(folder, (TrialState.RUNNING,)) if 0 < len(t.intermediate_values) < 100]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_ends_the_running_trials_and_the_next_run_resumes(tmp_path, synthetic_env, workers):
    # 150-epoch trials (a few seconds each), so that the interrupt lands in the middle of one.
    command = tune_command(tmp_path, "mlp", "--workers", str(workers), "--trials", "8", epochs=150)
    process = subprocess.Popen(command, env=synthetic_env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert wait_for(lambda: len(trials_now(tmp_path, COMPLETE_OR_PRUNED)) >= 1 and training_mid_epoch(tmp_path)), \
        process.communicate()
    process.send_signal(signal.SIGINT)  # to the parent only, as `kill -INT` does; it passes it on to its workers
    stdout, stderr = process.communicate(timeout=90)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "run the same command again" in stderr

    trials = trials_now(tmp_path)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.user_attrs.get(attrs.INTERRUPTED)]
    assert interrupted and all(t.state == TrialState.FAIL for t in interrupted)
    assert 1 <= len(trials_now(tmp_path, COMPLETE_OR_PRUNED)) < 8

    done = subprocess.run(command, env=synthetic_env, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = trials_now(tmp_path)
    assert [t.number for t in trials] == list(range(len(trials)))  # no duplicated or skipped trial numbers
    assert len(trials_now(tmp_path, COMPLETE_OR_PRUNED)) >= 8, done.stdout + done.stderr
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for trial in interrupted:  # the interrupted parameters ran again
        retries = [t for t in trials if t.user_attrs.get(attrs.RETRY_OF) == trial.number]
        assert retries and retries[0].params == trial.params


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study_without_storage_errors(tmp_path, synthetic_env):
    done = subprocess.run(tune_command(tmp_path, "mlp", "--workers", "2", "--trials", "8"), env=synthetic_env,
                          text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "locked" not in done.stderr and "Traceback" not in done.stderr
    trials = trials_now(tmp_path)
    finished = [t for t in trials if t.state in COMPLETE_OR_PRUNED]
    assert 8 <= len(finished) <= 9  # two workers may each start one last trial at the same moment
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert len({t.number for t in trials}) == len(trials)
    sampled = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(sampled)) == len(sampled)  # each worker its own seed: no configuration tried twice


@pytest.mark.slow
def test_the_timeout_ends_the_session_and_keeps_what_finished(tmp_path, synthetic_env):
    done = subprocess.run(tune_command(tmp_path, "mlp", "--trials", "200", "--timeout", "10", "--json", epochs=60),
                          env=synthetic_env, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    finished = trials_now(tmp_path, COMPLETE_OR_PRUNED)
    assert 1 <= len(finished) < 200
    assert not trials_now(tmp_path, (TrialState.RUNNING,))  # the trial under way at the deadline finished
    assert "Study mlp:" in done.stdout


@pytest.mark.slow
def test_a_study_whose_every_trial_fails_stops_with_a_message(tmp_path, synthetic_env):
    enqueue(tmp_path, "mlp", DIVERGES, DIVERGES, DIVERGES)
    done = subprocess.run(tune_command(tmp_path, "mlp", "--trials", "3", "--no-tracking"), env=synthetic_env,
                          text=True, capture_output=True, timeout=120)  # without the stop, it would go round forever
    assert done.returncode == 0, done.stderr
    assert "3 trials in a row failed; stopping" in done.stdout
    assert [t.state for t in trials_now(tmp_path)] == [TrialState.FAIL] * 3


@pytest.mark.slow
def test_a_trial_left_running_by_a_killed_worker_is_failed_and_retried(tmp_path, synthetic_env, monkeypatch):
    process = subprocess.Popen(tune_command(tmp_path, "mlp", "--trials", "3", epochs=150), env=synthetic_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Kill it mid-training: a trial that has reported an epoch has all its parameters sampled (killed any earlier,
    # the orphan has none and its retry rightly samples fresh ones). The first trial is never pruned.
    assert wait_for(lambda: [t for t in training_mid_epoch(tmp_path) if t.number == 0])
    process.kill()  # SIGKILL: no chance to clean up, the trial stays RUNNING
    process.wait()
    (orphan,) = trials_now(tmp_path, (TrialState.RUNNING,))

    monkeypatch.setenv("OPTUNA_HEARTBEAT_SECONDS", "1")  # stale after 3 s, instead of the real 30
    time.sleep(4)
    run_session(session(tmp_path, trials=1, epochs=150))  # the retry is queued first: it is the one

    trials = trials_now(tmp_path)
    assert trials[orphan.number].state == TrialState.FAIL
    retried = [t for t in trials
               if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == orphan.number]
    assert retried and retried[0].params == orphan.params and retried[0].state in COMPLETE_OR_PRUNED
    assert retried[0].user_attrs[attrs.RESUMED_FROM].startswith(f"trial-{orphan.number}, epoch ")  # not from epoch 1


# --- Final phase, warm starts, where the epochs went -----------------------------------------------

def study_file_with(tmp_path, name: str, extra: str, base: str = "mlp") -> str:
    """A copy of a shipped study file under another name, with its [final] replaced by ``extra``."""
    text = (STUDIES_DIR / f"{base}.toml").read_text()
    start = text.index("[final]")
    end = text.index("\n\n", start)
    path = tmp_path / f"{name}.toml"
    path.write_text(text[:start] + extra.strip() + text[end:])
    return str(path)


def test_the_final_phase_retrains_the_best_trial_longer_once(tmp_path, synthetic_env):
    spec_file = study_file_with(tmp_path, "mlp", "[final]\nseconds = 100\nmax_epochs = 5")
    enqueue(tmp_path, "mlp", LEARNS, HOPELESS)
    first = session(tmp_path, spec_file, trials=2, epochs=2, final_phase=True)
    summary = run_session(first)
    trials = load(tmp_path).trials
    assert len(trials) == 3
    searched_best = max(trials[:2], key=lambda t: t.value if t.value is not None else -1)
    final = trials[2]
    assert final.params == searched_best.params and final.user_attrs[attrs.FINAL_OF] == searched_best.number
    assert final.state == TrialState.COMPLETE and final.user_attrs[attrs.EPOCHS_RUN] == 5  # never pruned, 5 epochs
    assert summary["final"]["number"] == 2 and summary["final"]["of"] == searched_best.number
    assert "Final phase: trial 2 retrained trial" in format_summary(summary)
    # The study's best is whichever validates better: the candidate for promotion.
    assert summary["best_trial"]["number"] == (2 if final.value > searched_best.value else searched_best.number)
    again = run_session(first)  # the same best trial is not retrained a second time
    assert again["trials"] == 3


@pytest.mark.slow
def test_the_final_phase_fits_in_the_session_timeout(tmp_path, synthetic_env):
    # At most half the timeout goes to the final phase: the epochs that fit the time left at the best
    # trial's pace, not the study file's 1000.
    spec_file = study_file_with(tmp_path, "mlp", "[final]\nseconds = 1000\nmax_epochs = 1000")
    enqueue(tmp_path, "mlp", LEARNS)
    summary = run_session(session(tmp_path, spec_file, trials=1, epochs=2, final_phase=True, timeout=20))
    searched = load(tmp_path).trials[0]
    assert 2 < summary["final"]["epochs"] <= 20 / searched.user_attrs[attrs.EPOCH_SECONDS]


def test_a_warm_start_queues_the_best_configurations_of_an_earlier_study(tmp_path, synthetic_env):
    enqueue(tmp_path, "mlp", LEARNS, {**LEARNS, "lr": 2e-3}, {**LEARNS, "lr": 4e-3}, HOPELESS)
    run_session(session(tmp_path, trials=4, epochs=2))
    earlier = sorted((t for t in load(tmp_path).trials if t.state == TrialState.COMPLETE),
                     key=lambda t: t.value, reverse=True)
    # The new study searches lr from 2.5e-3 only: the earlier trial at 2e-3 is not queued, whatever its rank.
    spec_file = Path(study_file_with(tmp_path, "mlp-again", '[warm_start]\nstudy = "mlp"\nbest = 2'))
    narrower = spec_file.read_text().replace("low = 5e-4, high = 1e-2", "low = 2.5e-3, high = 1e-2")
    spec_file.write_text(narrower.replace("lr = 0.002\n", "lr = 0.003\n"))  # its own [[enqueue]] too
    run_session(session(tmp_path, str(spec_file), trials=2, epochs=2))
    queued = [t.params for t in load(tmp_path, "mlp-again").trials[:2]]
    assert queued == [t.params for t in earlier if t.params["lr"] >= 2.5e-3][:2]  # best first
    assert all(params["lr"] != 2e-3 for params in queued)


def test_a_warm_start_from_a_study_not_there_yet_starts_from_the_study_file(tmp_path, synthetic_env, capsys):
    spec_file = study_file_with(tmp_path, "mlp-again", '[warm_start]\nstudy = "nowhere"')
    run_session(session(tmp_path, spec_file, trials=1, epochs=1))
    assert "no study 'nowhere'" in capsys.readouterr().out
    assert load(tmp_path, "mlp-again").trials[0].params == load_study("mlp").enqueue[0]


def test_the_summary_counts_the_epochs_spent_on_trials_that_ended_below_the_median():
    from optuna.distributions import FloatDistribution

    from pipeline.search.summary import epochs_below_median

    def trial(state, values, value=None):
        return optuna.trial.create_trial(
            state=state, value=value, params={"x": 0.5}, distributions={"x": FloatDistribution(0, 1)},
            intermediate_values=dict(enumerate(values, 1)), user_attrs={attrs.EPOCHS_RUN: len(values)})

    trials = [trial(TrialState.COMPLETE, [0.5, 0.8, 0.9], value=0.9),  # above the median 0.7
              trial(TrialState.COMPLETE, [0.5, 0.6, 0.7], value=0.7),  # the median: not below it
              trial(TrialState.PRUNED, [0.4, 0.45]),  # ended at 0.45: below
              trial(TrialState.FAIL, [0.1])]  # not finished: not counted
    assert epochs_below_median(trials) == (2, 8)


def test_the_gpu_study_runs_a_trial_on_the_cpu_when_shrunk(tmp_path, synthetic_env, capsys):
    summary = run_session(session(tmp_path, "cnn-gpu", trials=1, epochs=1))
    trial = load(tmp_path, "cnn-gpu").trials[0]
    assert trial.state == TrialState.COMPLETE and trial.params == load_study("cnn-gpu").enqueue[0]
    assert summary["best_trial"]["number"] == 0
    assert "no study 'cnn'" in capsys.readouterr().out  # its warm start had nothing to start from


def test_a_final_phase_run_a_killed_session_left_queued_is_planned_again_not_run_at_its_length(
        tmp_path, synthetic_env):
    # A session killed between queuing its final-phase run and starting it leaves the run WAITING, with the
    # epochs that session's time allowed (here 500): the next session fails it and plans its own final phase.
    spec_file = study_file_with(tmp_path, "mlp", "[final]\nseconds = 100\nmax_epochs = 4")
    enqueue(tmp_path, "mlp", LEARNS)
    first = session(tmp_path, spec_file, trials=1, epochs=2)
    run_session(first)
    study = load(tmp_path)
    study.enqueue_trial(study.trials[0].params, user_attrs={attrs.FINAL_OF: 0, attrs.FINAL_EPOCHS: 500,
                                                            attrs.QUEUED_AT: time.time() - 3600})
    summary = run_session(dataclasses.replace(first, final_phase=True))
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "never started" in trials[1].user_attrs[attrs.FAIL_REASON]
    assert trials[2].user_attrs[attrs.FINAL_EPOCHS] == 4 and summary["final"]["number"] == 2


def test_a_final_phase_run_killed_while_training_is_planned_again_not_retried_at_its_length(
        tmp_path, synthetic_env, monkeypatch):
    # Killed mid-training, a trial is failed as stale when the next worker asks for a trial, and Optuna
    # queues a copy with its user attributes: for a final-phase run, the killed session's 500 epochs.
    monkeypatch.setenv("OPTUNA_HEARTBEAT_SECONDS", "1")  # stale after 3 s
    spec_file = study_file_with(tmp_path, "mlp", "[final]\nseconds = 100\nmax_epochs = 4")
    enqueue(tmp_path, "mlp", LEARNS)
    first = session(tmp_path, spec_file, trials=1, epochs=2)
    run_session(first)
    storage = open_storage(storage_in(tmp_path))
    study = optuna.load_study(study_name="mlp", storage=storage)
    killed = study.ask(fixed_distributions=study.trials[0].distributions)  # as the final phase started it
    for key, value in {attrs.FINAL_OF: 0, attrs.FINAL_EPOCHS: 500, attrs.QUEUED_AT: time.time()}.items():
        killed.set_user_attr(key, value)
    storage.record_heartbeat(killed._trial_id)  # then its worker died
    time.sleep(4)
    # The next session searches one more trial (its worker finds the killed run stale), then its final phase.
    summary = run_session(dataclasses.replace(first, target_trials=2, final_phase=True))
    trials = load(tmp_path).trials
    assert trials[1].state == TrialState.FAIL
    assert [t.user_attrs.get(attrs.FINAL_EPOCHS) for t in trials[2:]] == [None, 4]  # a searched trial, then 4 epochs
    assert summary["final"]["number"] == 3


def test_a_resumed_trial_is_judged_at_the_epoch_it_resumes_from(tmp_path, synthetic_dataset, monkeypatch):
    """Killed after its checkpoint's save and before the pruner's check: the retry is pruned at that
    epoch, not after training one more."""
    from pipeline.training.checkpoints import TrialCheckpoint
    from pipeline.search.study import requeue_interrupted

    spec = load_study("mlp").with_settings({"epochs": 3, "val_size": 200})
    storage = open_storage(storage_in(tmp_path))
    # A pruner that stops every trial at its first report, standing in for a rung the trial fell behind at.
    study = optuna.create_study(study_name="mlp", storage=storage, direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    real_save = TrialCheckpoint.save

    def save_then_die(self, state):
        real_save(self, state)
        raise KeyboardInterrupt  # the kill lands between the save and the check

    objective = Objective(spec, synthetic_dataset, torch.device("cpu"), checkpoints=True)
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(TrialCheckpoint, "save", save_then_die)
        study.optimize(objective, n_trials=1)
    requeue_interrupted(study)
    study.optimize(objective, n_trials=1)
    retry = study.trials[1]
    assert retry.user_attrs[attrs.RESUMED_FROM] == "trial-0, epoch 1"
    assert retry.state == TrialState.PRUNED and retry.last_step == 1 and retry.user_attrs[attrs.EPOCHS_RUN] == 1


def test_namesake_studies_in_two_storages_keep_their_checkpoints_apart(tmp_path, synthetic_env, monkeypatch):
    from pipeline.training.checkpoints import TrialCheckpoint, checkpoint_dir

    folders = []
    monkeypatch.setattr(TrialCheckpoint, "remove", lambda self: None)  # keep each trial's file to look at
    for name in ("one", "two"):
        store = tmp_path / name
        store.mkdir()
        run_session(session(store, trials=1, epochs=1))
        folders.append({p.parent.name for p in checkpoint_dir().glob("*/trial-0.pt")})
    assert len(folders[0]) == 1 and len(folders[1]) == 2  # trial 0 of each study "mlp", in a folder of its own
    assert all(name.startswith("mlp-") for name in folders[1])


def test_an_interrupted_final_phase_is_run_again_at_the_end_not_queued_with_its_old_length(tmp_path, synthetic_env):
    # Ctrl-C during a final-phase trial: the next session re-queues ordinary interrupted trials first
    # thing, but a final one waits for that session's own final phase, fitted to its time.
    spec_file = study_file_with(tmp_path, "mlp", "[final]\nseconds = 100\nmax_epochs = 4")
    enqueue(tmp_path, "mlp", LEARNS)
    first = session(tmp_path, spec_file, trials=1, epochs=2)
    run_session(first)  # one searched trial, no final phase yet
    study = load(tmp_path)
    best = study.trials[0]
    interrupted = study.ask()  # as the final phase would have started it, then Ctrl-C
    for key, value in {attrs.FINAL_OF: best.number, attrs.FINAL_EPOCHS: 4, attrs.INTERRUPTED: True}.items():
        interrupted.set_user_attr(key, value)
    study.tell(interrupted, state=TrialState.FAIL)
    summary = run_session(dataclasses.replace(first, final_phase=True))
    trials = load(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert attrs.RETRY_OF not in trials[2].user_attrs and trials[2].user_attrs[attrs.FINAL_OF] == best.number
    assert summary["final"]["number"] == 2
