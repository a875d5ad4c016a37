"""Bad input a user can type or have lying around, through the command line as they would meet it:
one line naming the problem and the fix, no traceback, nothing created. docs/bad-input.md lists
every case with the test that backs it; this module holds the ones no other module needs.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from optuna.trial import TrialState

from pipeline.__main__ import main
from pipeline.paths import STUDIES_DIR
from pipeline import attrs
from tests.conftest import idx_bytes, write_dataset
from tests.shrunk import session


def run_main(capsys, *argv) -> tuple[int, str]:
    """The CLI in this process (fast: no interpreter start-up); returns its exit code and stderr."""
    try:
        code = main(list(argv))
    except SystemExit as exit:  # argparse's own errors, and ConfigError through parser.exit
        code = exit.code
    return code, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    # Left out: argparse's usage lines, and the note naming a custom dataset.
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("usage:", "  ", "note:"))]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.mark.parametrize("argv, says", [
    (["--trials", "0"], "--trials (TRIALS) must be at least 1, got 0"),
    (["--trials", "many"], "argument --trials: invalid int value: 'many'"),
    (["--timeout", "-5"], "--timeout (TIMEOUT) must be a positive number of seconds, got -5"),
    (["--timeout", "soon"], "argument --timeout: invalid float value: 'soon'"),
    (["--workers", "0"], "--workers (WORKERS) must be at least 1, got 0"),
    (["--set", "nope=1"], "unknown config key 'nope'"),
    (["--set", "lr=0.1"], "'lr' is searched by study mlp"),
    (["--set", "epochs=0"], "config key 'epochs' = 0 is out of range"),
    (["--set", "epochs"], "--set expects KEY=VALUE"),
    (["--set", "model=cnn"], "--set model=cnn contradicts study mlp: it searches 'hidden_sizes'"),
    (["--session-seed", "-1"], "--session-seed must be an integer from 0 to 4294967295, got -1"),
])
def test_a_bad_tune_value_is_one_line_before_anything_runs(tmp_path, capsys, absent_mlflow_store, argv, says):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    code, stderr = run_main(capsys, "tune", "--storage", storage, *argv)
    assert code == 2 and says in one_error_line(stderr)
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_study_file_that_is_not_toml_is_one_line_with_its_path(tmp_path, capsys):
    broken = tmp_path / "broken.toml"
    broken.write_text('description = "unterminated\n')
    code, stderr = run_main(capsys, "tune", "--study", str(broken), "--storage", f"sqlite:///{tmp_path / 'o.db'}")
    assert code == 1 and one_error_line(stderr).startswith(f"error: {broken}: not valid TOML")


def test_a_missing_study_file_is_one_line_listing_the_studies_there_are(tmp_path, capsys):
    code, stderr = run_main(capsys, "tune", "--study", "nope", "--storage", f"sqlite:///{tmp_path / 'o.db'}")
    assert code == 1 and "no such study file (studies here: " in one_error_line(stderr) and "mlp" in stderr


def rewrite(folder, name, content: bytes) -> None:
    (folder / f"{name}.gz").unlink()
    (folder / name).write_bytes(content)


@pytest.mark.parametrize("damage, says", [
    ("magic", "are not valid IDX files"),
    ("counts", "images for"),
])
def test_a_damaged_custom_dataset_is_one_line_naming_it(tmp_path, capsys, monkeypatch, damage, says):
    import numpy as np

    folder = write_dataset(tmp_path / "damaged")
    if damage == "magic":  # an IDX file starts 0, 0, 8 (unsigned bytes): here 0, 0, 9
        rewrite(folder, "train-labels-idx1-ubyte", bytes([0, 0, 9, 1]) + (600).to_bytes(4, "big") + bytes(600))
    else:  # 599 labels for 600 images
        rewrite(folder, "train-labels-idx1-ubyte", idx_bytes(np.zeros(599, dtype=np.uint8)))
    monkeypatch.setenv("FASHION_MNIST_CUSTOM_DIR", str(folder))
    code, stderr = run_main(capsys, "train", "--epochs", "1")
    assert code == 1 and says in one_error_line(stderr)


@pytest.mark.slow
def test_an_out_of_memory_trial_fails_alone_and_the_study_goes_on(tmp_path, synthetic_env, monkeypatch):
    import pipeline.search.objective as objective
    from pipeline.search.session import run_session

    real_train, calls = objective.train, []

    def out_of_memory_once(config, *args, **kwargs):
        calls.append(config)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(objective, "train", out_of_memory_once)
    summary = run_session(session(tmp_path, trials=2, epochs=1))
    states = summary["states"]
    assert states["FAIL"] == 1 and states.get("COMPLETE", 0) + states.get("PRUNED", 0) == 2
    import optuna

    failed = optuna.load_study(study_name="mlp", storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials(
        states=(TrialState.FAIL,))
    assert failed[0].user_attrs[attrs.FAIL_REASON].startswith("out of memory (CUDA out of memory. Tried to allocate")
    assert "lower batch_size" in failed[0].user_attrs[attrs.FAIL_REASON]
    assert len(calls) == 3  # the study went on to its two finished trials


@pytest.mark.parametrize("url, shown", [
    ("postgresql://user:s3cret@db/optuna", "postgresql://user:***@db/optuna"),
    ("postgresql://user:s3/cr3t@db:5432/optuna", "postgresql://user:***@db:5432/optuna"),  # a / in it
    ("postgresql://user@db/optuna?sslmode=require&password=s3cret", "postgresql://user@db/optuna?sslmode=require&password=***"),
    ("https://user:s3cret@mlflow.example/", "https://user:***@mlflow.example/"),
    ("sqlite:///studies/a@b.db", "sqlite:///studies/a@b.db"),  # no password, nothing to hide
])
def test_every_form_of_password_in_a_url_is_masked(url, shown):
    from pipeline.stores import redact

    assert redact(url) == shown


@pytest.mark.parametrize("command", ["train", "tune"])
@pytest.mark.parametrize("device, says", [
    ("cuda", "torch sees no CUDA GPU on this machine. Fix: --device cpu"),
    ("cuda:7", "torch sees no CUDA GPU on this machine"),
    ("gpu", "--device 'gpu' is not a device. Fix: auto"),
    ("mps", "--device mps: this project trains on a CPU or a CUDA GPU only"),
])
def test_a_device_this_machine_does_not_have_is_one_line_before_anything_runs(tmp_path, capsys, synthetic_env,
                                                                             command, device, says):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    storage = ["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"] if command == "tune" else []
    code, stderr = run_main(capsys, command, "--device", device, *storage)
    assert code == 1 and says in one_error_line(stderr)
    assert not (tmp_path / "optuna.db").exists()


@pytest.mark.parametrize("command, variable", [("dashboard", "DASHBOARD_PORT"), ("ui", "UI_PORT")])
def test_a_port_already_taken_is_one_line_naming_the_variable_that_moves_it(tmp_path, capsys, monkeypatch,
                                                                            command, variable):
    import socket

    import optuna

    monkeypatch.setenv("OPTUNA_STORAGE", f"sqlite:///{tmp_path / 'optuna.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    optuna.create_study(study_name="tuned", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    with socket.socket() as holder:  # another program on the port
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, stderr = run_main(capsys, command, "--port", str(port))
    line = one_error_line(stderr)
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in line and variable in line


@pytest.mark.parametrize("port", ["70000", "0", "http"])
def test_a_port_that_is_no_port_number_is_refused_by_the_parser(capsys, port):
    code, stderr = run_main(capsys, "dashboard", "--port", port)
    assert code == 2 and "is not a port number (1-65535)" in one_error_line(stderr)


def sqlite_file(path):
    import sqlite3

    sqlite3.connect(path).execute("create table t (x)").connection.close()
    return path


# (argument or environment variable, how to make the bad thing under tmp_path, what the line says)
FILES_THAT_ARE_NOT_WHAT_THEIR_NAME_SAYS = [
    ("--storage", lambda d: d / "no-folder" / "o.journal", "the folder of the journal file"),
    ("--storage", lambda d: d, "is a folder; a journal storage is a file"),
    ("--storage", lambda d: (d / "notes.txt").write_text("hello") and d / "notes.txt", "is not an Optuna journal file"),
    ("--storage", lambda d: sqlite_file(d / "studies.db"), "is an SQLite database, but a path without :// names"),
    ("--storage", lambda d: "sqlite:///" + str((d / "n.txt").write_text("hi") and d / "n.txt"),
     "is not an SQLite database"),
    ("MLFLOW_TRACKING_URI", lambda d: d / "mlruns", "is a file path; this project tracks in a database or a server"),
    ("MLFLOW_TRACKING_URI", lambda d: "file://" + str(d / "mlruns"), "is a file path"),
    ("MLFLOW_TRACKING_URI", lambda d: f"sqlite:///{d}", "is a folder. Fix: name an MLflow database file"),
    ("MLFLOW_TRACKING_URI", lambda d: "sqlite:///" + str((d / "m.db").write_text("x") and d / "m.db"),
     "is not an SQLite database"),
    ("CHECKPOINT_DIR", lambda d: (d / "c.txt").write_text("x") and d / "c.txt", "is a file, not a folder"),
    ("OPTUNA_HEARTBEAT_SECONDS", lambda d: "abc", "must be a whole number of seconds, at least 1"),
    ("OPTUNA_HEARTBEAT_SECONDS", lambda d: "0", "must be a whole number of seconds, at least 1"),
]


@pytest.mark.parametrize("where, make, says", FILES_THAT_ARE_NOT_WHAT_THEIR_NAME_SAYS)
def test_a_store_or_folder_that_is_not_what_its_name_says_is_one_line_before_anything_runs(
        tmp_path, capsys, monkeypatch, synthetic_env, absent_mlflow_store, where, make, says):
    bad = tmp_path / "bad"
    bad.mkdir()
    value = str(make(bad))
    before = sorted(bad.rglob("*"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = ["--storage", value] if where == "--storage" else ["--storage", f"sqlite:///{tmp_path / 'o.db'}"]
    if where != "--storage":
        monkeypatch.setenv(where, value)
    code, stderr = run_main(capsys, "tune", *storage, "--set", "epochs=1")
    assert code == 1 and says in one_error_line(stderr)
    assert sorted(bad.rglob("*")) == before  # nothing written into what was named
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run either
    assert where == "--storage" or not (tmp_path / "o.db").exists()  # nor the study


def test_a_study_of_the_same_name_from_another_family_is_refused(tmp_path, capsys, synthetic_env):
    import optuna

    # A copy of mlp.toml saved as cnn.toml, run against a storage that holds the real cnn study.
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    optuna.create_study(study_name="cnn", storage=storage).set_user_attr(attrs.STUDY_MODEL_FAMILY, "cnn")
    copy = tmp_path / "cnn.toml"
    copy.write_text((STUDIES_DIR / "mlp.toml").read_text())
    code, stderr = run_main(capsys, "tune", "--study", str(copy), "--storage", storage, "--no-tracking")
    assert code == 1 and "already holds a study 'cnn' of the cnn family" in one_error_line(stderr)
    assert optuna.load_study(study_name="cnn", storage=storage).trials == []


@pytest.mark.parametrize("edit, says", [
    (("--set", "epochs=2"), "epochs 1 -> 2"),  # another --set than the study ran with
    (("--study", "{edited}"), "pruner.min_resource 3 -> 1"),  # the file's pruner edited
])
def test_a_study_resumed_under_other_rules_is_refused_naming_what_changed(tmp_path, capsys, synthetic_env, edit, says):
    import optuna

    from pipeline.search.study import prepare_study
    from pipeline.stores import open_storage

    storage = f"sqlite:///{tmp_path / 'o.db'}"
    prepare_study(session(tmp_path, trials=1, epochs=1).spec, open_storage(storage))  # a first session's study
    edited = tmp_path / "mlp.toml"
    edited.write_text((STUDIES_DIR / "mlp.toml").read_text().replace("min_resource = 3", "min_resource = 1"))
    argv = [arg.format(edited=edited) for arg in edit]
    sets = [] if "--set" in argv else ["--set", "epochs=1"]
    code, stderr = run_main(capsys, "tune", "--storage", storage, "--no-tracking", "--set", "val_size=200", *sets,
                            *argv)
    line = one_error_line(stderr)
    assert code == 1 and "study 'mlp' in this storage ran with other settings" in line and says in line
    assert "start a new study" in line
    assert [t.state for t in optuna.load_study(study_name="mlp", storage=storage).trials] == [TrialState.WAITING]


@pytest.mark.parametrize("argv, says, exit_code", [
    (["tune", "--timeout", "nan"], "--timeout (TIMEOUT) must be a positive number of seconds, got nan", 2),
    (["tune", "--timeout", "inf"], "--timeout (TIMEOUT) must be a positive number of seconds, got inf", 2),
    (["tune", "--workers", "1000"], "--workers (WORKERS) 1000 is more than this machine's", 2),
    (["train", "--set", "hidden_sizes=512,,128"], "an empty entry in '512,,128'", 2),
    (["train", "--model", "cnn", "--set", "model=mlp"], "--model cnn and --set model=mlp disagree", 2),
    (["train", "--epochs", "2", "--set", "epochs=1"], "--epochs 2 and --set epochs=1 disagree", 2),
    (["train", "--set", "train_subset=5", "--set", "val_size=200"], "needs at least 10 images on each side", 1),
    (["compare", "--reports-dir", "{file}"], "is a file, not a folder", 2),
    (["evaluate-best", "--reports-dir", "{file}"], "is a file, not a folder", 2),
    (["evaluate-best", "--model", ""], "--model is empty", 1),
])
def test_a_value_a_user_gets_wrong_is_one_line(tmp_path, capsys, monkeypatch, synthetic_env, argv, says, exit_code):
    import optuna

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("OPTUNA_STORAGE", f"sqlite:///{tmp_path / 'o.db'}")
    if argv[0] == "compare":
        optuna.create_study(study_name="tuned", storage=f"sqlite:///{tmp_path / 'o.db'}")
    (tmp_path / "a-file").write_text("x")
    code, stderr = run_main(capsys, *[arg.format(file=tmp_path / "a-file") for arg in argv])
    assert code == exit_code and says in one_error_line(stderr)


def test_a_custom_dataset_folder_without_the_files_names_the_variable_to_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FASHION_MNIST_CUSTOM_DIR", str(tmp_path))
    code, stderr = run_main(capsys, "train", "--epochs", "1")
    assert code == 1 and "Fix: point FASHION_MNIST_CUSTOM_DIR at a folder holding those four files" in \
        one_error_line(stderr)


def test_services_in_a_folder_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "svc").write_text("x")
    monkeypatch.setenv("SERVICES_DIR", str(tmp_path / "svc"))
    code, stderr = run_main(capsys, "services", "start")
    assert code == 1 and "SERVICES_DIR=" in one_error_line(stderr) and "is a file, not a folder" in stderr


def test_services_on_an_address_this_machine_does_not_have_is_one_line_before_anything(tmp_path, capsys,
                                                                                        monkeypatch):
    # 192.0.2.99 (RFC 5737, documentation only) is compared with this machine's addresses, never contacted.
    monkeypatch.setenv("SERVICES_DIR", str(tmp_path / "svc"))
    code, stderr = run_main(capsys, "services", "start", "--host", "192.0.2.99")
    line = one_error_line(stderr)
    assert code == 1 and "--host 192.0.2.99 is not an address of this machine" in line and "127.0.0.1" in line
    assert "Fix: one of those, or 0.0.0.0" in line
    assert not (tmp_path / "svc").exists()  # nothing created, nothing started


@contextmanager
def stand_in_server(refuses, status: int, refusal: bytes):
    """An HTTP server on a free loopback port answering as a tracking server would: ``status`` and
    ``refusal`` to the requests ``refuses(handler)`` picks, 200 to the others. Yields its URI."""
    import http.server
    import threading

    class StandIn(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            refused = refuses(self)
            self.send_response(status if refused else 200)
            self.end_headers()
            self.wfile.write(refusal if refused else b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_tracking_server_that_refuses_the_host_clients_address_it_by_is_one_line():
    """What MLflow 3's server does when the Host header is not among its --allowed-hosts (measured in
    tests/test_hosts.py with the allowance left out): /health answers, every API call is 403."""
    from pipeline.stores import TrackingStoreError, check_tracking_server

    with stand_in_server(lambda request: request.path != "/health", 403,
                         b"Invalid Host header - possible DNS rebinding attack detected") as uri:
        with pytest.raises(TrackingStoreError) as raised:
            check_tracking_server(uri, timeout=5)
    assert "refuses requests addressed to 127.0.0.1" in str(raised.value)
    assert "Fix: start it with MLFLOW_SERVER_ALLOWED_HOSTS=127.0.0.1,127.0.0.1:*" in str(raised.value)


@pytest.mark.parametrize("command, host", [("dashboard", "0.0.0.0"), ("dashboard", "192.0.2.1"), ("dashboard", "::"),
                                           ("dashboard", "example.com"), ("ui", "0.0.0.0"), ("serve", "0.0.0.0")])
def test_a_server_without_login_on_another_address_than_loopback_is_refused_unless_asked(
        tmp_path, capsys, monkeypatch, command, host):
    """`make ui`, `make dashboard` and `make serve` have no login: --host beyond loopback needs the flag
    that says so. 192.0.2.1 (RFC 5737) and example.com are refused before anything binds or resolves."""
    import optuna

    monkeypatch.setenv("OPTUNA_STORAGE", f"sqlite:///{tmp_path / 'optuna.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    optuna.create_study(study_name="tuned", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    import socket

    with socket.socket() as holder:  # a taken port: were the check gone, the server would fail, not serve
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        code, stderr = run_main(capsys, command, "--host", host, "--port", port)
        line = one_error_line(stderr)
        assert code == 1 and f"--host {host} would open" in line and "with no login" in line
        assert "Fix: leave --host out" in line and "--expose-without-login" in line
        if host != "0.0.0.0":
            return
        # With the flag the refusal is gone: the next check speaks.
        code, stderr = run_main(capsys, command, "--host", host, "--port", port, "--expose-without-login")
    line = one_error_line(stderr)
    assert code == 1 and "would open" not in line
    assert "no registered model" in line if command == "serve" else f"cannot listen on 0.0.0.0:{port}" in line


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_flag(host):
    from pipeline.network import check_exposure

    check_exposure(host, False, what="optuna-dashboard", exposes="", port=8080)


def test_a_tracking_server_that_asks_for_a_login_it_was_not_given_is_one_line(monkeypatch):
    """What MLflow's basic-auth app (make services' tracking server) answers: /health open, every API
    call 401 without the right login (measured in tests/test_services.py); the login goes as MLflow's
    client sends it, from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    import base64

    from pipeline.stores import TrackingStoreError, check_tracking_server

    right = {"Basic " + base64.b64encode(b"admin:s3cret").decode(), "Bearer t0ken"}  # a login, or a token
    said = {}
    with stand_in_server(lambda request: request.path != "/health" and request.headers.get("Authorization") not in right,
                         401, b"You are not authenticated.") as uri:
        for case, password in (("none", None), ("wrong", "not-the-password"), ("right", "s3cret"), ("token", None)):
            for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
                monkeypatch.delenv(name, raising=False)
            if password:
                monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
                monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
            if case == "token":  # a server behind a token login, as MLflow's client sends it
                monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
            try:
                check_tracking_server(uri, timeout=5)
                said[case] = ""
            except TrackingStoreError as error:
                said[case] = str(error)
    assert "asks for a login, and none is set in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (401)" in said["none"]
    assert "asks for a login, and refused the one in" in said["wrong"] and "not-the-password" not in said["wrong"]
    assert all("Fix: export both as `make services` prints them" in said[case] for case in ("none", "wrong"))
    assert said["right"] == "" and said["token"] == ""
