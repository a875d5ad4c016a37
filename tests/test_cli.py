"""The command line as a user runs it: a subprocess, on the synthetic dataset."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from pipeline.data.dataset import CUSTOM_ENV_VAR, ENV_VAR
from tests.conftest import free_port


def run_cli(*args, data_dir, official=False, timeout=300, **env_vars):
    """The CLI on ``data_dir``: a custom dataset (the synthetic one), or with ``official`` the place to
    look for Fashion-MNIST's own files."""
    env = {**os.environ, (ENV_VAR if official else CUSTOM_ENV_VAR): str(data_dir), **env_vars}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.slow
def test_train_json_reports_the_three_accuracies(synthetic_dir):
    done = run_cli("train", "--epochs", "2", "--set", "val_size=200", "--set", "hidden_sizes=64,32",
                   "--set", "batch_size=32", "--device", "cpu", "--json", data_dir=synthetic_dir)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        assert report[key] >= 0.95, key  # the synthetic bars are learnt in two epochs (chance is 10 %)
    import re

    shown = [float(acc) for acc in re.findall(r"val loss [\d.]+ acc\s*([\d.]+)%", done.stderr)]
    assert len(shown) == 2 and f"{report['val_accuracy']:.2%}" == f"{max(shown) / 100:.2%}"  # the best epoch shown
    assert report["epochs"] == 2 and report["device"] == "cpu" and report["seconds"] > 0
    assert report["config"]["hidden_sizes"] == [64, 32] and report["config"]["batch_size"] == 32
    assert "epoch   2/2" in done.stderr  # progress goes to stderr, so stdout is pure JSON
    assert len(done.stdout.strip().splitlines()) == 1


def test_a_bad_setting_is_one_line_naming_the_key(synthetic_dir):
    # The real command line, once: one line on stderr, no traceback. The other settings run in this
    # process (the next test): the same main(), without an interpreter's start-up each.
    done = run_cli("train", "--set", "nope=1", data_dir=synthetic_dir)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope" in lines[0], done.stderr


@pytest.mark.parametrize("setting, named", [("dropout=1.5", "dropout"), ("batch_size=many", "batch_size"),
                                            ("optimizer=lbfgs", "optimizer")])
def test_a_bad_setting_value_is_one_line_naming_the_key(synthetic_env, capsys, setting, named):
    from tests.test_bad_input import run_main

    code, stderr = run_main(capsys, "train", "--set", setting)
    assert code == 2
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], stderr


