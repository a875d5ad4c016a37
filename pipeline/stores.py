"""Where studies and runs are stored: the embedded defaults, which setting wins, and opening them.

Precedence, for both stores: the command-line flag, then the environment variable, then the
embedded default (files under studies/ and mlruns/). The Makefile passes a flag only when the
user set a make variable, so this module is the one place the defaults live.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from pipeline.attrs import is_final_run
from pipeline.errors import PipelineError, first_line
from pipeline.paths import MLRUNS_DIR, STUDIES_DIR

STORAGE_ENV = "OPTUNA_STORAGE"
DEFAULT_STORAGE = f"sqlite:///{STUDIES_DIR / 'optuna.db'}"  # one file: the dashboard shows every study
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_TRACKING_URI = f"sqlite:///{MLRUNS_DIR / 'mlflow.db'}"
HEARTBEAT_ENV = "OPTUNA_HEARTBEAT_SECONDS"
HEARTBEAT_SECONDS = 10  # a RUNNING trial whose worker stops beating for 3 intervals is failed and retried
CONNECT_TIMEOUT_SECONDS = 5  # a database host that does not answer is reported, not waited on for minutes
SERVER_PROBE_SECONDS = 5  # how long to wait for a tracking server before saying it is not there
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
# scheme://user:PASSWORD@ - a password may hold a / (so not "up to the first /"), never a bare @
# (URLs write it %40), so it ends at the first @.
URL_PASSWORD = re.compile(r"^([a-z][a-z0-9+.-]*://[^/:@]*):([^@]*)@", flags=re.IGNORECASE)


def storage_url(requested: str | None = None) -> str:
    """The Optuna storage: --storage, else $OPTUNA_STORAGE, else the SQLite file under studies/."""
    return requested or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def tracking_uri() -> str:
    """The MLflow store: $MLFLOW_TRACKING_URI (an `mlflow server`, say), else the SQLite file under mlruns/."""
    return os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for anything printed or logged: the one after
    `user:` (up to the @ before the host; a password may hold a /) and a `password=` query."""
    url = URL_PASSWORD.sub(r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url, flags=re.IGNORECASE)


def heartbeat_seconds() -> int:
    """Seconds between a running trial's heartbeats ($OPTUNA_HEARTBEAT_SECONDS, default 10); a trial
    silent for three of them counts as stale. The tests shorten it to kill workers quickly."""
    value = os.environ.get(HEARTBEAT_ENV) or str(HEARTBEAT_SECONDS)
    if not value.strip().isdigit() or int(value) < 1:
        raise StorageError(f"{HEARTBEAT_ENV}={value!r}: it must be a whole number of seconds, at least 1. "
                           f"Fix: unset it (default {HEARTBEAT_SECONDS})")
    return int(value)


def open_storage(url: str, *, on_stale_trial=None, must_exist: bool = False):
    """An Optuna RDB storage (SQLite, PostgreSQL, MySQL) with heartbeats, or a journal file for a path.

    A trial whose worker stopped beating (killed, machine lost) is failed by the next worker that
    asks for a trial and re-queued by Optuna's RetryHeartbeatStaleTrialCallback; ``on_stale_trial``
    (study, trial) runs after that, to mark the trial's MLflow run. A database that cannot be
    reached, or refuses the password, is one StorageError naming it (password masked) and the fix.
    With ``must_exist`` (commands that only read studies), a storage file that is not there is an
    error instead of a new empty one.
    """

    file = _storage_file(url)
    if must_exist and file is not None and not file.exists():
        raise StorageError(f"no Optuna storage at {file}: nothing has been tuned there yet. Fix: run `make tune` "
                           f"first, or correct STORAGE / OPTUNA_STORAGE (the default is {DEFAULT_STORAGE}).")
    if "://" not in url:
        return _journal_storage(Path(url))
    if file is not None:
        _check_sqlite_file(file, url)
    if url.startswith("sqlite"):
        # timeout: wait for a busy writer, not "database is locked". isolation_level None hands
        # transactions to SQLAlchemy, so that _serialize_sqlite can begin each one IMMEDIATE.
        engine_kwargs = {"connect_args": {"timeout": 60, "isolation_level": None}}
    else:
        # pre-ping: a connection the server dropped (idle timeout, restart) is replaced, not used and failed.
        engine_kwargs = {"pool_pre_ping": True}
        if url.startswith("postgresql"):
            # TCP keepalives: a query on a connection whose network went away fails in about a
            # minute instead of hanging for the kernel's default of hours.
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, "keepalives": 1,
                                             "keepalives_idle": 20, "keepalives_interval": 10, "keepalives_count": 3}
    import sqlalchemy.exc

    try:
        for attempt in range(CREATION_RACE_ATTEMPTS):
            try:
                return _rdb_storage(url, engine_kwargs, on_stale_trial)
            except sqlalchemy.exc.DBAPIError as error:
                # Two sessions opened a new database at once and raced to create Optuna's tables; the
                # other one is creating them, so they are there once it has finished.
                if not _lost_creation_race(error) or attempt == CREATION_RACE_ATTEMPTS - 1:
                    raise
                time.sleep(1)
    except ImportError:  # SQLAlchemy found no driver for the URL's database
        raise StorageError(f"no database driver installed for {redact(url)}. Fix: `make install` (it installs "
                           f"psycopg 3 for PostgreSQL); for another database install its SQLAlchemy driver "
                           f"into .venv, or use the default SQLite storage (unset STORAGE / OPTUNA_STORAGE).") from None
    except sqlalchemy.exc.ArgumentError:  # an unknown scheme, or a URL SQLAlchemy cannot parse
        raise StorageError(f"{redact(url)} is not a storage URL Optuna can open. Fix: use sqlite:///path.db, "
                           f"postgresql://user:password@host:port/db, or a journal file path (no ://).") from None
    except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.DatabaseError) as error:
        # refused, timed out, wrong password, no such database, no right to create Optuna's tables
        reason = database_problem(url, error)
        raise StorageError(f"cannot open the Optuna storage {redact(url)}: {reason}. Fix: "
                           f"{_storage_fix(reason, url)}") from None


