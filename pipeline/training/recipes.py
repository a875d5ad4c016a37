"""Recipes: `recipes/<name>.toml`, a named training configuration (`train --recipe fast-cnn`).

A recipe is settings, not code: TrainConfig fields at the top level of a TOML file, plus an
optional `description`. `train --recipe` starts from it (--set, --model and --epochs change it for
one run), and a study file's `recipe = "<name>"` takes it as the study's fixed settings and as a
trial tried first (after a warm start's), so a search starts from the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.training.config import ConfigError, TrainConfig
from pipeline.errors import PipelineError
from pipeline.paths import RECIPES_DIR
from pipeline.toml_files import named_path, names_in, read_toml


class RecipeError(PipelineError):
    """A recipe file is missing or invalid; the message names the file and the key."""


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    settings: dict[str, Any]  # TrainConfig fields, as coerced by TrainConfig

    def config(self) -> TrainConfig:
        return TrainConfig().replace(**self.settings)


def recipe_path(name_or_path: str | Path) -> Path:
    """`fast-cnn` -> recipes/fast-cnn.toml; a path (with a folder or a .toml suffix) is taken as given."""
    return named_path(name_or_path, RECIPES_DIR)


def available_recipes() -> list[str]:
    return names_in(RECIPES_DIR)


def load_recipe(name_or_path: str | Path) -> Recipe:
    path = recipe_path(name_or_path)
    if not path.is_file():
        known = ", ".join(available_recipes()) or "none"
        raise RecipeError(f"{path}: no such recipe file (recipes in {RECIPES_DIR}: {known})")
    document = read_toml(path, RecipeError, "a recipe is TOML, e.g. recipes/fast-cnn.toml")
    description = document.pop("description", "")
    if not isinstance(description, str):
        raise RecipeError(f"{path}: description: must be a string")
    tables = sorted(key for key, value in document.items() if isinstance(value, dict))
    if tables:
        raise RecipeError(f"{path}: [{tables[0]}]: a recipe has no tables; write its settings at the top level, "
                          f"e.g. lr = 0.003")
    try:
        config = TrainConfig().replace(**document)
    except ConfigError as error:
        raise RecipeError(f"{path}: {error}") from None
    return Recipe(name=path.stem, path=path, description=description,
                  settings={key: getattr(config, key) for key in document})
