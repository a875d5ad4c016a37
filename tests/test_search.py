"""Tuning end to end on the synthetic dataset: pruning, failures, resuming after Ctrl-C, parallel workers."""

import signal
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from pipeline.search import Session, format_summary, run_session
from tests.tiny_study import storage_in, write_study

def test_a_study_prunes_bad_trials_fails_diverging_ones_and_goes_on(tmp_path, synthetic_env):
    study_file = write_study(tmp_path, lr_high=1e7)
    summary = run_session(Session(str(study_file), storage_in(tmp_path), trials=6, timeout=None, device="cpu"))
    study = optuna.load_study(study_name="tiny", storage=storage_in(tmp_path))
    by_number = {t.number: t for t in study.trials}

    good, hopeless, diverged = by_number[0], by_number[1], by_number[2]
    assert good.state == TrialState.COMPLETE and good.value > 0.9
    assert good.user_attrs["epochs_run"] == 4 and good.user_attrs["best_epoch"] >= 1 and good.user_attrs["seconds"] > 0
    assert hopeless.state == TrialState.PRUNED and hopeless.user_attrs["epochs_run"] < 4
    assert diverged.state == TrialState.FAIL and "lower the learning rate" in diverged.user_attrs["fail_reason"]

    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6  # the failure did not stop the study, nor count towards its trials
    assert summary["best_trial"]["number"] == study.best_trial.number
    assert summary["epochs_budget"] == 6 * 4 and summary["epochs_run"] < summary["epochs_budget"]
    assert "pruning saved" in format_summary(summary)


def test_running_a_finished_study_again_adds_nothing(tmp_path, synthetic_env):
    study_file = write_study(tmp_path, trials=2, enqueue="")
    session = Session(str(study_file), storage_in(tmp_path), trials=2, timeout=None, device="cpu")
    run_session(session)
    again = run_session(session)
    assert again["trials"] == 2
    bigger = run_session(Session(**{**session.__dict__, "trials": 3}))
    assert bigger["trials"] == 3


def tune_command(study_file, folder, *extra):
    return [sys.executable, "-m", "pipeline", "tune", "--study", str(study_file), "--storage", storage_in(folder),
            "--device", "cpu", *extra]


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_ctrl_c_ends_the_running_trial_and_the_next_run_resumes(tmp_path, synthetic_env):
    # Trials of about a second, so that the interrupt lands in the middle of one.
    study_file = write_study(tmp_path, trials=8, epochs=30, hidden="[256, 256]", enqueue="")
    process = subprocess.Popen(tune_command(study_file, tmp_path), env=synthetic_env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def finished_trials():
        try:
            study = optuna.load_study(study_name="tiny", storage=storage_in(tmp_path))
        except KeyError:
            return 0
        return len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)))

    assert wait_for(lambda: finished_trials() >= 2), process.communicate()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "run the same command again" in stderr

    study = optuna.load_study(study_name="tiny", storage=storage_in(tmp_path))
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    kept = finished_trials()
    assert 2 <= kept < 8
    interrupted = [t for t in study.trials if t.user_attrs.get("interrupted")]

    done = subprocess.run(tune_command(study_file, tmp_path), env=synthetic_env, text=True, capture_output=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="tiny", storage=storage_in(tmp_path))
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers)))  # no duplicated or skipped trial numbers
    assert finished_trials() == 8
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    for trial in interrupted:  # the interrupted parameters ran again
        retries = [t for t in study.trials if t.user_attrs.get("retry_of") == trial.number]
        assert retries and retries[0].params == trial.params


def test_two_workers_share_one_sqlite_study_without_storage_errors(tmp_path, synthetic_env):
    study_file = write_study(tmp_path, trials=8, enqueue="")
    done = subprocess.run(tune_command(study_file, tmp_path, "--workers", "2"), env=synthetic_env, text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "locked" not in done.stderr and "Traceback" not in done.stderr
    study = optuna.load_study(study_name="tiny", storage=storage_in(tmp_path))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 8 <= len(finished) <= 9  # two workers may each start one last trial at the same moment
    assert not [t for t in study.trials if t.state in (TrialState.RUNNING, TrialState.FAIL)]
    assert len({t.number for t in study.trials}) == len(study.trials)


def test_a_trial_left_running_by_a_killed_worker_is_failed_and_retried(tmp_path, synthetic_env, monkeypatch):
    study_file = write_study(tmp_path, trials=4, epochs=30, hidden="[256, 256]", enqueue="")
    process = subprocess.Popen(tune_command(study_file, tmp_path), env=synthetic_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def running_trials():
        try:
            study = optuna.load_study(study_name="tiny", storage=storage_in(tmp_path))
        except KeyError:
            return []
        return study.get_trials(states=(TrialState.RUNNING,))

    # Kill it mid-training: a trial that has reported an epoch has all its parameters sampled (killed any earlier,
    # the orphan has none and its retry rightly samples fresh ones). The first trial is never pruned, so it is
    # still training when the kill lands.
    assert wait_for(lambda: [t for t in running_trials() if t.number == 0 and 0 < len(t.intermediate_values) < 20])
    process.kill()  # SIGKILL: no chance to clean up, the trial stays RUNNING
    process.wait()
    (orphan,) = running_trials()

    import pipeline.search as search
    monkeypatch.setattr(search, "GRACE_SECONDS", 1)  # instead of waiting out the real grace period
    time.sleep(search.GRACE_SECONDS + 1)
    run_session(Session(str(study_file), storage_in(tmp_path), trials=4, timeout=None, device="cpu"))

    study = optuna.load_study(study_name="tiny", storage=storage_in(tmp_path))
    assert study.trials[orphan.number].state == TrialState.FAIL
    retried = [t for t in study.trials
               if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == orphan.number]
    assert retried and retried[0].params == orphan.params and retried[0].state in (TrialState.COMPLETE,
                                                                                   TrialState.PRUNED)
