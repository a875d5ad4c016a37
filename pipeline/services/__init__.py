"""`make services`: a throwaway PostgreSQL cluster and an MLflow tracking server, for studies shared
by several sessions or machines.

PostgreSQL (Debian's) holds three databases: `optuna` (the studies), `mlflow` (the tracking
server's backend store) and `mlflow_auth` (its logins). The tracking server proxies artifacts (`--artifacts-destination`), so
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

    files.py           the folder: where each file lives, services.json, writes whole or not at all
    addresses.py       which addresses the services bind, take logins from, accept and print
    postgres.py        PostgresCluster: initdb, pg_hba.conf's login rules, the databases, pg_ctl
    tracking_server.py TrackingServer: launched with the basic-auth app, found by its command line, stopped
    __init__.py        Services: start, stop and status of both (what `make services` runs)
"""


from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from pipeline.network import free_port
from pipeline.paths import REPO_ROOT
from pipeline.services.addresses import EVERY_ADDRESS, host_in_url, login_networks
from pipeline.services.files import SERVICES_DIR_ENV, ServicesError, ServicesFolder, services_dir, write_private
from pipeline.services.postgres import PostgresCluster, database_url, ensure_postgres_installed, postgres_bin_dir
from pipeline.services.tracking_server import MLFLOW_ADMIN, MLFLOW_SERVER_ENV, TrackingServer, tracking_uri

__all__ = ["DEFAULT_MLFLOW_PORT", "DEFAULT_PG_PORT", "MLFLOW_ADMIN", "MLFLOW_SERVER_ENV", "PostgresCluster",
           "Services", "ServicesError", "TrackingServer", "postgres_bin_dir", "services_dir"]

DEFAULT_PG_PORT, DEFAULT_MLFLOW_PORT = 55432, 5050  # taken when free, else a free port


@dataclass(frozen=True)
class Services(ServicesFolder):
    """The PostgreSQL cluster and the tracking server of one folder, started and stopped together."""

    @property
    def postgres(self) -> PostgresCluster:
        return PostgresCluster(self)

    @property
    def server(self) -> TrackingServer:
        return TrackingServer(self)

    def database_url(self, database: str, state: dict | None = None) -> str:
        return database_url(database, state or self.state())

    def tracking_uri(self, state: dict | None = None) -> str:
        return tracking_uri(state or self.state())

    def client_env(self, state: dict | None = None) -> dict[str, str]:
        """What a client's environment needs to use both services (the printed exports, resolved)."""
        state = state or self.state()
        return {"OPTUNA_STORAGE": database_url("optuna", state), "MLFLOW_TRACKING_URI": tracking_uri(state),
                "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN, "MLFLOW_TRACKING_PASSWORD": state["mlflow_password"]}

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
        postgres, server = self.postgres, self.server
        state = self.state()
        state.setdefault("password", secrets.token_urlsafe(18))
        state.setdefault("mlflow_password", secrets.token_urlsafe(18))  # the tracking server's admin
        state.setdefault("flask_secret", secrets.token_urlsafe(32))
        running_on = state.get("host", "127.0.0.1")
        if (postgres.running() or server.pid() is not None) and host != running_on:
            raise ServicesError(f"the services already run on {running_on}. Fix: make services-stop first, then "
                                f"start them on {host}.")
        for running, asked, key in ((postgres.running(), pg_port, "pg_port"),
                                    (server.pid() is not None, mlflow_port, "mlflow_port")):
            if running and asked and asked != state.get(key):
                raise ServicesError(f"the services already run ({key.replace('_', ' ')} {state.get(key)}). "
                                    f"Fix: make services-stop first, then start them on the new port.")
        if pg_port or not postgres.running():
            state["pg_port"] = pg_port or state.get("pg_port") or free_port(DEFAULT_PG_PORT, host)
        if mlflow_port or not server.pid():
            state["mlflow_port"] = mlflow_port or state.get("mlflow_port") or free_port(DEFAULT_MLFLOW_PORT, host)
        state["host"], state["logins_from"] = host, networks
        self.save_state(state)
        postgres.start(state, host)
        server.start(state, host)
        write_private(self.storage_url_file, database_url("optuna", state))
        _create_optuna_tables(database_url("optuna", state))
        return self.state()

    def stop(self) -> None:
        self.server.stop()
        self.postgres.stop()

    def status(self) -> list[str]:
        state = self.state()
        if not state:
            return [f"no services in {self.root} (make services starts them)"]
        postgres = "running" if self.postgres.running() else "stopped"
        server = "running" if self.server.pid() and self.server.healthy(state) else "stopped"
        login = f", login {MLFLOW_ADMIN} (password in {self.mlflow_password_file})" if "mlflow_password" in state else ""
        host = state.get("host", "127.0.0.1")
        bound = host_in_url(host) + (" (every address of this machine)" if host in EVERY_ADDRESS else "")
        networks = state.get("logins_from") or []
        logins = f"; password logins from {', '.join(networks)}" if networks else ""
        return [f"PostgreSQL on {bound}:{state['pg_port']}{logins}: {postgres} (data in {self.pgdata})",
                f"MLflow tracking server on http://{bound}:{state['mlflow_port']}{login}: {server} "
                f"(log {self.server_log})"]


def _create_optuna_tables(url: str) -> None:
    """Optuna creates its tables on first use; two sessions starting at once on a new database would
    race to do it. Do it here, once."""
    from pipeline.stores import open_storage

    open_storage(url).engine.dispose()
