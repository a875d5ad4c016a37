"""`make services`: a throwaway PostgreSQL cluster and an MLflow tracking server, for studies shared
by several sessions or machines.

PostgreSQL (Debian's) holds two databases: `optuna` (the studies) and `mlflow` (the tracking
server's backend store). The tracking server proxies artifacts (`--artifacts-destination`), so
clients send models and figures over HTTP and need no shared filesystem. Everything lives under
one folder (.services/ by default, ignored by git): the cluster, the artifacts, the logs and
services.json (ports, passwords, the server's process id). The tracking server runs MLflow's basic-auth
app: every request needs the login `admin` and a generated password (kept, like the database's, in
files only their owner reads, never on a command line). Both bind to 127.0.0.1 unless told
otherwise (`--host`): bound to another address, PostgreSQL takes password logins from that
address's network only (0.0.0.0: from anywhere), a rule rewritten on every start, and the server
accepts requests addressed to that address. PostgreSQL refuses to run as root, so under root it
runs as the `postgres` user.

A start may be killed at any point (Ctrl-C, a lost session) and run again: each step does what is
missing and leaves what is there (a cluster is made whole in a folder of its own, then renamed into
place; databases are created when absent, also in a cluster that already runs; a server already
running is found by its command line even when its process id was never recorded), and every file is
written whole or not at all (a temporary file, then a rename).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError, first_line
from pipeline.network import free_port, health_answer
from pipeline.paths import REPO_ROOT
from pipeline.service_addresses import (
    EVERY_ADDRESS,
    LOOPBACK,
    allowed_host_headers,
    client_address,
    host_in_url,
    login_networks,
)

SERVICES_DIR_ENV = "SERVICES_DIR"
DEFAULT_PG_PORT, DEFAULT_MLFLOW_PORT = 55432, 5050  # taken when free, else a free port
DB_USER = "pipeline"
DATABASES = ("optuna", "mlflow", "mlflow_auth")  # the studies, the runs, the tracking server's users
MLFLOW_ADMIN = "admin"  # the tracking server's one user; MLflow's basic-auth app creates it on first start
# The server's background job runner (about ten worker processes, 250 MB each) serves GenAI
# features this pipeline does not use; on a small machine it costs more than the runs it tracks.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
SERVER_START_SECONDS = 180  # the first start creates MLflow's tables (about 20 s on 2 cores)
# pg_hba.conf: the remote-login rules live between these lines, replaced whole on every start, so a
# cluster first started on loopback and later on a network takes that network's logins (and one moved
# back to loopback no longer does). Lines outside the block are the user's and are kept.
HBA_BEGIN = "# BEGIN make services: password logins from other machines (rewritten on every start; edit outside)"
HBA_END = "# END make services"
# What earlier versions appended at initdb for any non-loopback host (replaced by the block).
LEGACY_HBA_LINES = ("host all all 0.0.0.0/0 scram-sha-256", "host all all ::/0 scram-sha-256")
ALLOWED_HOSTS_ENV = "MLFLOW_SERVER_ALLOWED_HOSTS"  # `mlflow server --allowed-hosts`, read from the environment
# Set in the user's shell, these would override the login the auth config file gives the server.
AUTH_OVERRIDES = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH")


class ServicesError(PipelineError):
    """A service cannot start or be found; the message names it and the fix."""


def services_dir() -> Path:
    return Path(os.environ.get(SERVICES_DIR_ENV) or REPO_ROOT / ".services").resolve()


@dataclass(frozen=True)
class Services:
    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def state_file(self) -> Path:
        return self.root / "services.json"

    @property
    def storage_url_file(self) -> Path:
        return self.root / "optuna-storage-url"

    @property
    def mlflow_password_file(self) -> Path:
        """The tracking server's admin password alone, for `export MLFLOW_TRACKING_PASSWORD="$(cat ...)"`."""
        return self.root / "mlflow-password"

    @property
    def auth_config_file(self) -> Path:
        """MLflow's basic-auth settings (its user store's URL and the admin password): the server reads
        them from this file, named by MLFLOW_AUTH_CONFIG_PATH, so neither is on its command line."""
        return self.root / "mlflow-auth.ini"

    @property
    def artifacts(self) -> Path:
        return self.root / "mlflow-artifacts"

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def save_state(self, state: dict) -> None:
        write_private(self.state_file, json.dumps(state, indent=2))  # it holds the passwords

    def database_url(self, database: str, state: dict | None = None) -> str:
        """The URL clients use (the bound address, or loopback when bound to every address)."""
        state = state or self.state()
        host = host_in_url(client_address(state.get("host", "127.0.0.1")))
        return f"postgresql://{DB_USER}:{state['password']}@{host}:{state['pg_port']}/{database}"

    def tracking_uri(self, state: dict | None = None) -> str:
        state = state or self.state()
        return f"http://{host_in_url(client_address(state.get('host', '127.0.0.1')))}:{state['mlflow_port']}"

    def client_env(self, state: dict | None = None) -> dict[str, str]:
        """What a client's environment needs to use both services (the printed exports, resolved)."""
        state = state or self.state()
        return {"OPTUNA_STORAGE": self.database_url("optuna", state), "MLFLOW_TRACKING_URI": self.tracking_uri(state),
                "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN, "MLFLOW_TRACKING_PASSWORD": state["mlflow_password"]}

    # PostgreSQL -------------------------------------------------------------------------------

    def pg(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run one of PostgreSQL's programs, as the `postgres` user when we are root."""
        return _run_as_postgres([str(postgres_bin_dir() / program), *args], check=check)

    def postgres_running(self) -> bool:
        return (self.pgdata / "PG_VERSION").exists() and self.pg("pg_ctl", "status", "-D", str(self.pgdata),
                                                                 check=False).returncode == 0

    def start_postgres(self, state: dict, host: str) -> None:
        """Each step done only when missing, so that a start killed anywhere and run again completes:
        the cluster, the login rules, the server, the databases (also in a cluster already running)."""
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(state["password"])
        self.write_login_rules(login_networks(host))
        if self.postgres_running():
            self.pg("pg_ctl", "reload", "-D", str(self.pgdata))  # the rules as written now
        else:
            log = self.root / "postgres.log"
            log.touch()
            if os.geteuid() == 0:
                shutil.chown(log, "postgres", "postgres")  # the server writes it as the postgres user
            options = f"-c listen_addresses={host} -p {state['pg_port']} -k {shlex.quote(str(self.pgdata))}"
            self.pg("pg_ctl", "start", "-D", str(self.pgdata), "-l", str(log), "-w", "-t", "60", "-o", options)
        self._create_databases(state)

    def _initdb(self, password: str) -> None:
        """A new cluster, made in a folder beside its place and renamed into it when whole: initdb killed
        half-way leaves only that folder, which the next start removes and makes again."""
        partial = self.pgdata.with_name(self.pgdata.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if self.pgdata.is_dir() and not any(self.pgdata.iterdir()):
            self.pgdata.rmdir()  # an empty folder left by an earlier version's start
        if self.pgdata.exists():
            raise ServicesError(f"{self.pgdata} holds no PostgreSQL cluster (no PG_VERSION) but is not empty. Fix: "
                                f"move it away (make services creates a new cluster there), or point SERVICES_DIR "
                                f"elsewhere")
        partial.mkdir(mode=0o700)
        password_file = self.root / "initdb-password"
        write_private(password_file, password)
        try:
            if os.geteuid() == 0:
                for path in (partial, password_file):
                    shutil.chown(path, "postgres", "postgres")
                if _run_as_postgres(["test", "-w", str(partial)], check=False).returncode != 0:
                    raise ServicesError(f"the postgres user cannot reach {self.root} (a parent folder is private). "
                                        f"Fix: SERVICES_DIR=/var/tmp/pipeline-services make services")
            # Local socket: trusted (the socket sits in the cluster's own folder); TCP: the password.
            self.pg("initdb", "-D", str(partial), "-U", DB_USER, f"--pwfile={password_file}",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions")
        finally:
            password_file.unlink(missing_ok=True)
        os.replace(partial, self.pgdata)

    def write_login_rules(self, networks: list[str]) -> None:
        """Replace the marked block of pg_hba.conf with a password (scram-sha-256) rule per network;
        no block for loopback (initdb's own rules cover it). The file keeps its owner (postgres)."""
        hba = self.pgdata / "pg_hba.conf"
        lines = hba.read_text().splitlines()
        if HBA_BEGIN in lines and HBA_END not in lines[lines.index(HBA_BEGIN):]:
            lines.remove(HBA_BEGIN)  # a block cut short by a hand edit: keep what follows its start
        kept, inside = [], False
        for line in lines:
            if line == HBA_BEGIN:
                inside = True
            elif line == HBA_END:
                inside = False
            elif not inside and line.strip() not in LEGACY_HBA_LINES:
                kept.append(line)
        while kept and not kept[-1].strip():
            kept.pop()
        block = [HBA_BEGIN, *(f"host all all {network} scram-sha-256" for network in networks), HBA_END]
        write_whole(hba, "\n".join(kept + ([""] + block if networks else [])) + "\n", like=hba)

    def _create_databases(self, state: dict) -> None:
        import psycopg

        try:
            with psycopg.connect(self.database_url("postgres", state), autocommit=True) as connection:
                existing = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
                for database in DATABASES:
                    if database not in existing:
                        connection.execute(f'CREATE DATABASE "{database}"')  # whole or not at all
        except psycopg.OperationalError as error:  # e.g. a pg_hba.conf edited by hand that shuts us out
            raise ServicesError(f"PostgreSQL started but refuses us: {first_line(error)}. Fix: check "
                                f"{self.pgdata / 'pg_hba.conf'} (lines outside the block make services writes), "
                                f"then make services-stop and make services again") from None

    def restart_postgres(self, pause: float = 0) -> None:
        """A fast restart with the options it was started with, ``pause`` seconds down (the tests'
        database fault)."""
        self.pg("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w")
        time.sleep(pause)
        self.start_postgres(self.state(), self.state().get("host", "127.0.0.1"))

    def stop_postgres(self) -> None:
        if self.postgres_running():
            self.pg("pg_ctl", "stop", "-D", str(self.pgdata), "-m", "fast", "-w")

    # MLflow tracking server -------------------------------------------------------------------

    def server_pid(self) -> int | None:
        """The process id of this folder's MLflow server, if one runs: the recorded one when it still is
        that server (a process id can be reused by an unrelated process after a reboot), else one found
        by its command line (a start killed between launching the server and recording it)."""
        recorded = self.state().get("mlflow_pid")
        if isinstance(recorded, int) and self._is_our_server(recorded):
            return recorded
        return next((pid for pid in _process_ids() if self._is_our_server(pid)), None)

    def _is_our_server(self, pid: int) -> bool:
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
        return any(Path(part).name == "mlflow" for part in program) and str(self.artifacts) in argv

    def server_has_login(self, pid: int) -> bool:
        """Whether the running server was started with the basic-auth app (earlier versions had no login)."""
        return "basic-auth" in _command_line(pid)

    def server_healthy(self, state: dict | None = None) -> bool:
        try:
            health_answer(self.tracking_uri(state), timeout=2)
            return True
        except (OSError, ValueError, KeyError):
            return False

    def start_server(self, state: dict, host: str) -> None:
        """Start the server unless it runs; either way, wait until it answers. One that runs is kept
        (perhaps still starting, launched by a start killed before it recorded it), unless an earlier
        version started it without a login."""
        pid = self.server_pid()
        if pid is not None and not self.server_has_login(pid):
            self.stop_server()  # it must not stay open
            pid = None
        if pid is None:
            pid = self._launch_server(state, host)
        if state.get("mlflow_pid") != pid:
            state["mlflow_pid"] = pid
            self.save_state(state)
        deadline = time.time() + SERVER_START_SECONDS
        while not self.server_healthy(state):
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it if it died and we started it
            except ChildProcessError:
                pass
            if not self._is_our_server(pid) or time.time() > deadline:
                self.stop_server()
                tail = (self.root / "mlflow.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise ServicesError(f"the MLflow server did not start; the end of {self.root / 'mlflow.log'}:\n"
                                    + "\n".join(tail))
            time.sleep(0.5)

    def _launch_server(self, state: dict, host: str) -> int:
        self.write_login_files(state)
        self.artifacts.mkdir(exist_ok=True)
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.database_url("mlflow", state),  # not on argv: ps shows argv
               "MLFLOW_FLASK_SERVER_SECRET_KEY": state["flask_secret"],  # the same in every worker (CSRF)
               "MLFLOW_DISABLE_TELEMETRY": "true", **MLFLOW_SERVER_ENV}
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", *AUTH_OVERRIDES):
            env.pop(name, None)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.auth_config_file)  # the admin password, in a private file
        if host not in LOOPBACK and not os.environ.get(ALLOWED_HOSTS_ENV):  # the user's own list wins
            env[ALLOWED_HOSTS_ENV] = ",".join(allowed_host_headers(host))
        mlflow = Path(sys.executable).parent / "mlflow"
        with open(self.root / "mlflow.log", "ab") as log:
            process = subprocess.Popen(
                [str(mlflow), "server", "--app-name", "basic-auth", "--artifacts-destination", str(self.artifacts),
                 "--host", host, "--port", str(state["mlflow_port"]), "--workers", "2"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: stop() ends the server and its workers
            )
        return process.pid

    def write_login_files(self, state: dict) -> None:
        """The basic-auth app's settings and the password clients read. The app creates the admin from
        admin_password when its user store (the mlflow_auth database) has none, and ignores it after;
        other users the admin adds get READ unless given more."""
        auth_store = self.database_url("mlflow_auth", state)
        write_private(self.auth_config_file, "\n".join([
            "[mlflow]", "default_permission = READ", f"database_uri = {auth_store}",
            f"admin_username = {MLFLOW_ADMIN}", f"admin_password = {state['mlflow_password']}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth", ""]))
        write_private(self.mlflow_password_file, state["mlflow_password"])

    def stop_server(self) -> None:
        pid = self.server_pid()
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
            if self.server_pid() is None:
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

    # Both -------------------------------------------------------------------------------------

    def start(self, *, host: str = "127.0.0.1", pg_port: int | None = None, mlflow_port: int | None = None) -> dict:
        """Start what is not running (creating the cluster on first use); return the state."""
        if self.root.exists() and not self.root.is_dir():
            raise ServicesError(f"{SERVICES_DIR_ENV}={self.root} is a file, not a folder. Fix: name a folder (it is "
                                f"created), or unset it for {REPO_ROOT / '.services'}")
        networks = login_networks(host)  # a host that is not this machine's: one line, before anything starts
        ensure_postgres_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            self.root.chmod(0o755)  # the postgres user must reach the cluster folder inside
        state = self.state()
        state.setdefault("password", secrets.token_urlsafe(18))
        state.setdefault("mlflow_password", secrets.token_urlsafe(18))  # the tracking server's admin
        state.setdefault("flask_secret", secrets.token_urlsafe(32))
        running_on = state.get("host", "127.0.0.1")
        if (self.postgres_running() or self.server_pid() is not None) and host != running_on:
            raise ServicesError(f"the services already run on {running_on}. Fix: make services-stop first, then "
                                f"start them on {host}.")
        for running, asked, key in ((self.postgres_running(), pg_port, "pg_port"),
                                    (self.server_pid() is not None, mlflow_port, "mlflow_port")):
            if running and asked and asked != state.get(key):
                raise ServicesError(f"the services already run ({key.replace('_', ' ')} {state.get(key)}). "
                                    f"Fix: make services-stop first, then start them on the new port.")
        if pg_port or not self.postgres_running():
            state["pg_port"] = pg_port or state.get("pg_port") or free_port(DEFAULT_PG_PORT, host)
        if mlflow_port or not self.server_pid():
            state["mlflow_port"] = mlflow_port or state.get("mlflow_port") or free_port(DEFAULT_MLFLOW_PORT, host)
        state["host"], state["logins_from"] = host, networks
        self.save_state(state)
        self.start_postgres(state, host)
        self.start_server(state, host)
        write_private(self.storage_url_file, self.database_url("optuna", state))
        _create_optuna_tables(self.database_url("optuna", state))
        return self.state()

    def stop(self) -> None:
        self.stop_server()
        self.stop_postgres()

    def status(self) -> list[str]:
        state = self.state()
        if not state:
            return [f"no services in {self.root} (make services starts them)"]
        postgres = "running" if self.postgres_running() else "stopped"
        server = "running" if self.server_pid() and self.server_healthy(state) else "stopped"
        login = f", login {MLFLOW_ADMIN} (password in {self.mlflow_password_file})" if "mlflow_password" in state else ""
        host = state.get("host", "127.0.0.1")
        bound = host_in_url(host) + (" (every address of this machine)" if host in EVERY_ADDRESS else "")
        networks = state.get("logins_from") or []
        logins = f"; password logins from {', '.join(networks)}" if networks else ""
        return [f"PostgreSQL on {bound}:{state['pg_port']}{logins}: {postgres} (data in {self.pgdata})",
                f"MLflow tracking server on http://{bound}:{state['mlflow_port']}{login}: {server} "
                f"(log {self.root / 'mlflow.log'})"]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read, from its first byte (it holds a password)."""
    write_whole(path, text)


def write_whole(path: Path, text: str, *, like: Path | None = None) -> None:
    """Replace ``path`` with a file holding ``text``, whole or not at all: written to a temporary file
    beside it (created readable by its owner only) and renamed over it, so a kill mid-write leaves the
    old file. ``like`` gives the new file that file's owner and mode (pg_hba.conf stays the postgres
    user's); without it the file is private to us."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename makes it the file
        if like is not None:
            kept = like.stat()
            os.chown(temporary, kept.st_uid, kept.st_gid)
            os.chmod(temporary, kept.st_mode & 0o7777)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _process_ids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _create_optuna_tables(url: str) -> None:
    """Optuna creates its tables on first use; two sessions starting at once on a new database would
    race to do it. Do it here, once."""
    from pipeline.stores import open_storage

    open_storage(url).engine.dispose()


def postgres_bin_dir() -> Path | None:
    """Debian keeps PostgreSQL's programs off PATH, in /usr/lib/postgresql/<version>/bin."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if versions:
        return versions[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def ensure_postgres_installed() -> None:
    if postgres_bin_dir() is not None:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ServicesError("PostgreSQL is not installed. Fix: sudo apt-get install postgresql (Debian/Ubuntu), "
                            "then make services again.")
    print("installing Debian's postgresql (apt-get)...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "install", "-y", "-q", "postgresql"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "postgresql"]):
        if subprocess.run(command, env=env, capture_output=True).returncode == 0 and postgres_bin_dir():
            return
    raise ServicesError("apt-get could not install postgresql. Fix: apt-get update && apt-get install postgresql")


def _run_as_postgres(command: list[str], *, check: bool = True) -> subprocess.CompletedProcess:
    """initdb and postgres refuse to run as root: under root, run them as the `postgres` user."""
    as_postgres = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
    result = subprocess.run(command, capture_output=True, text=True, cwd="/", **as_postgres)
    if check and result.returncode != 0:
        name = Path(command[0]).name
        raise ServicesError(f"{name} failed: {(result.stderr or result.stdout).strip()[-800:]}")
    return result
