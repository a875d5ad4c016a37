"""Named TOML files (study files, recipes): `<name>` -> `<folder>/<name>.toml`, read with one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def named_path(name_or_path: str | Path, folder: Path) -> Path:
    """`name` -> folder/name.toml; a path (with a folder or a .toml suffix) is taken as given."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.parent != Path("."):
        return candidate
    return folder / f"{candidate}.toml"


def names_in(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.toml"))


def read_toml(path: Path, error: type[PipelineError], example: str) -> dict[str, Any]:
    """The file's TOML document; a file that is not TOML raises ``error`` naming it (``example``: what
    such a file looks like, e.g. "a recipe is TOML, e.g. recipes/fast-cnn.toml")."""
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as decode_error:
        raise error(f"{path}: not valid TOML: {decode_error}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a text file ({example})") from None