@pytest.mark.slow
def test_a_truncated_dataset_is_one_clear_error(tmp_path):
    from tests.conftest import write_dataset

    folder = write_dataset(tmp_path / "broken")
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[: len(images.read_bytes()) // 2])
    done = run_cli("train", "--epochs", "1", data_dir=folder, official=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "truncated" in done.stderr and "make data" in done.stderr


@pytest.mark.slow
def test_a_missing_dataset_is_one_clear_error(tmp_path):
    done = run_cli("train", "--epochs", "1", data_dir=tmp_path / "empty", official=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "not found" in done.stderr and "make data" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", [["evaluate-best"], ["tune", "--study", "mlp", "--trials", "1"]])
def test_a_tracking_server_that_is_down_is_one_line_not_minutes_of_retries(tmp_path, synthetic_dir, command):
    uri = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, CUSTOM_ENV_VAR: str(synthetic_dir), "MLFLOW_TRACKING_URI": uri,
           "OPTUNA_STORAGE": f"sqlite:///{tmp_path / 'optuna.db'}"}
    # MLflow's own retries would take about four minutes: the timeout catches a return to that.
    done = subprocess.run([sys.executable, "-m", "pipeline", *command], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and uri in errors[0] and "MLFLOW_TRACKING_URI" in errors[0]


def test_ui_with_a_tracking_server_points_at_it_instead_of_serving_a_url_that_is_not_a_store(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://user:secret@127.0.0.1:5999"}
    done = subprocess.run([sys.executable, "-m", "pipeline", "ui"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "http://user:***@127.0.0.1:5999" in done.stdout and "secret" not in done.stdout


def _serves(url: str, process: subprocess.Popen, timeout: float = 90) -> bool:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except OSError:
            time.sleep(0.3)
    return False


def listening_addresses(port: int) -> set[str]:
    """The local addresses (hex, as Linux writes them) of the TCP sockets listening on ``port``."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return {row[1].split(":")[0] for row in rows if int(row[1].split(":")[1], 16) == port and row[3] == "0A"}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["dashboard", "ui"])
def test_the_uis_serve_the_configured_stores_on_127_0_0_1_only(tmp_path, command):
    port = free_port()
    env = {**os.environ, "OPTUNA_STORAGE": f"sqlite:///{tmp_path / 'optuna.db'}"}
    if command == "dashboard":
        import optuna

        optuna.create_study(study_name="listed", storage=env["OPTUNA_STORAGE"])
    process = subprocess.Popen([sys.executable, "-m", "pipeline", command, "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        path = "/api/studies" if command == "dashboard" else "/health"
        assert _serves(f"http://127.0.0.1:{port}{path}", process), process.stdout.read() if process.poll() else ""
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, not every interface
        if command == "dashboard":
            import urllib.request

            assert b"listed" in urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies").read()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_make_hands_storage_to_python_in_the_environment_never_on_a_command_line():
    import shutil

    if not shutil.which("make"):
        pytest.skip("no make")
    repo = os.path.dirname(os.path.dirname(__file__))
    url = "postgresql://user:hunter2@db.example/optuna"
    # PY stands in for the virtualenv's python: it shows the command line and environment make gives it.
    show = "sh -c 'echo \"argv: $$*\"; echo \"env: $$OPTUNA_STORAGE\"' python"

    def make_tune(*assignments):
        environment = {k: v for k, v in os.environ.items() if k != "OPTUNA_STORAGE"}
        done = subprocess.run(["make", "--no-print-directory", "-o", "data", "tune", f"PY={show}", *assignments],
                              capture_output=True, text=True, timeout=60, cwd=repo, env=environment)
        assert done.returncode == 0, done.stderr
        return done.stdout

    shown = make_tune(f"STORAGE={url}")
    assert f"env: {url}" in shown  # Python gets it as $OPTUNA_STORAGE ...
    argv = next(line for line in shown.splitlines() if line.startswith("argv:"))
    assert "hunter2" not in argv and "--storage" not in argv  # ... and never where make echoes or ps shows
    dry_run = subprocess.run(["make", "-n", "tune", f"STORAGE={url}"], capture_output=True, text=True, timeout=60,
                             cwd=repo)
    assert "hunter2" not in dry_run.stdout + dry_run.stderr
    assert "env: \n" in make_tune()  # unset: the default decides, in Python


def run_on_a_terminal(command: list[str], env: dict, timeout: float = 300) -> str:
    """Run ``command`` with a pseudo-terminal as its stdout and stderr, as in a shell; return what it wrote."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column window, as a shell's
    process = subprocess.Popen(command, env=env, stdout=terminal, stderr=terminal, stdin=subprocess.DEVNULL)
    os.close(terminal)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], timeout)
            if not ready:
                raise TimeoutError(b"".join(chunks).decode(errors="replace"))
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        process.wait(timeout=60)
        os.close(controller)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_on_a_terminal_tune_shows_a_live_bar_inside_each_trial(tmp_path, synthetic_env):
    from tests.shrunk import tune_command

    shown = run_on_a_terminal(tune_command(tmp_path, "mlp", "--trials", "2", "--timeout", "600", "--no-tracking",
                                           epochs=20), synthetic_env)
    assert "trial 0:" in shown and "/20 [" in shown  # tqdm's "trial 0:  45%|####  | 9/20 [...]"
    assert "budget left=" in shown and "val=" in shown
    assert "trial   1 " in shown  # and the plain line after each trial


@pytest.mark.slow
def test_without_a_terminal_the_output_is_plain_lines(synthetic_dir):
    # COLUMNS gives a width, as a log file has none: a bar drawn here would show.
    done = run_cli("train", "--epochs", "2", "--set", "val_size=200", "--set", "hidden_sizes=16", "--device", "cpu",
                   data_dir=synthetic_dir, COLUMNS="160")
    assert done.returncode == 0, done.stderr
    # No bar ("training:  50%|#####     | 1/2 ..."), no cursor codes in a log file. (Text mode turns a
    # carriage return into a newline, so look for the bar itself.)
    assert "%|" not in done.stdout and "training:" not in done.stdout and "\x1b[" not in done.stdout
    assert "epoch   1/2" in done.stdout and "epoch   2/2" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("url, says", [
    ("mysql://user:secret@127.0.0.1:1/optuna", "no database driver"),  # no MySQL driver in .venv
    ("postgresql://user:secret@127.0.0.1:1/optuna", "Connection refused"),  # nothing listens there
    ("nosuchdb://user:secret@host/optuna", "not a storage URL"),
])
def test_a_storage_that_cannot_be_opened_is_one_line_that_hides_the_password(tmp_path, synthetic_env, absent_mlflow_store,
                                                                             url, says):
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--trials", "1", "--storage", url],
                          capture_output=True, text=True, env=synthetic_env, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0] and "Fix:" in errors[0], done.stderr
    assert "secret" not in done.stdout + done.stderr
    assert time.time() - started < 10
    assert not (tmp_path / "mlflow.db").exists()  # nothing was created: no experiment, no session run


@pytest.mark.slow
def test_a_worker_process_that_crashes_fails_the_session(tmp_path, synthetic_env):
    # The data are loaded in each worker process: a folder that is not there crashes both of them.
    env = {**synthetic_env, CUSTOM_ENV_VAR: str(tmp_path / "no-such-folder")}
    done = subprocess.run([sys.executable, "-m", "pipeline", "tune", "--workers", "2", "--trials", "1", "--no-tracking",
                           "--storage", f"sqlite:///{tmp_path / 'optuna.db'}"], capture_output=True, text=True,
                          env=env, timeout=180)
    assert done.returncode == 1  # not a session that looks like a success
    # The first worker to crash stops the session; the other, crashing too or stopped first, is not left running.
    assert re.search(r"error: worker-[01] \(exit code 1\)(, worker-[01] \(exit code 1\))? stopped on an error",
                     done.stderr), done.stderr[-2000:]


def test_compare_and_the_dashboard_never_load_torch_or_the_trainer(tmp_path):
    # Both only read studies: torch and the trainer would add seconds of start-up (and GBs on a GPU box).
    # One fresh interpreter runs compare, then the dashboard, listing what each loaded once it is done:
    # whatever the dashboard's line shows beyond compare's, the dashboard loaded.
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="read-only", storage=storage, direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.9, params={}, distributions={}))
    commands = {"compare": ["compare", "--storage", storage, "--no-tracking", "--reports-dir", str(tmp_path)],
                "dashboard": ["dashboard", "--storage", storage, "--port", str(free_port())]}
    probe = f"""
import sys
import optuna_dashboard
optuna_dashboard.run_server = lambda *args, **kwargs: None  # the dashboard up to serving, not serving
from pipeline.__main__ import main
for command, argv in {commands!r}.items():
    code = main(argv)
    loaded = sorted(m for m in ("torch", "torchvision", "pipeline.training.train", "pipeline.data.dataset") if m in sys.modules)
    print(command, "loaded:", loaded, "code:", code)
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    for command in commands:
        assert f"{command} loaded: [] code: 0" in done.stdout, done.stdout + done.stderr