CREATION_RACE_ATTEMPTS = 5


def _lost_creation_race(error) -> bool:
    """Another session created one of Optuna's tables between this one's look and its CREATE TABLE.
    PostgreSQL says so as a duplicate key (its catalogue of types) or "relation ... already exists",
    SQLite as "table studies already exists"; a refused password or a missing right is no race."""
    import sqlalchemy.exc

    return isinstance(error, sqlalchemy.exc.IntegrityError) or "already exists" in str(error.orig)


def close_storage(storage) -> None:
    """Give back an RDB storage's database connections (its engine's pool: file handles on SQLite,
    connection slots on a PostgreSQL server); a journal file's storage holds none."""
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


@contextmanager
def opened_storage(url: str, **options):
    """``open_storage(url, **options)`` for the length of a block, closed after it."""
    storage = open_storage(url, **options)
    try:
        yield storage
    finally:
        close_storage(storage)


def _storage_file(url: str) -> Path | None:
    """The file a SQLite URL or a journal path names; None for a database server."""
    if "://" not in url:
        return Path(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        return Path(url.removeprefix("sqlite:///"))
    return None


def _is_sqlite(file: Path) -> bool:
    """Whether ``file`` begins as an SQLite database does (16 bytes read: a store may be GBs)."""
    with file.open("rb") as opened:
        return opened.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def _not_a_database(file: Path) -> bool:
    """A non-empty file that is not an SQLite database (an empty or missing one becomes a new database)."""
    return file.is_file() and file.stat().st_size > 0 and not _is_sqlite(file)


def _check_sqlite_file(file: Path, url: str) -> None:
    if file.is_dir():
        raise StorageError(f"{url} names a folder, not a database file. Fix: sqlite:///{file}/optuna.db, say.")
    if not file.parent.is_dir():
        raise StorageError(f"{url}: the folder {file.parent} does not exist. Fix: create it, or name a .db file "
                           f"in a folder that exists.")
    if _not_a_database(file):
        raise StorageError(f"{url}: {file} is not an SQLite database. Fix: name a new .db file, or the right one.")


def _journal_storage(path: Path):
    """Optuna's journal file storage, after the checks that its own errors would leave as tracebacks."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if path.is_dir():
        raise StorageError(f"{path} is a folder; a journal storage is a file (a path without :// names one). Fix: "
                           f"{path}/optuna.journal, say, or sqlite:///{path}/optuna.db.")
    if not path.parent.is_dir():
        raise StorageError(f"the folder of the journal file {path} does not exist. Fix: create {path.parent}, or "
                           f"name a file in a folder that exists.")
    if path.is_file() and _is_sqlite(path):
        raise StorageError(f"{path} is an SQLite database, but a path without :// names a journal file. Fix: "
                           f"--storage sqlite:///{path.resolve()}")
    if path.exists() and not _is_journal(path):
        raise StorageError(f"{path} is not an Optuna journal file (it does not hold Optuna's JSON log lines). "
                           f"Fix: name another file, or sqlite:///path.db.")
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _is_journal(path: Path) -> bool:
    """Empty, or its first line is one of Optuna's journal records (Optuna skips lines it cannot parse,
    then appends its own: it would write into any text file)."""
    with path.open("rb") as file:
        first = file.readline()
    if not first:
        return True
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and "op_code" in record


def _storage_fix(reason: str, url: str = "") -> str:
    if _no_way_there(reason):
        return _route_fix(url_host(url), "the host in STORAGE / OPTUNA_STORAGE") + "."
    if "no pg_hba.conf entry" in reason:
        return ("the database takes no logins from this machine's network: on its machine, start the services "
                "with --host on an address of this machine's network (make services HOST=<address>), or add a "
                "`host all all <network> scram-sha-256` line to its pg_hba.conf.")
    if "password" in reason or "authentication" in reason:
        return "correct the user and password in STORAGE / OPTUNA_STORAGE."
    if "does not exist" in reason:
        return "create the database (createdb NAME), or name one that exists."
    if "unable to open database file" in reason:
        return "check that the folder of the .db file exists and can be written."
    if "permission denied" in reason:
        return "let the user create tables in the database (GRANT CREATE ON SCHEMA public TO user), or use its owner."
    return ("start the database, or correct the host and port (`make services` starts a local PostgreSQL; "
            "unset STORAGE / OPTUNA_STORAGE for the SQLite file under studies/).")


def _no_way_there(reason: str) -> bool:
    """The network cannot carry a connection to the host (no route, or nothing answers before the
    timeout): the server may be fine; the fix is on the way to it."""
    return any(words in reason.lower() for words in ("network is unreachable", "no route to host", "timeout expired",
                                                     "timed out"))


def _route_fix(host: str, setting: str) -> str:
    return f"check that this machine reaches {host} (`ip route get {host}`: a route, no firewall in between), or " \
           f"correct {setting}"


def url_host(url: str) -> str:
    """The host a URL names (without user, password or port); the URL itself when it names none."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).hostname or url
    except ValueError:
        return url


