"""Where studies and runs are stored: the embedded defaults, which setting wins, and opening them.

Precedence, for both stores: the command-line flag, then the environment variable, then the
embedded default (files under studies/ and mlruns/). The Makefile passes a flag only when the
user set a make variable, so this module is the one place the defaults live.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.request
import warnings

from pipeline.paths import MLRUNS_DIR, STUDIES_DIR

STORAGE_ENV = "OPTUNA_STORAGE"
DEFAULT_STORAGE = f"sqlite:///{STUDIES_DIR / 'optuna.db'}"  # one file: the dashboard shows every study
TRACKING_ENV = "MLFLOW_TRACKING_URI"
DEFAULT_TRACKING_URI = f"sqlite:///{MLRUNS_DIR / 'mlflow.db'}"
HEARTBEAT_SECONDS = 10  # a RUNNING trial whose worker stops beating for GRACE_SECONDS is failed and retried
GRACE_SECONDS = 30
SERVER_PROBE_SECONDS = 5  # how long to wait for a tracking server before saying it is not there


def storage_url(requested: str | None = None) -> str:
    """The Optuna storage: --storage, else $OPTUNA_STORAGE, else the SQLite file under studies/."""
    return requested or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def tracking_uri() -> str:
    """The MLflow store: $MLFLOW_TRACKING_URI (an `mlflow server`, say), else the SQLite file under mlruns/."""
    return os.environ.get(TRACKING_ENV) or DEFAULT_TRACKING_URI


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for anything printed or logged."""
    return re.sub(r"^([a-z][a-z0-9+.-]*://[^/:@]*):[^/@]*@", r"\1:***@", url, flags=re.IGNORECASE)


def open_storage(url: str):
    """An Optuna RDB storage (SQLite, PostgreSQL, MySQL) with heartbeats, or a journal file for a path."""
    import optuna

    if "://" not in url:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url))
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return _rdb_storage(url, engine_kwargs)
    except ImportError:  # SQLAlchemy found no driver for the URL's database
        raise StorageError(f"no database driver installed for {redact(url)}. Fix: install the driver into "
                           f".venv (PostgreSQL: .venv/bin/pip install psycopg2-binary), or use the default "
                           f"SQLite storage (unset STORAGE / OPTUNA_STORAGE).") from None


class StorageError(RuntimeError):
    """The Optuna storage cannot be opened; the message names it (password masked) and the fix."""


def _rdb_storage(url: str, engine_kwargs: dict):
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        # Heartbeats are marked experimental, but are Optuna's documented way to recover killed workers' trials.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,  # SQLite: wait for a busy writer instead of "database is locked"
            heartbeat_interval=HEARTBEAT_SECONDS,
            grace_period=GRACE_SECONDS,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
        )


class TrackingServerError(RuntimeError):
    """$MLFLOW_TRACKING_URI names a server that does not answer; the message gives the fix."""


def configure_mlflow() -> str:
    """Point MLflow at tracking_uri(), telemetry off (the machines this runs on are often offline).
    Called by the CLI and by each worker process, never at import. Returns the URI."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines between our progress lines
    uri = tracking_uri()
    if uri == DEFAULT_TRACKING_URI:
        MLRUNS_DIR.mkdir(exist_ok=True)
    if is_server(uri):
        check_tracking_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def check_tracking_server(uri: str, timeout: float = SERVER_PROBE_SECONDS) -> None:
    """Fail in seconds when the tracking server is down. MLflow's REST client retries a refused
    connection with backoff for about four minutes before it gives up: right for a blip in a long
    study, wrong for a typo in the URI. Any HTTP answer (even 401 from a proxy) counts as there."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as error:  # refused, DNS, timeout, a malformed URI
        reason = getattr(error, "reason", error)
        raise TrackingServerError(
            f"cannot reach the MLflow tracking server at {redact(uri)} ({reason}). Fix: start it (`mlflow server "
            f"--backend-store-uri ...`), or unset {TRACKING_ENV} to use the local store under mlruns/."
        ) from None
