"""A whole `make tune` killed outright (SIGKILL of the session's process, not of one worker): its
workers die with it, and the next session on the study ends the runs it left RUNNING, as KILLED
with the reason (the trials' runs FAILED), while Optuna fails its trials as stale and retries them. Here on the embedded
SQLite stores; test_services runs the same scenario on PostgreSQL and a tracking server. Also: two
sessions starting at the same moment on a fresh MLflow store both start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from pipeline.data.dataset import CUSTOM_ENV_VAR
from pipeline import attrs
from pipeline.tracking.session_runs import ENDED_BECAUSE, PID, SESSION_KIND
from pipeline.stores import open_storage
from tests.shrunk import LEARNS, tune_command

EPOCHS = 8


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")  # a zombie is dead


def kill_a_session_then_run_the_next(command: list[str], env: dict, storage: str, workers: int) -> None:
    """Start a session of ``workers`` workers, SIGKILL it while each worker trains a trial, run the
    same command again, and check that nothing is left RUNNING and the killed trials were retried."""
    study = optuna.create_study(study_name="mlp", storage=open_storage(storage), direction="maximize")
    for _ in range(4):
        study.enqueue_trial(LEARNS)  # trials that learn: the pruner has no reason to stop them early
    victim = subprocess.Popen([*command, "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    deadline, training = time.time() + 180, []
    while len(training) < workers and time.time() < deadline and victim.poll() is None:
        training = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                    if len(t.intermediate_values) >= 2]
        time.sleep(0.1)
    assert len(training) == workers, f"the session never had {workers} trials training: {victim.stderr.read()}"
    worker_pids = {int(t.user_attrs[attrs.WORKER].rsplit(":", 1)[1]) for t in training}
    victim.kill()
    victim.wait()
    give_up = time.time() + 10
    while any(alive(pid) for pid in worker_pids) and time.time() < give_up:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in worker_pids), "a worker outlived its killed session"

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("mlp").experiment_id
    [parent] = client.search_runs([experiment], f"tags.{PID} = '{victim.pid}' and tags.kind = '{SESSION_KIND}'")
    left = [t.user_attrs[attrs.MLFLOW_RUN_ID] for t in training]
    assert parent.info.status == "RUNNING"  # what a killed session leaves, before the next one starts
    assert all(client.get_run(run_id).info.status == "RUNNING" for run_id in left)

    survivor = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert survivor.returncode == 0 and "Traceback" not in survivor.stderr, survivor.stdout + survivor.stderr
    assert survivor.stdout.count("left RUNNING, ended as") == workers + 1  # told which runs it ended, and why

    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "KILLED" and f"process {victim.pid}" in parent.data.tags[ENDED_BECAUSE]
    for run_id in left:  # FAILED, as their trials are (a trial run's KILLED means pruned)
        run = client.get_run(run_id)
        assert run.info.status == "FAILED" and f"process {victim.pid}" in run.data.tags[attrs.FAIL_REASON]
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    for killed in training:
        assert trials[killed.number].state == TrialState.FAIL
        retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
        assert [t.state for t in retries] == [TrialState.COMPLETE]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_session_leaves_nothing_running_once_the_next_one_starts(tmp_path, bigger_synthetic_dir,
                                                                         synthetic_env, workers):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**synthetic_env, CUSTOM_ENV_VAR: str(bigger_synthetic_dir), "OPTUNA_HEARTBEAT_SECONDS": "1"}
    command = tune_command(tmp_path, "mlp", "--trials", "4", epochs=EPOCHS)
    kill_a_session_then_run_the_next(command, env, storage, workers)


@pytest.mark.slow
def test_a_session_beside_a_killed_one_fails_its_trial_as_stale_and_marks_the_run(tmp_path, bigger_synthetic_dir,
                                                                                 synthetic_env):
    """The other way a killed session's trial run ends: a session already running on the study, which
    found it when it started alive, sees the trial stop beating, fails it and marks its run FAILED."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**synthetic_env, CUSTOM_ENV_VAR: str(bigger_synthetic_dir), "OPTUNA_HEARTBEAT_SECONDS": "1"}
    study = optuna.create_study(study_name="mlp", storage=open_storage(storage), direction="maximize")
    for _ in range(8):
        study.enqueue_trial(LEARNS)
    command = tune_command(tmp_path, "mlp", "--trials", "8", epochs=EPOCHS)
    survivor = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, target = time.time() + 180, None
    while target is None and time.time() < deadline and victim.poll() is None:
        target = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                       if t.user_attrs.get(attrs.WORKER, "").endswith(f":{victim.pid}")
                       and len(t.intermediate_values) >= 2), None)
        time.sleep(0.1)
    assert target is not None, "the victim never trained a trial for 2 epochs"
    victim.kill()
    victim.wait()
    out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0 and "Traceback" not in err, out + err

    run = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(target.user_attrs[attrs.MLFLOW_RUN_ID])
    assert run.info.status == "FAILED" and "no heartbeat" in run.data.tags[attrs.FAIL_REASON]
    trials = study.get_trials(deepcopy=False)
    assert trials[target.number].state == TrialState.FAIL
    assert [t.state for t in trials if t.system_attrs.get("failed_trial") == target.number] == [TrialState.COMPLETE]


