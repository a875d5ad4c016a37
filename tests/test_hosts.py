"""Sessions on separate hosts, for real: `make services HOST=<address>` in one network namespace,
`make tune` sessions in two others, `make evaluate-best` from a third, all joined by a bridge in a
namespace of its own. Every address is from 192.0.2.0/24 (RFC 5737's documentation range) and lives
in a namespace this test makes and deletes: nothing outside them is ever addressed.

    bridge namespace:  one bridge, a veth to each host below
    services  192.0.2.1/26   PostgreSQL + MLflow server, started with --host 192.0.2.1
    client-a  192.0.2.2/26   make tune            client-b  192.0.2.3/26   make tune
    client-c  192.0.2.4/26   make evaluate-best, the wrong password
    outsider  192.0.2.66/26  a direct link to the services host (its other address, 192.0.2.65/26),
                             a route to 192.0.2.0/26 through it: a network the services were not opened to
    lone      loopback only  no route to the services

The processes run as separate hosts would, sharing only the filesystem (the synthetic dataset, the
services' folder the printed exports read the storage URL from).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.data.dataset import CUSTOM_ENV_VAR
from pipeline.services import postgres_bin_dir
from tests.shrunk import tune_command

pytestmark = [pytest.mark.services, pytest.mark.slow]

SERVICES, CLIENT_A, CLIENT_B, CLIENT_C = "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"
SESSIONS_NETWORK = "192.0.2.0/26"
SERVICES_OTHER, OUTSIDER = "192.0.2.65", "192.0.2.66"  # on 192.0.2.64/26
TRIALS = 6  # the study's target, shared by both sessions

# Read the study and the registry from a client host (the test's own process is on no network of theirs).
CHECK_STUDY = """
import json, mlflow, optuna, os
from pipeline.tracking.registry import CHAMPION, REGISTERED_MODEL, val_accuracy_of
from pipeline import attrs
study = optuna.load_study(study_name="mlp", storage=os.environ["OPTUNA_STORAGE"])
client = mlflow.MlflowClient()
trials = []
for trial in study.get_trials(deepcopy=False):
    run = trial.user_attrs.get(attrs.MLFLOW_RUN_ID)
    trials.append({"number": trial.number, "state": trial.state.name, "value": trial.value,
                   "worker": trial.user_attrs.get(attrs.WORKER),
                   "parent": client.get_run(run).data.tags.get("mlflow.parentRunId") if run else None})
champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
print(json.dumps({"trials": trials, "champion": {"version": champion.version, "trial": champion.tags.get("trial"),
                                                 "val_accuracy": val_accuracy_of(champion)}}))
"""

# The champion as a plain MLflow client scores it from a client host: loaded by its alias, fed the raw test images.
SCORE_CHAMPION = """
import json, mlflow, numpy as np
from pipeline.data.dataset import load_fashion_mnist
from pipeline.tracking.registry import CHAMPION, REGISTERED_MODEL
data = load_fashion_mnist()  # the custom (synthetic) dataset the environment names
model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}@{CHAMPION}")
predicted = np.asarray(model.predict(data.test_images.numpy().astype(np.float32))).argmax(axis=1)
version = mlflow.MlflowClient().get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version
print(json.dumps({"version": int(version), "test_accuracy": float((predicted == data.test_labels.numpy()).mean())}))
"""

# Connect to each port of an address; print what happened (connected / refused / unreachable ...).
PROBE = """
import json, socket, sys
address, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
answers = {}
for port in ports:
    try:
        socket.create_connection((address, port), timeout=5).close()
        answers[port] = "connected"
    except OSError as error:
        answers[port] = type(error).__name__
print(json.dumps(answers))
"""

# The HTTP status of a GET without a login (a browser, curl, anyone on the network).
STATUS = """
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=10).status)
except urllib.error.HTTPError as error:
    print(error.code)