def database_problem(url: str, error: Exception) -> str:
    """What the database driver said, in one line, without the URL's password."""
    return _hide_password(url, first_line(getattr(error, "orig", None) or error))


def _hide_password(url: str, text: str) -> str:
    match = URL_PASSWORD.match(url)
    return text.replace(match.group(2), "***") if match and match.group(2) else text


class StorageError(PipelineError):
    """The Optuna storage cannot be opened; the message names it (password masked) and the fix."""


# Storages whose tables this process has already checked against its Optuna: a check re-reads Optuna's
# migration scripts (about 25 ms), and a session reopens one storage per worker and per reconnect.
_SCHEMAS_CHECKED: set[str] = set()


def _rdb_storage(url: str, engine_kwargs: dict, on_stale_trial):
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    from pipeline.heartbeats import PatientHeartbeatStorage

    interval = heartbeat_seconds()
    with warnings.catch_warnings():
        # Heartbeats are marked experimental, but are Optuna's documented way to recover killed workers' trials.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=2)

        def stale_trial(study, trial):
            # A final-phase run is not retried as it was: the copy would train, mid-search, for the
            # epochs its killed session's time allowed. The next final phase plans its own.
            if not is_final_run(trial):
                retry(study, trial)
            if on_stale_trial is not None:
                on_stale_trial(study, trial)

        storage = PatientHeartbeatStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=interval,
            grace_period=3 * interval,
            heartbeat_stale_trial_callback=stale_trial,
            skip_compatibility_check=url in _SCHEMAS_CHECKED,
        )
    _SCHEMAS_CHECKED.add(url)
    if url.startswith("sqlite"):
        _serialize_sqlite(storage.engine)
    return storage