def test_two_sessions_starting_at_once_on_a_new_mlflow_store_both_start(tmp_path, absent_mlflow_store):
    """MLflow builds a new store's tables on first use, unlocked: two sessions starting together on a
    fresh clone raced to do it, and one died ("table experiments already exists"). Both processes
    here import MLflow, say so, and wait for the word to go, given to both at once (no fixed wait
    that must outlast the slower import); then they open the store as a session does, first thing."""
    script = ("import sys\n"
              "from pipeline.tracking.runs import SessionTracker\n"
              "print('ready', flush=True)\n"
              "sys.stdin.readline()\n"
              "SessionTracker('mlp', {}).finish(None, None)\n")
    sessions = [subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    for session in sessions:
        said = session.stdout.readline()
        assert said == "ready\n", said + session.stdout.read()
    assert not absent_mlflow_store.exists()  # a new store: its tables are theirs to make
    for session in sessions:
        session.stdin.write("go\n")
        session.stdin.flush()
    outputs = [session.communicate(timeout=120)[0] for session in sessions]
    assert [session.returncode for session in sessions] == [0, 0], outputs
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert len(client.search_runs([client.get_experiment_by_name("mlp").experiment_id])) == 2


def test_a_parent_run_is_ended_only_when_its_session_is_gone(tmp_path):
    """On this machine a parent run's process tells, at once, and alone (however late its beats); from
    another machine only its heartbeat can: ended after SESSION_GRACE_BEATS of its own intervals
    without a beat. A trial run goes with its parent."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from pipeline.tracking.session_runs import (
        HEARTBEAT,
        INTERVAL,
        SESSION_GRACE_BEATS,
        end_runs_of_gone_sessions,
        identity_tags,
    )

    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment("mlp")
    interval, now = 10, time.time()
    finished = subprocess.Popen(["sleep", "0"])
    finished.wait()  # its process is gone now
    here, elsewhere = identity_tags(interval), {PID: "1", "session_machine": "another-boot:4026531836"}
    grace = SESSION_GRACE_BEATS * interval
    sessions = {  # name: the parent run's tags
        "here, alive, silent for long": {**here, HEARTBEAT: f"{now - 10 * grace:.0f}"},
        "here, process gone, beating": {**here, PID: str(finished.pid)},
        "elsewhere, beating": {**elsewhere, HEARTBEAT: f"{now - grace + 30:.0f}"},
        "elsewhere, silent": {**elsewhere, HEARTBEAT: f"{now - grace - 30:.0f}"},
        "elsewhere, beating slowly by its own setting": {**elsewhere, INTERVAL: "60",
                                                          HEARTBEAT: f"{now - grace - 30:.0f}"},
        "elsewhere, a tag edited by hand": {**elsewhere, HEARTBEAT: "yesterday"},  # the run's start then
    }
    parents, trials = {}, {}
    for name, tags in sessions.items():
        parents[name] = client.create_run(experiment, run_name=name,
                                          tags={"kind": SESSION_KIND, **tags}).info.run_id
        trials[name] = client.create_run(experiment, run_name=f"trial of {name}", tags={
            "trial": "0", MLFLOW_PARENT_RUN_ID: parents[name]}).info.run_id

    ended = end_runs_of_gone_sessions(client, experiment, interval)

    status = {name: (client.get_run(parents[name]).info.status, client.get_run(trials[name]).info.status)
              for name in sessions}
    assert status == {"here, alive, silent for long": ("RUNNING", "RUNNING"),
                      "here, process gone, beating": ("KILLED", "FAILED"),
                      "elsewhere, beating": ("RUNNING", "RUNNING"),
                      "elsewhere, silent": ("KILLED", "FAILED"),
                      "elsewhere, beating slowly by its own setting": ("RUNNING", "RUNNING"),
                      "elsewhere, a tag edited by hand": ("RUNNING", "RUNNING")}
    assert len(ended) == 4
    assert "stopped beating" in client.get_run(parents["elsewhere, silent"]).data.tags[ENDED_BECAUSE]
    assert "is gone" in client.get_run(parents["here, process gone, beating"]).data.tags[ENDED_BECAUSE]
