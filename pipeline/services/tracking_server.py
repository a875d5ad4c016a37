"""The services' MLflow tracking server: its runs in the cluster's `mlflow` database, artifacts proxied
into the services folder, MLflow's basic-auth app in front (the login `admin` and a generated password,
kept in files only their owner reads, never on a command line). It runs in a process group of its own,
found by its command line when its process id was never recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.network import health_answer
from pipeline.services.addresses import LOOPBACK, allowed_host_headers, client_address, host_in_url
from pipeline.services.files import ServicesError, ServicesFolder, write_private
from pipeline.services.postgres import database_url

MLFLOW_ADMIN = "admin"  # the tracking server's one user; MLflow's basic-auth app creates it on first start
# The server's background job runner (about ten worker processes, 250 MB each) serves GenAI
# features this pipeline does not use; on a small machine it costs more than the runs it tracks.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SERVER_START_SECONDS = 180  # the first start creates MLflow's tables (about 20 s on 2 cores)
ALLOWED_HOSTS_ENV = "MLFLOW_SERVER_ALLOWED_HOSTS"  # `mlflow server --allowed-hosts`, read from the environment
# Set in the user's shell, these would override the login the auth config file gives the server.
AUTH_OVERRIDES = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH")


def tracking_uri(state: dict) -> str:
    return f"http://{host_in_url(client_address(state.get('host', '127.0.0.1')))}:{state['mlflow_port']}"


@dataclass(frozen=True)
class TrackingServer:
    folder: ServicesFolder

    def pid(self) -> int | None:
        """The process id of this folder's MLflow server, if one runs: the recorded one when it still is
        that server (a process id can be reused by an unrelated process after a reboot), else one found
        by its command line (a start killed between launching the server and recording it)."""
        recorded = self.folder.state().get("mlflow_pid")
        if isinstance(recorded, int) and self.is_ours(recorded):
            return recorded
        return next((pid for pid in _process_ids() if self.is_ours(pid)), None)

    def is_ours(self, pid: int) -> bool:
        """``pid`` leads the process group of an `mlflow server` whose artifacts are this folder's (its
        workers share the command line's start, and the group: stop() ends them with it)."""
        argv = _command_line(pid)
        try:
            leads = os.getpgid(pid) == pid
        except OSError:
            return False
        if not leads or "server" not in argv:
            return False
        program = argv[:argv.index("server")]  # `python .../bin/mlflow` (a script run by its interpreter)
        return any(Path(part).name == "mlflow" for part in program) and str(self.folder.artifacts) in argv

    def has_login(self, pid: int) -> bool:
        """Whether the running server was started with the basic-auth app (earlier versions had no login)."""
        return "basic-auth" in _command_line(pid)

    def healthy(self, state: dict | None = None) -> bool:
        try:
            health_answer(tracking_uri(state or self.folder.state()), timeout=2)
            return True
        except (OSError, ValueError, KeyError):
            return False

    def start(self, state: dict, host: str) -> None:
        """Start the server unless it runs; either way, wait until it answers. One that runs is kept
        (perhaps still starting, launched by a start killed before it recorded it), unless an earlier
        version started it without a login."""
        pid = self.pid()
        if pid is not None and not self.has_login(pid):
            self.stop()  # it must not stay open
            pid = None
        if pid is None:
            pid = self._launch(state, host)
        if state.get("mlflow_pid") != pid:
            state["mlflow_pid"] = pid
            self.folder.save_state(state)
        deadline = time.time() + SERVER_START_SECONDS
        while not self.healthy(state):
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it if it died and we started it
            except ChildProcessError:
                pass
            if not self.is_ours(pid) or time.time() > deadline:
                self.stop()
                tail = self.folder.server_log.read_text(errors="replace").strip().splitlines()[-5:]
                raise ServicesError(f"the MLflow server did not start; the end of {self.folder.server_log}:\n"
                                    + "\n".join(tail))
            time.sleep(0.5)

    def _launch(self, state: dict, host: str) -> int:
        self.write_login_files(state)
        self.folder.artifacts.mkdir(exist_ok=True)
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": database_url("mlflow", state),  # not on argv: ps shows argv
               "MLFLOW_FLASK_SERVER_SECRET_KEY": state["flask_secret"],  # the same in every worker (CSRF)
               "MLFLOW_DISABLE_TELEMETRY": "true", **MLFLOW_SERVER_ENV}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", *AUTH_OVERRIDES):
            env.pop(name, None)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.folder.auth_config_file)  # the admin password, in a private file
        if host not in LOOPBACK and not os.environ.get(ALLOWED_HOSTS_ENV):  # the user's own list wins
            env[ALLOWED_HOSTS_ENV] = ",".join(allowed_host_headers(host))
        mlflow = Path(sys.executable).parent / "mlflow"
        with open(self.folder.server_log, "ab") as log:
            process = subprocess.Popen(
                [str(mlflow), "server", "--app-name", "basic-auth", "--artifacts-destination",
                 str(self.folder.artifacts), "--host", host, "--port", str(state["mlflow_port"]), "--workers", "2"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends the server and its workers
            )
        return process.pid

    def write_login_files(self, state: dict) -> None:
        """The basic-auth app's settings and the password clients read. The app creates the admin from
        admin_password when its user store (the mlflow_auth database) has none, and ignores it after;
        other users the admin adds get READ unless given more."""
        auth_store = database_url("mlflow_auth", state)
        write_private(self.folder.auth_config_file, "\n".join([
            "[mlflow]", "default_permission = READ", f"database_uri = {auth_store}",
            f"admin_username = {MLFLOW_ADMIN}", f"admin_password = {state['mlflow_password']}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth", ""]))
        write_private(self.folder.mlflow_password_file, state["mlflow_password"])

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return  # it ended by itself meanwhile
        except PermissionError:
            raise ServicesError(f"cannot stop the MLflow server (process {pid}): it belongs to another user. "
                                f"Fix: stop it as that user (kill {pid}), or with sudo") from None
        for _ in range(100):
            if self.pid() is None:
                return
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it when we started it ourselves
            except ChildProcessError:
                pass
            time.sleep(0.1)
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _process_ids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
