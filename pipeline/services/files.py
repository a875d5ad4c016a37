"""The services' folder (.services/ by default): where each file lives, services.json (ports,
passwords, the server's process id), and writes that are whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.paths import REPO_ROOT

SERVICES_DIR_ENV = "SERVICES_DIR"


class ServicesError(PipelineError):
    """A service cannot start or be found; the message names it and the fix."""


def services_dir() -> Path:
    return Path(os.environ.get(SERVICES_DIR_ENV) or REPO_ROOT / ".services").resolve()


@dataclass(frozen=True)
class ServicesFolder:
    """Every file of one services folder, and its state."""

    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "postgres"

    @property
    def postgres_log(self) -> Path:
        return self.root / "postgres.log"

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

    @property
    def server_log(self) -> Path:
        return self.root / "mlflow.log"

    def state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}

    def save_state(self, state: dict) -> None:
        write_private(self.state_file, json.dumps(state, indent=2))  # it holds the passwords


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
