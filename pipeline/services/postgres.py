"""The services' PostgreSQL cluster (Debian's): made on first use in the services folder, its
password-login rules, its databases, started and stopped with pg_ctl. PostgreSQL refuses to run as
root, so under root it runs as the `postgres` user."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import first_line
from pipeline.services.addresses import client_address, host_in_url, login_networks
from pipeline.services.files import ServicesError, ServicesFolder, write_private, write_whole

DB_USER = "pipeline"
DATABASES = ("optuna", "mlflow", "mlflow_auth")  # the studies, the runs, the tracking server's users
# pg_hba.conf: the remote-login rules live between these lines, replaced whole on every start, so a
# cluster first started on loopback and later on a network takes that network's logins (and one moved
# back to loopback no longer does). Lines outside the block are the user's and are kept.
HBA_BEGIN = "# BEGIN make services: password logins from other machines (rewritten on every start; edit outside)"
HBA_END = "# END make services"
# What earlier versions appended at initdb for any non-loopback host (replaced by the block).
LEGACY_HBA_LINES = ("host all all 0.0.0.0/0 scram-sha-256", "host all all ::/0 scram-sha-256")


def database_url(database: str, state: dict) -> str:
    """The URL clients use (the bound address, or loopback when bound to every address)."""
    host = host_in_url(client_address(state.get("host", "127.0.0.1")))
    return f"postgresql://{DB_USER}:{state['password']}@{host}:{state['pg_port']}/{database}"


@dataclass(frozen=True)
class PostgresCluster:
    folder: ServicesFolder

    def pg(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run one of PostgreSQL's programs, as the `postgres` user when we are root."""
        return _run_as_postgres([str(postgres_bin_dir() / program), *args], check=check)

    def running(self) -> bool:
        pgdata = self.folder.pgdata
        return (pgdata / "PG_VERSION").exists() and self.pg("pg_ctl", "status", "-D", str(pgdata),
                                                            check=False).returncode == 0

    def start(self, state: dict, host: str) -> None:
        """Each step done only when missing, so that a start killed anywhere and run again completes:
        the cluster, the login rules, the server, the databases (also in a cluster already running)."""
        pgdata = self.folder.pgdata
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(state["password"])
        self.write_login_rules(login_networks(host))
        if self.running():
            self.pg("pg_ctl", "reload", "-D", str(pgdata))  # the rules as written now
        else:
            log = self.folder.postgres_log
            log.touch()
            if os.geteuid() == 0:
                shutil.chown(log, "postgres", "postgres")  # the server writes it as the postgres user
            options = f"-c listen_addresses={host} -p {state['pg_port']} -k {shlex.quote(str(pgdata))}"
            self.pg("pg_ctl", "start", "-D", str(pgdata), "-l", str(log), "-w", "-t", "60", "-o", options)
        self._create_databases(state)

    def _initdb(self, password: str) -> None:
        """A new cluster, made in a folder beside its place and renamed into it when whole: initdb killed
        half-way leaves only that folder, which the next start removes and makes again."""
        pgdata = self.folder.pgdata
        partial = pgdata.with_name(pgdata.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if pgdata.is_dir() and not any(pgdata.iterdir()):
            pgdata.rmdir()  # an empty folder left by an earlier version's start
        if pgdata.exists():
            raise ServicesError(f"{pgdata} holds no PostgreSQL cluster (no PG_VERSION) but is not empty. Fix: "
                                f"move it away (make services creates a new cluster there), or point SERVICES_DIR "
                                f"elsewhere")
        partial.mkdir(mode=0o700)
        password_file = self.folder.root / "initdb-password"
        write_private(password_file, password)
        try:
            if os.geteuid() == 0:
                for path in (partial, password_file):
                    shutil.chown(path, "postgres", "postgres")
                if _run_as_postgres(["test", "-w", str(partial)], check=False).returncode != 0:
                    raise ServicesError(f"the postgres user cannot reach {self.folder.root} (a parent folder is "
                                        f"private). Fix: SERVICES_DIR=/var/tmp/pipeline-services make services")
            # Local socket: trusted (the socket sits in the cluster's own folder); TCP: the password.
            self.pg("initdb", "-D", str(partial), "-U", DB_USER, f"--pwfile={password_file}",
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions")
        finally:
            password_file.unlink(missing_ok=True)
        os.replace(partial, pgdata)

    def write_login_rules(self, networks: list[str]) -> None:
        """Replace the marked block of pg_hba.conf with a password (scram-sha-256) rule per network;
        no block for loopback (initdb's own rules cover it). The file keeps its owner (postgres)."""
        hba = self.folder.pgdata / "pg_hba.conf"
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
            with psycopg.connect(database_url("postgres", state), autocommit=True) as connection:
                existing = {row[0] for row in connection.execute("SELECT datname FROM pg_database")}
                for database in DATABASES:
                    if database not in existing:
                        connection.execute(f'CREATE DATABASE "{database}"')  # whole or not at all
        except psycopg.OperationalError as error:  # e.g. a pg_hba.conf edited by hand that shuts us out
            raise ServicesError(f"PostgreSQL started but refuses us: {first_line(error)}. Fix: check "
                                f"{self.folder.pgdata / 'pg_hba.conf'} (lines outside the block make services "
                                f"writes), then make services-stop and make services again") from None

    def restart(self, pause: float = 0) -> None:
        """A fast restart with the options it was started with, ``pause`` seconds down (the tests'
        database fault)."""
        self.pg("pg_ctl", "stop", "-D", str(self.folder.pgdata), "-m", "fast", "-w")
        time.sleep(pause)
        self.start(self.folder.state(), self.folder.state().get("host", "127.0.0.1"))

    def stop(self) -> None:
        if self.running():
            self.pg("pg_ctl", "stop", "-D", str(self.folder.pgdata), "-m", "fast", "-w")


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