"""


def ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """Network namespaces as hosts, with names unique to this run; ``remove`` deletes them and ends
    every process still inside them (all started by this test)."""

    def __init__(self):
        self.tag = secrets.token_hex(3)
        self.names: list[str] = []

    def add(self, role: str) -> str:
        name = f"pl-{self.tag}-{role}"
        ip("netns", "add", name)
        self.names.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, one: str, one_address: str | None, other: str, other_address: str | None) -> None:
        """A veth pair between two namespaces; an address (with prefix) on each end that has one."""
        left, right = f"v{self.tag}{len(self.names)}{secrets.token_hex(1)}", f"w{self.tag}{secrets.token_hex(2)}"
        ip("link", "add", left, "netns", one, "type", "veth", "peer", "name", right, "netns", other)
        for namespace, device, address in ((one, left, one_address), (other, right, other_address)):
            if address:
                ip("-n", namespace, "addr", "add", address, "dev", device)
            ip("-n", namespace, "link", "set", device, "up")
        self.last_link = (left, right)

    def remove(self) -> None:
        for name in self.names:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for how in (signal.SIGTERM, signal.SIGKILL):
                for pid in pids:
                    try:
                        os.kill(int(pid), how)
                    except ProcessLookupError:
                        pass
                if how == signal.SIGTERM and pids:
                    time.sleep(2)
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture(scope="module")
def hosts():
    """The topology of the module docstring, always removed afterwards, even when a test fails."""
    if postgres_bin_dir() is None and os.geteuid() != 0:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql) and we cannot install it")
    made = Hosts()
    try:
        bridge = made.add("br")
    except (RuntimeError, FileNotFoundError) as error:
        if os.environ.get("CI"):  # CI is root with iproute2 (.ci/run): a skip there would hide a broken topology
            pytest.fail(f"CI must be able to make network namespaces: {error}")
        pytest.skip(f"cannot make network namespaces ({error}); this test needs root (CI runs as root)")
    try:
        ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        ip("-n", bridge, "link", "set", "br0", "up")
        roles = {}
        for role, address in (("svc", SERVICES), ("a", CLIENT_A), ("b", CLIENT_B), ("c", CLIENT_C)):
            roles[role] = made.add(role)
            made.link(roles[role], f"{address}/26", bridge, None)
            ip("-n", bridge, "link", "set", made.last_link[1], "master", "br0")
        roles["out"] = made.add("out")
        made.link(roles["svc"], f"{SERVICES_OTHER}/26", roles["out"], f"{OUTSIDER}/26")
        ip("-n", roles["out"], "route", "add", SESSIONS_NETWORK, "via", SERVICES_OTHER)
        roles["lone"] = made.add("lone")
        yield roles
    finally:
        made.remove()


def run_in(namespace: str, command: list[str], *, exports: str = "", env: dict, timeout: float = 300,
           background: bool = False):
    """``command`` on a host, in a shell that first ran ``exports`` (the lines make services printed)."""
    script = f"{exports}\nexec {shlex.join(command)}"
    argv = ["ip", "netns", "exec", namespace, "bash", "-c", script]
    if background:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)


def pipeline_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


@pytest.fixture(scope="module")
def services(hosts, synthetic_dir):
    """`services start` on the services host: first on loopback (the cluster is created for it), stopped,
    then with --host 192.0.2.1 twice, as a user who later opens it to the network would. Yields the
    printed output, the export lines, the folder and the environment for the clients."""
    root = Path(tempfile.mkdtemp(prefix="pipeline-hosts-", dir="/tmp"))  # reachable by the postgres user
    root.chmod(0o755)
    env = {**os.environ, "SERVICES_DIR": str(root), CUSTOM_ENV_VAR: str(synthetic_dir)}
    svc = hosts["svc"]
    try:
        # The second start on the network finds them running: it rewrites the rules all the same.
        for args in (["start"], ["stop"], ["start", "--host", SERVICES], ["start", "--host", SERVICES]):
            done = run_in(svc, pipeline_command("services", *args), env=env)
            assert done.returncode == 0, done.stdout + done.stderr
        exports = "\n".join(line.strip() for line in done.stdout.splitlines() if line.strip().startswith("export "))
        yield done.stdout, exports, root, env
    finally:
        run_in(svc, pipeline_command("services", "stop"), env=env, timeout=120)
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return errors[0]


def test_the_printed_exports_name_the_network_address_and_its_login_rule_is_written_once(hosts, services):
    printed, exports, root, env = services
    state = json.loads((root / "services.json").read_text())
    assert f"PostgreSQL on {SERVICES}:{state['pg_port']}; password logins from {SESSIONS_NETWORK}: running" in printed
    assert f"MLflow tracking server on http://{SERVICES}:{state['mlflow_port']}, login admin (password in " \
           f"{root / 'mlflow-password'}): running" in printed
    assert f"export MLFLOW_TRACKING_URI=http://{SERVICES}:{state['mlflow_port']}" in exports
    assert f"@{SERVICES}:{state['pg_port']}/optuna" in (root / "optuna-storage-url").read_text()
    assert "127.0.0.1" not in exports and state["password"] not in printed
    assert "export MLFLOW_TRACKING_USERNAME=admin" in exports and state["mlflow_password"] not in printed
    assert f'export MLFLOW_TRACKING_PASSWORD="$(cat {root / "mlflow-password"})"' in exports
    # From another host of the network, without the login: refused (the sessions below log in with the exports).
    api = f"http://{SERVICES}:{state['mlflow_port']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert run_in(hosts["c"], [sys.executable, "-c", STATUS, api], env=env, timeout=60).stdout.strip() == "401"
    hba = (root / "postgres" / "pg_hba.conf").read_text()
    assert hba.count(f"host all all {SESSIONS_NETWORK} scram-sha-256") == 1  # one block, after two starts on the network
    assert "0.0.0.0/0" not in hba  # the network asked for, not the world
    # Asked for loopback while they run on the network: refused, not silently left as they are.
    again = run_in(hosts["svc"], pipeline_command("services", "start"), env=env, timeout=60)
    assert f"the services already run on {SERVICES}. Fix: make services-stop first" in one_error_line(again)


def test_two_sessions_on_two_hosts_share_the_study_and_a_third_host_evaluates_the_champion(hosts, services, tmp_path):
    _, exports, _, env = services
    started = time.time()
    sessions = [run_in(hosts[host], tune_command(None, "mlp", "--trials", str(TRIALS), "--json", epochs=2),
                       exports=exports, env={**env, "CHECKPOINT_DIR": str(tmp_path / host)}, background=True)
                for host in ("a", "b")]
    outputs = []
    for session in sessions:
        out, err = session.communicate(timeout=300)
        assert session.returncode == 0 and "Traceback" not in err, out + err
        outputs.append(out)
    print(f"two sessions: {time.time() - started:.0f} s")

    checked = run_in(hosts["c"], [sys.executable, "-c", CHECK_STUDY], exports=exports, env=env, timeout=120)
    assert checked.returncode == 0, checked.stderr
    seen = json.loads(checked.stdout.strip().splitlines()[-1])
    trials = seen["trials"]
    assert sorted(t["number"] for t in trials) == list(range(len(trials)))  # every trial number once
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    assert len(finished) >= TRIALS
    assert len({t["worker"] for t in finished}) == 2  # both hosts ran trials
    parents = {json.loads(out.strip().splitlines()[-1])["mlflow_parent_run_id"] for out in outputs}
    assert len(parents) == 2  # one parent run per session ...
    assert {t["parent"] for t in finished} == parents  # ... holding that session's trials
    best = max(t["value"] for t in trials if t["state"] == "COMPLETE")
    champion = seen["champion"]
    assert champion["val_accuracy"] == pytest.approx(best, abs=1e-6)  # the champion is the best trial
    assert int(champion["trial"]) in [t["number"] for t in trials if t["value"] == best]

    evaluated = run_in(hosts["c"], pipeline_command("evaluate-best", "--json", "--reports-dir", str(tmp_path / "r")),
                       exports=exports, env=env)
    assert evaluated.returncode == 0 and "Traceback" not in evaluated.stderr, evaluated.stderr
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    scored = run_in(hosts["c"], [sys.executable, "-c", SCORE_CHAMPION], exports=exports, env=env, timeout=120)
    assert scored.returncode == 0, scored.stderr
    outside = json.loads(scored.stdout.strip().splitlines()[-1])
    assert result["version"] == outside["version"]  # the champion was evaluated ...
    assert result["test_accuracy"] == pytest.approx(outside["test_accuracy"])  # ... and scored as any client scores it
    assert result["test_accuracy"] >= 0.9  # the best of the trials has learnt the synthetic bars


def test_a_wrong_password_from_another_host_is_one_line(hosts, services):
    _, exports, root, env = services
    password = json.loads((root / "services.json").read_text())["password"]
    wrong = exports + f'\nexport OPTUNA_STORAGE="${{OPTUNA_STORAGE/{password}/not-the-password}}"'
    done = run_in(hosts["c"], tune_command(None, "mlp", "--trials", "1"), exports=wrong, env=env, timeout=60)
    error = one_error_line(done)
    assert "password authentication failed" in error and "Fix:" in error, error
    assert "not-the-password" not in done.stdout + done.stderr


def test_a_host_with_no_route_gets_one_line_naming_the_host_and_the_fix_within_seconds(hosts, services):
    _, exports, _, env = services
    started = time.time()
    done = run_in(hosts["lone"], tune_command(None, "mlp", "--trials", "1"), exports=exports, env=env, timeout=60)
    assert time.time() - started < 15  # Python's start-up included; not a connect timeout's minutes
    error = one_error_line(done)
    assert SERVICES in error and f"Fix: check that this machine reaches {SERVICES} (`ip route get {SERVICES}`" in error


def test_a_network_the_services_were_not_opened_to_reaches_nothing(hosts, services):
    _, exports, root, env = services
    state = json.loads((root / "services.json").read_text())
    ports = [str(state["pg_port"]), str(state["mlflow_port"])]
    # The services host's address on the outsider's network: nothing listens there.
    probed = run_in(hosts["out"], [sys.executable, "-c", PROBE, SERVICES_OTHER, *ports], env=env, timeout=60)
    assert json.loads(probed.stdout) == {port: "ConnectionRefusedError" for port in ports}, probed.stderr
    # Routed to the bound address, with the right password: PostgreSQL refuses the login by its rules.
    done = run_in(hosts["out"], tune_command(None, "mlp", "--trials", "1"), exports=exports, env=env, timeout=60)
    error = one_error_line(done)
    assert re.search(rf'no pg_hba.conf entry for host "{re.escape(OUTSIDER)}"', error), error
    assert "HOST=<address>" in error  # the fix