def _serialize_sqlite(engine) -> None:
    """Begin every transaction IMMEDIATE (SQLAlchemy's recipe for SQLite). Optuna takes a queued
    trial by reading it as WAITING and then setting it RUNNING, with a row lock that SQLite does
    not have: two workers could both read WAITING before either wrote, and both run the same trial
    (seen with two Ctrl-C re-queued trials and WORKERS=2). IMMEDIATE takes the write lock at the
    read, so the second worker waits, then sees RUNNING and takes the next one."""
    import sqlalchemy

    @sqlalchemy.event.listens_for(engine, "begin")
    def begin_immediate(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class TrackingStoreError(PipelineError):
    """$MLFLOW_TRACKING_URI names a store MLflow cannot use, or a server that does not answer; the
    message gives the fix."""


def configure_mlflow() -> str:
    """Point MLflow at tracking_uri(), telemetry off (the machines this runs on are often offline).
    Called by the CLI and by each worker process, never at import. Returns the URI."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # a server's run links, per call
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines between our progress lines
    uri = check_tracking_store()
    if uri == DEFAULT_TRACKING_URI:
        MLRUNS_DIR.mkdir(exist_ok=True)
    if is_server(uri):
        check_tracking_server(uri)
    elif _storage_file(uri) is not None:
        _open_sqlite_tracking_store(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _open_sqlite_tracking_store(uri: str) -> None:
    """Open the SQLite store once while holding a lock file beside it. MLflow creates its tables and
    runs its migrations on the first use of a new store, with no lock of its own: two sessions starting
    at once on a fresh clone raced to do it ("table experiments already exists", "duplicate column
    name"), and one died. The second now waits, then finds the tables made. (A tracking server creates
    them once, when it starts; Optuna's tables are handled in open_storage.)"""
    import fcntl

    import mlflow

    file = _storage_file(uri)
    file.parent.mkdir(parents=True, exist_ok=True)  # MLflow makes a new store's folder: the lock file goes there first
    with open(file.with_name(file.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def check_tracking_store() -> str:
    """tracking_uri(), if it is a store this project can use (cheap: no MLflow import), else one
    TrackingStoreError. A file path would be MLflow's file store, which MLflow 3 keeps in maintenance
    mode and which has no model registry; a SQLite URL must name a database file (its folder MLflow
    creates)."""
    uri = tracking_uri()
    if "://" not in uri or uri.startswith("file:"):
        raise TrackingStoreError(f"{TRACKING_ENV}={redact(uri)} is a file path; this project tracks in a database "
                                 f"or a server. Fix: sqlite:///path/mlflow.db or http://host:port (unset it for "
                                 f"{DEFAULT_TRACKING_URI}).")
    file = _storage_file(uri)
    if file is not None and (file.is_dir() or _not_a_database(file)):
        what = "a folder" if file.is_dir() else "not an SQLite database"
        raise TrackingStoreError(f"{TRACKING_ENV}={uri}: {file} is {what}. Fix: name an MLflow database file "
                                 f"(sqlite:///path/mlflow.db), or unset it for {DEFAULT_TRACKING_URI}.")
    return uri


def check_tracking_server(uri: str, timeout: float = SERVER_PROBE_SECONDS) -> None:
    """Fail in seconds when the tracking server is down. MLflow's REST client retries a refused
    connection with backoff for about four minutes before it gives up: right for a blip in a long
    study, wrong for a typo in the URI. Any HTTP answer counts as there, except MLflow 3 refusing the
    Host header the URI makes clients send (403 on every API call) and a server that asks for a login
    it was not given (401: MLflow's client would raise it deep in the first call)."""
    from pipeline.network import LOGIN_ENV, api_refusal, asks_for_login, health_answer, refuses_host_header

    try:
        health_answer(uri, timeout)
    except (OSError, ValueError) as error:  # refused, DNS, timeout, a malformed URI
        reason = getattr(error, "reason", error)
        if _no_way_there(str(reason)):
            host = url_host(uri)
            raise TrackingStoreError(
                f"cannot reach the MLflow tracking server at {redact(uri)} ({reason}). Fix: "
                f"{_route_fix(host, TRACKING_ENV)}.") from None
        raise TrackingStoreError(
            f"cannot reach the MLflow tracking server at {redact(uri)} ({reason}). Fix: start it (`mlflow server "
            f"--backend-store-uri ...`), or unset {TRACKING_ENV} to use the local store under mlruns/."
        ) from None
    refusal = api_refusal(uri, timeout)
    if asks_for_login(refusal):
        given = all(os.environ.get(name) for name in LOGIN_ENV)
        raise TrackingStoreError(
            f"the MLflow tracking server at {redact(uri)} asks for a login, and "
            f"{'refused the one in' if given else 'none is set in'} {' / '.join(LOGIN_ENV)} (401). Fix: export "
            f"both as `make services` prints them (user admin; the password in .services/mlflow-password on its "
            f"machine), or the login its admin gave you.")
    if refuses_host_header(refusal):
        host = url_host(uri)
        raise TrackingStoreError(
            f"the MLflow tracking server at {redact(uri)} refuses requests addressed to {host} (403: MLflow 3 "
            f"accepts only the Host headers of its --allowed-hosts). Fix: start it with "
            f"MLFLOW_SERVER_ALLOWED_HOSTS={host},{host}:* (make services HOST={host} allows its address), or "
            f"address it by a name it allows.")
