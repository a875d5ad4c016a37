"""The multi-machine path, for real: `make services` (a throwaway PostgreSQL cluster and an MLflow
tracking server with proxied artifacts, on loopback ports), sessions started separately as on
separate machines, and the faults shared infrastructure brings. Each test gets its own PostgreSQL
database; the tracking server is shared, so assertions look at the runs of their own study only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from pipeline.data.dataset import CUSTOM_ENV_VAR
from pipeline.tracking.registry import CHAMPION, REGISTERED_MODEL, val_accuracy_of
from pipeline import attrs
from pipeline.services import Services, postgres_bin_dir
from pipeline.stores import open_storage
from tests.conftest import free_port
from tests.shrunk import LEARNS, tune_command
from tests.test_killed_session import kill_a_session_then_run_the_next

pytestmark = [pytest.mark.services, pytest.mark.slow]
MIRRORED = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
LOGIN = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def services_folder() -> Path:
    if postgres_bin_dir() is None and os.geteuid() != 0:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql) and we cannot install it")
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="pipeline-services-", dir="/tmp"))  # reachable by the postgres user
    root.chmod(0o755)
    return root


SERVICES_COMMAND = [sys.executable, "-m", "pipeline", "services"]


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """`python -m pipeline services start` in a folder of its own, as `make services` runs it; stopped after.
    This process (the tests' own MLflow client) logs in as the printed exports do."""
    root = services_folder()
    env = {**os.environ, "SERVICES_DIR": str(root)}
    started = subprocess.run([*SERVICES_COMMAND, "start", "--pg-port", str(free_port()), "--mlflow-port",
                              str(free_port())], capture_output=True, text=True, env=env, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    running = Services(root)
    with pytest.MonkeyPatch.context() as patch:
        for name in LOGIN:
            patch.setenv(name, running.client_env()[name])
        yield running, started.stdout, env
    subprocess.run([*SERVICES_COMMAND, "stop"], env=env, timeout=120)
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def fresh_database(services: Services, name: str) -> str:
    """A new PostgreSQL database on the cluster, for one test's studies; its URL (with the password)."""
    import psycopg

    with psycopg.connect(services.database_url("postgres"), autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return services.database_url(name)


def user_env(services: Services, storage: str, data_dir: Path, **more) -> dict:
    """The shell of a user who pasted `make services`' exports (and uses the synthetic data)."""
    return {**os.environ, **services.client_env(), "OPTUNA_STORAGE": storage, CUSTOM_ENV_VAR: str(data_dir), **more}


def tune(study="mlp", *extra, epochs=2, **more) -> list[str]:
    """`python -m pipeline tune` on the shrunk study, the storage and server coming from the environment."""
    return tune_command(None, study, *extra, epochs=epochs, **more)


def start(command, env) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout=300) -> tuple[str, str]:
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, out + err
    assert "Traceback" not in err, err
    return out, err


def assert_runs_mirror_trials(study: optuna.Study) -> None:
    """Every finished trial has its own MLflow run whose status mirrors the trial's; none is RUNNING.
    (A trial that failed before it trained, as the storage went while Optuna was starting it, has no run.)"""
    client = mlflow.MlflowClient()
    trials = study.get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    tracked = [t for t in trials if t.state in MIRRORED and not (t.state == TrialState.FAIL and
                                                                 attrs.MLFLOW_RUN_ID not in t.user_attrs)]
    assert all(t.intermediate_values == {} for t in trials if t.state in MIRRORED and t not in tracked)
    run_ids = [t.user_attrs[attrs.MLFLOW_RUN_ID] for t in tracked]
    assert len(set(run_ids)) == len(run_ids)  # one run per trial
    for trial in tracked:
        assert client.get_run(trial.user_attrs[attrs.MLFLOW_RUN_ID]).info.status == MIRRORED[trial.state], trial.number


def test_make_services_prints_exports_that_hide_the_passwords(services):
    running, printed, env = services
    state = running.state()
    assert state["password"] not in printed and state["mlflow_password"] not in printed
    assert f'export OPTUNA_STORAGE="$(cat {running.storage_url_file})"' in printed
    assert f"export MLFLOW_TRACKING_URI={running.tracking_uri()}" in printed
    assert "export MLFLOW_TRACKING_USERNAME=admin" in printed
    assert f'export MLFLOW_TRACKING_PASSWORD="$(cat {running.mlflow_password_file})"' in printed
    assert running.storage_url_file.read_text() == running.database_url("optuna")
    assert running.mlflow_password_file.read_text() == state["mlflow_password"]
    for secret in (running.storage_url_file, running.mlflow_password_file, running.auth_config_file,
                   running.state_file):
        assert oct(secret.stat().st_mode & 0o777) == "0o600", secret
    status = subprocess.run([sys.executable, "-m", "pipeline", "services", "status"], capture_output=True, text=True,
                            env=env, timeout=60).stdout
    assert status.count(": running") == 2, status
    # Both on loopback only.
    from tests.test_cli import listening_addresses

    state = running.state()
    assert listening_addresses(state["pg_port"]) == {"0100007F"}
    assert listening_addresses(state["mlflow_port"]) == {"0100007F"}


def test_two_sessions_share_one_study_and_tracking_server_and_leak_no_password(services, synthetic_dir):
    running, _, _ = services
    storage = fresh_database(running, "two_sessions")
    passwords = running.state()["password"], running.state()["mlflow_password"]
    env = user_env(running, storage, synthetic_dir)
    seen_by_ps = []
    sessions = [start(tune("mlp", "--trials", "8", "--json"), env) for _ in range(2)]
    while any(s.poll() is None for s in sessions):
        seen_by_ps.append(subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout)
        time.sleep(1)
    outputs = [finish(s) for s in sessions]

    mlflow.set_tracking_uri(running.tracking_uri())
    study = optuna.load_study(study_name="mlp", storage=open_storage(storage))
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # every number once
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) >= 8
    assert len({t.user_attrs[attrs.WORKER] for t in trials}) == 2  # both sessions ran trials
    assert_runs_mirror_trials(study)
    client = mlflow.MlflowClient()
    parents = {json.loads(out.strip().splitlines()[-1])["mlflow_parent_run_id"] for out, _ in outputs}
    assert len(parents) == 2 and all(client.get_run(p).info.status == "FINISHED" for p in parents)
    parent_of = {client.get_run(t.user_attrs[attrs.MLFLOW_RUN_ID]).data.tags["mlflow.parentRunId"] for t in trials
                 if attrs.MLFLOW_RUN_ID in t.user_attrs}
    assert parent_of == parents  # each session's trials under its own parent run
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    same_data = [v for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'")
                 if v.tags.get("dataset_checksum") == champion.tags.get("dataset_checksum")]
    assert val_accuracy_of(champion) == max(val_accuracy_of(v) for v in same_data)

    # An outside client scores the champion through the server's proxied artifacts.
    evaluated = subprocess.run([sys.executable, "-m", "pipeline", "evaluate-best", "--json", "--reports-dir",
                                str(running.root / "reports")], capture_output=True, text=True, env=env, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["version"] == int(champion.version)
    assert result["test_accuracy"] == pytest.approx(champion_test_accuracy(synthetic_dir))  # as a plain client scores it
    assert result["test_accuracy"] >= 0.9  # the best of the trials has learnt the synthetic bars
    # The other clients log in too: compare logs its run, serve fetches the champion and classifies.
    compared = subprocess.run([sys.executable, "-m", "pipeline", "compare", "mlp", "--reports-dir",
                               str(running.root / "reports")], capture_output=True, text=True, env=env, timeout=300)
    assert compared.returncode == 0 and "MLflow run: " in compared.stdout, compared.stderr
    served = serve_one_image(env)

    # The password is nowhere: terminal output, ps, the summaries, Optuna's attributes, MLflow's
    # parameters and tags, the services' logs.
    places = {"terminal": "".join(out + err for out, err in outputs) + evaluated.stdout + evaluated.stderr
              + compared.stdout + compared.stderr + served,
              "ps": "".join(seen_by_ps),
              "optuna": repr([(study.user_attrs, study_system_attrs(storage, "mlp"))] +
                             [(t.user_attrs, t.system_attrs, t.params) for t in trials])}
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            places[f"run {run.info.run_id}"] = repr((run.data.params, run.data.tags))
    places["registry"] = repr([v.tags for v in client.search_model_versions(f"name='{REGISTERED_MODEL}'")])
    for log in ("mlflow.log", "postgres.log"):
        places[log] = (running.root / log).read_text(errors="replace")
    assert "optuna_storage" in repr(places) and ":***@" in repr(places)  # the storage is named, masked
    assert [where for where, text in places.items() for password in passwords if password in text] == []


def champion_test_accuracy(data_dir: Path) -> float:
    """The champion as a plain MLflow client scores it: loaded by its alias, fed the raw test images."""
    import numpy as np

    from pipeline.data.dataset import load_fashion_mnist

    data = load_fashion_mnist(data_dir, custom=True)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{CHAMPION}")
    predicted = np.asarray(model.predict(data.test_images.numpy().astype(np.float32))).argmax(axis=1)
    return float((predicted == data.test_labels.numpy()).mean())


def serve_one_image(env: dict) -> str:
    """`python -m pipeline serve` on the champion, one blank image posted to it; its output."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # its group: the scoring server's workers end with it
    body = json.dumps({"inputs": [[[0.0] * 28] * 28]}).encode()
    try:
        deadline, answer = time.time() + 120, None
        while answer is None and time.time() < deadline and process.poll() is None:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                answer = json.loads(urllib.request.urlopen(request, timeout=10).read())
            except OSError:
                time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        out = process.communicate(timeout=60)[0]
    assert answer is not None and len(answer["predictions"][0]) == 10, out
    return out


def test_the_tracking_server_refuses_a_request_without_its_login(services):
    """MLflow's basic-auth app: reading, writing, registering and moving an alias all need the login;
    /health stays open (the pipeline's probe). The other tests here show the pipeline's clients logging in."""
    import base64
    import urllib.error

    running, _, _ = services
    base = running.tracking_uri()
    calls = [("GET", "/api/2.0/mlflow/experiments/search?max_results=1", None),
             ("POST", "/api/2.0/mlflow/experiments/create", {"name": "intruder"}),
             ("POST", "/api/2.0/mlflow/registered-models/create", {"name": "intruder"}),
             ("POST", "/api/2.0/mlflow/registered-models/alias", {"name": REGISTERED_MODEL, "alias": CHAMPION,
                                                                   "version": "1"})]

    def status(method, path, body, login=None):
        request = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body else None,
                                         headers={"Content-Type": "application/json"})
        if login:
            request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            return error.code

    assert [status(*call) for call in calls] == [401] * len(calls)
    assert [status(*call, login="admin:not-the-password") for call in calls] == [401] * len(calls)
    assert status("GET", "/health", None) == 200
    assert status(*calls[0], login=f"admin:{running.state()['mlflow_password']}") == 200
    assert mlflow.MlflowClient(base).get_experiment_by_name("intruder") is None  # nothing was created


def study_system_attrs(storage: str, name: str) -> dict:
    backend = optuna.storages.RDBStorage(storage)
    return backend.get_study_system_attrs(backend.get_study_id_from_name(name))


def running_trial_of(study: optuna.Study, pid: int, min_epochs: int):
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(attrs.WORKER, "").endswith(f":{pid}") and len(trial.intermediate_values) >= min_epochs:
            return trial
    return None


def test_a_worker_killed_mid_trial_leaves_nothing_running_and_its_trial_resumes_elsewhere(
        services, bigger_synthetic_dir):
    running, _, _ = services
    storage = fresh_database(running, "killed_worker")
    # Heartbeats every second (stale after 3 s), so the test need not wait 30 s.
    env = user_env(running, storage, bigger_synthetic_dir, OPTUNA_HEARTBEAT_SECONDS="1")
    study = optuna.create_study(study_name="mlp", storage=open_storage(storage), direction="maximize")
    for _ in range(3):
        study.enqueue_trial(LEARNS)  # good trials: the pruner has no reason to stop them
    victim = start(tune("mlp", "--trials", "4", epochs=10), env)
    deadline, target = time.time() + 120, None
    while target is None and time.time() < deadline and victim.poll() is None:
        target = running_trial_of(study, victim.pid, min_epochs=3)
        time.sleep(0.1)
    assert target is not None, "the victim never ran a trial for 3 epochs"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivor = start(tune("mlp", "--trials", "4", epochs=10), env)
    finish(survivor)

    mlflow.set_tracking_uri(running.tracking_uri())
    killed = study.get_trials(deepcopy=False)[target.number]
    assert killed.state == TrialState.FAIL
    killed_run = mlflow.MlflowClient().get_run(killed.user_attrs[attrs.MLFLOW_RUN_ID])
    # The victim was the whole session: the survivor ended its run when it started, before Optuna found
    # the trial stale (a worker killed in a session that lives on gets "no heartbeat" instead).
    assert killed_run.info.status == "FAILED" and f"process {victim.pid}" in killed_run.data.tags["fail_reason"]
    retries = [t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") == target.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    resumed_epoch = int(retries[0].user_attrs[attrs.RESUMED_FROM].rsplit(" ", 1)[1])
    assert resumed_epoch >= 3  # from its checkpoint, not epoch 1
    assert retries[0].user_attrs[attrs.RESUMED_FROM].startswith(f"trial-{target.number},")
    assert len(retries[0].intermediate_values) == 10  # the earlier epochs reported again, then the rest
    assert_runs_mirror_trials(study)


def test_a_killed_session_on_the_services_leaves_nothing_running(services, bigger_synthetic_dir):
    """The whole session (two workers) SIGKILLed, then the next one: test_killed_session's scenario,
    on PostgreSQL and the tracking server."""
    running, _, _ = services
    storage = fresh_database(running, "killed_session")
    env = user_env(running, storage, bigger_synthetic_dir, OPTUNA_HEARTBEAT_SECONDS="1")
    kill_a_session_then_run_the_next(tune("mlp", "--trials", "4", epochs=8), env, storage, workers=2)


def test_workers_ride_out_a_postgresql_restart(services, bigger_synthetic_dir):
    running, _, _ = services
    storage = fresh_database(running, "restart")
    env = user_env(running, storage, bigger_synthetic_dir)
    study = optuna.create_study(study_name="mlp", storage=open_storage(storage), direction="maximize")
    for _ in range(4):
        study.enqueue_trial(LEARNS)
    session = start(tune("mlp", "--trials", "4", "--workers", "2", epochs=6), env)
    deadline = time.time() + 120
    while time.time() < deadline:  # both workers mid-trial, each with an epoch checkpointed to resume from
        training = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if len(training) == 2 and all(t.intermediate_values for t in training):
            break
        time.sleep(0.2)
    running.postgres.restart(pause=5)  # down long enough for both workers to need it (each epoch reports)
    out, err = finish(session)

    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(finished) >= 4
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    assert 1 <= len(failed) <= 2  # the trials being recorded at that moment, one per worker at most
    retries = {t.user_attrs.get(attrs.RETRY_OF): t for t in study.get_trials(deepcopy=False)}
    assert all(t.number in retries for t in failed)  # each one run again, ...
    trained = [t for t in failed if t.intermediate_values]
    assert trained and any(attrs.RESUMED_FROM in retries[t.number].user_attrs for t in trained)  # ... from its checkpoint
    lost = (out + err).count("lost the study storage")
    assert 1 <= lost <= 2 and "Traceback" not in out + err  # one line per worker at most, no storm
    mlflow.set_tracking_uri(running.tracking_uri())
    assert_runs_mirror_trials(study)


def test_a_study_outlives_a_tracking_server_that_stops_for_30_seconds(services, bigger_synthetic_dir):
    running, _, _ = services
    storage = fresh_database(running, "server_down")
    # MLflow's client retries with backoff; factor 1 (sleeps of 1, 2, 4 ... 64 s) still spans the 30 s.
    env = user_env(running, storage, bigger_synthetic_dir, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    study = optuna.create_study(study_name="mlp", storage=open_storage(storage), direction="maximize")
    for _ in range(2):
        study.enqueue_trial(LEARNS)
    session = start(tune("mlp", "--trials", "2", epochs=30), env)
    deadline = time.time() + 120

    def epochs_reported():
        return sum(len(t.intermediate_values) for t in study.get_trials(deepcopy=False))

    while epochs_reported() < 1 and time.time() < deadline:
        time.sleep(0.2)
    running.server.stop()
    before = epochs_reported()
    time.sleep(30)
    during = epochs_reported() - before
    running.server.start(running.state(), "127.0.0.1")
    finish(session, timeout=600)

    assert during >= 5  # training went on while the server was away
    assert len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))) >= 2
    mlflow.set_tracking_uri(running.tracking_uri())
    assert_runs_mirror_trials(study)  # the records were written when the server came back
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        history = mlflow.MlflowClient().get_metric_history(trial.user_attrs[attrs.MLFLOW_RUN_ID], "val_accuracy")
        assert len(history) == len(trial.intermediate_values)  # no epoch's metrics lost


def test_a_wrong_password_or_a_stopped_server_is_one_line_within_seconds(services, synthetic_dir):
    running, _, _ = services
    storage = fresh_database(running, "refused")
    wrong = storage.replace(running.state()["password"], "not-the-password")
    cases = [
        ({"OPTUNA_STORAGE": wrong}, "password authentication failed"),
        ({"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}, "cannot reach the MLflow tracking server"),
        ({"MLFLOW_TRACKING_PASSWORD": "not-the-password"}, "asks for a login, and refused the one in"),
        ({name: None for name in LOGIN}, "asks for a login, and none is set in"),
    ]
    for change, says in cases:
        env = {name: value for name, value in {**user_env(running, storage, synthetic_dir), **change}.items()
               if value is not None}
        started = time.time()
        done = subprocess.run(tune("mlp", "--trials", "1"), capture_output=True, text=True, env=env, timeout=60)
        assert time.time() - started < 10  # Python's start-up included
        errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 1 and len(errors) == 1 and says in errors[0] and "Fix:" in errors[0], done.stderr
        assert "not-the-password" not in done.stdout + done.stderr
        assert optuna.get_all_study_names(storage) == []  # nothing created before the error


def test_the_dashboard_serves_a_postgresql_study_without_showing_the_password(services, synthetic_dir):
    running, _, _ = services
    storage = fresh_database(running, "dashboard")
    optuna.create_study(study_name="on-postgres", storage=storage)
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "dashboard", "--port", str(port)],
                               env=user_env(running, storage, synthetic_dir), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline, listed = time.time() + 60, b""
        while time.time() < deadline and not listed:
            try:
                listed = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2).read()
            except OSError:
                time.sleep(0.3)
        assert b"on-postgres" in listed
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert running.state()["password"] not in ps
    finally:
        process.terminate()
        out = process.communicate(timeout=30)[0]
    assert running.state()["password"] not in out and ":***@" in out


# `services start` with one step made fatal: SIGKILL (no cleanup, no finally) at the point argv names.
KILLED_START = """
import os, signal, sys
from pathlib import Path
from pipeline.services import postgres
from pipeline.services.postgres import PostgresCluster
from pipeline.services.tracking_server import TrackingServer
from pipeline.__main__ import main

how, what, nth, ports = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

def then_die(part, name, when=lambda *args: True):
    real = getattr(part, name)
    def step(self, *args, **kwargs):
        done = real(self, *args, **kwargs)
        if when(*args):
            die()
        return done
    setattr(part, name, step)

if how == "before-replacing":  # a file half-written: its temporary copy is there, not yet renamed over it
    real_replace, seen = os.replace, []
    def replace(source, target, *args, **kwargs):
        seen.append(Path(target).name)
        if seen.count(what) == int(nth):
            die()
        return real_replace(source, target, *args, **kwargs)
    os.replace = replace
elif how == "after-pg":
    then_die(PostgresCluster, "pg", when=lambda *args: list(args[:len(what.split())]) == what.split())
elif how == "during-initdb":  # initdb cut short: its folder holds PG_VERSION but no control file yet
    real_pg = PostgresCluster.pg
    def pg(self, program, *args, **kwargs):
        done = real_pg(self, program, *args, **kwargs)
        if program == "initdb":
            (Path(args[args.index("-D") + 1]) / "global" / "pg_control").unlink()
            die()
        return done
    PostgresCluster.pg = pg
elif how == "after-databases":  # a kill between two CREATE DATABASE
    postgres.DATABASES = postgres.DATABASES[:1]
    then_die(PostgresCluster, "_create_databases")
else:
    then_die(TrackingServer, what)
sys.exit(main(["services", "start", "--pg-port", ports[0], "--mlflow-port", ports[1]]))
"""

# Each step of a start, in order; killed there, the next start must finish the job.
KILL_POINTS = [
    ("before-replacing", "services.json", "1"),  # the first state (passwords, ports) never written
    ("during-initdb", "", ""),  # a cluster half made
    ("after-pg", "initdb", ""),  # a whole cluster, not yet renamed into place
    ("before-replacing", "pg_hba.conf", "1"),  # the login rules half-written
    ("after-pg", "pg_ctl start", ""),  # PostgreSQL running, no databases
    ("after-databases", "", ""),  # one database of three
    ("before-replacing", "mlflow-auth.ini", "1"),  # the server's login settings half-written
    ("after", "_launch", ""),  # the server launched, its process id not recorded
    ("before-replacing", "services.json", "2"),  # found by its command line, the state's rewrite cut short
    ("before-replacing", "optuna-storage-url", "1"),  # both up, the clients' URL file half-written
]


def test_a_start_killed_at_any_step_is_finished_by_the_next_one(tmp_path):
    import base64
    import urllib.error

    import psycopg

    root = services_folder()
    env = {**os.environ, "SERVICES_DIR": str(root)}
    ports = [str(free_port()), str(free_port())]
    running = Services(root)
    script = tmp_path / "killed_start.py"
    script.write_text(KILLED_START)
    try:
        first_state = None
        for point in KILL_POINTS:
            killed = subprocess.run([sys.executable, str(script), *point, *ports], capture_output=True, text=True, env=env,
                                    timeout=300, cwd=Path(__file__).parents[1])
            assert killed.returncode == -signal.SIGKILL, (point, killed.stdout + killed.stderr)  # it got there
            first_state = first_state or running.state() or None
        done = subprocess.run([*SERVICES_COMMAND, "start", "--pg-port", ports[0], "--mlflow-port", ports[1]],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count(": running") == 2, done.stdout

        state = running.state()
        assert {key: state[key] for key in ("password", "mlflow_password", "pg_port", "mlflow_port")} == \
            {key: first_state[key] for key in ("password", "mlflow_password", "pg_port", "mlflow_port")}
        assert not (root / "postgres.partial").exists()
        assert [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if running.server.is_ours(pid)] \
            == [state["mlflow_pid"]]  # one server, recorded
        with psycopg.connect(running.database_url("postgres"), autocommit=True) as connection:
            databases = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
        assert {"optuna", "mlflow", "mlflow_auth"} <= databases
        assert running.storage_url_file.read_text() == running.database_url("optuna")
        optuna.create_study(study_name="after-kills", storage=running.database_url("optuna"))
        api = f"{running.tracking_uri()}/api/2.0/mlflow/experiments/search?max_results=1"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(api, timeout=10)
        assert refused.value.code == 401
        login = base64.b64encode(f"admin:{state['mlflow_password']}".encode()).decode()
        request = urllib.request.Request(api, headers={"Authorization": f"Basic {login}"})
        assert urllib.request.urlopen(request, timeout=10).status == 200
    finally:
        subprocess.run([*SERVICES_COMMAND, "stop"], env=env, timeout=120)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
