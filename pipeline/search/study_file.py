"""Study files: `studies/<name>.toml` -> a validated StudySpec (search space, sampler, pruner, budget).

A study file holds fixed TrainConfig settings, the search space over TrainConfig fields (space.py),
the sampler and pruner with their settings, the default budget, and optionally configurations to
try first, an earlier study to start from and a final phase. Loading checks everything and reports
a bad file with its path, the key and what is allowed; the sampler and pruner are built once at
load time so that their settings are checked by Optuna itself.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from pipeline.training.config import ConfigError, TrainConfig, fields_unused_by
from pipeline.errors import PipelineError
from pipeline.paths import STUDIES_DIR
from pipeline.training.recipes import Recipe, RecipeError, load_recipe
from pipeline import attrs
from pipeline.search.space import Param, is_int, is_number, parse_param
from pipeline.toml_files import named_path, names_in, read_toml

SAMPLERS = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "gp": optuna.samplers.GPSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
    "qmc": optuna.samplers.QMCSampler,
}
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "none": optuna.pruners.NopPruner,
}
OBJECTIVES = {"val_accuracy": "maximize"}  # the best epoch's validation accuracy
TOP_LEVEL_KEYS = {"description", "objective", "trials", "timeout", "recipe", "fixed", "search", "sampler", "pruner",
                  "enqueue", "warm_start", "final"}
SEARCH_PHASE, FINAL_PHASE = 0, 1
FIRST_STREAM = (SEARCH_PHASE, 0)  # a worker's first opening of the study in the search phase


class StudyFileError(PipelineError):
    """A study file is missing or invalid; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class WarmStart:
    """`[warm_start]`: a new study first runs the `best` best configurations of this earlier study
    (in the same storage) that fit its space."""

    study: str
    best: int = 3


@dataclass(frozen=True)
class FinalPhase:
    """`[final]`: after the search, the best trial's configuration trained longer, within `seconds`
    of the session's timeout, for as many epochs as fit (at most `max_epochs`); it becomes the
    candidate for promotion only if it validates better."""

    seconds: float
    max_epochs: int = 100


@dataclass(frozen=True)
class StudySpec:
    name: str
    path: Path
    description: str
    fixed: dict[str, Any]
    space: tuple[Param, ...]
    sampler: dict[str, Any]  # {"name": ..., **settings}
    pruner: dict[str, Any]
    trials: int
    timeout: float | None  # seconds per session; None: no limit
    objective: str = "val_accuracy"
    enqueue: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    warm_start: WarmStart | None = None
    final: FinalPhase | None = None
    recipe: str | None = None  # the recipe the fixed settings and the first configuration tried come from
    baseline_of: str | None = None  # a baseline (`make baseline`): the study whose default it trains once

    @property
    def kind(self) -> str:
        return "baseline" if self.baseline_of else "search"

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective]

    @property
    def max_epochs(self) -> int:
        return self.base_config().epochs

    def base_config(self) -> TrainConfig:
        return TrainConfig().replace(**self.fixed)

    def config_for(self, trial: optuna.Trial) -> TrainConfig:
        """The trial's configuration: the fixed settings plus one sampled value per searched field
        (and, for a final-phase trial, the epochs it was queued with)."""
        config = self.base_config().replace(**{p.name: p.suggest(trial) for p in self.space})
        if attrs.FINAL_EPOCHS in trial.user_attrs:
            config = config.replace(epochs=trial.user_attrs[attrs.FINAL_EPOCHS])
        return config

    def fits(self, params: dict[str, Any]) -> bool:
        return all(p.fits(params) for p in self.space)

    def in_space(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` without those this study does not search (another study's, for a warm start)."""
        names = {name for p in self.space for name in p.names_in(params)}
        return {k: v for k, v in params.items() if k in names}

    def with_settings(self, settings: dict[str, Any]) -> StudySpec:
        """The same study with some fixed settings changed (``--set epochs=2`` on `tune`): how the
        smoke run and the tests shrink a shipped study. A searched field cannot be set."""
        if not settings:
            return self
        searched = sorted(set(settings) & {p.name for p in self.space})
        if searched:
            raise ConfigError(f"{searched[0]!r} is searched by study {self.name}, so it cannot be set; "
                              f"set only fixed fields")
        fixed = {**self.fixed, **settings}
        base = TrainConfig().replace(**fixed)  # unknown keys and bad values fail here, named
        changed = replace(self, fixed={k: getattr(base, k) for k in fixed})
        unused = changed.searched_but_unused()
        if unused:
            name, family = unused[0]
            raise ConfigError(f"--set model={base.model} contradicts study {self.name}: it searches {name!r}, which "
                              f"only the {family} family reads. Fix: pick a study of the {base.model} family "
                              f"(e.g. --study {base.model}), or leave model as the study file sets it")
        return changed

    def searched_but_unused(self) -> list[tuple[str, str]]:
        """Searched fields that the study's fixed model family ignores, each with the family that reads
        them; none when the family itself is searched."""
        names = {p.name for p in self.space}
        if "model" in names:
            return []
        unused = fields_unused_by(self.base_config().model)
        return [(name, unused[name]) for name in sorted(names) if name in unused]

    def with_seed(self, seed: int | None) -> StudySpec:
        """The same study with another sampler seed (`make tune SEED=1`), as its own study, named
        `<name>-seed<seed>`, so that seeds sit side by side in `make compare`. The file's own seed (or
        none given) is the study itself. Training seeds stay as the file sets them: every seed's
        enqueued default trains alike, so each search is measured against the same point."""
        if seed is None or seed == self.sampler.get("seed"):
            return self
        if not 0 <= seed < 2 ** 32:  # numpy's range
            raise ConfigError(f"--seed (SEED) must be an integer from 0 to {2 ** 32 - 1}, got {seed}")
        return replace(self, name=f"{self.name}-seed{seed}", sampler={**self.sampler, "seed": seed})

    def pruning_rungs(self) -> list[int]:
        """The epochs at which the pruner first compares trials, from its settings: successive halving's
        rungs (min_resource * reduction_factor ** k, below the last epoch; Hyperband's brackets share
        them), or the first epoch the median pruner may prune at; none for no pruner, or a min_resource
        left to Optuna ("auto")."""
        name, settings, last = self.pruner["name"], self.pruner, self.max_epochs
        if name in ("successive_halving", "hyperband"):
            low, factor = settings.get("min_resource", 1 if name == "hyperband" else "auto"), settings.get(
                "reduction_factor", 4 if name == "successive_halving" else 3)
            if not is_int(low):
                return []
            start = low * factor ** settings.get("min_early_stopping_rate", 0)
            return [r for r in (start * factor ** k for k in range(16)) if r < last]
        if name == "median":
            return [max(1, settings.get("n_warmup_steps", 0))]
        return []

    def make_sampler(self, worker: int = 0, session_seed: int | None = None,
                     stream: tuple[int, int] = FIRST_STREAM) -> optuna.samplers.BaseSampler:
        """The sampler of one worker of one session, seeded with ``worker_sampler_seed``. Without a
        session seed (a study opened outside a session: tests, the dashboard), the file's seed + worker."""
        settings = dict(self.sampler)
        if session_seed is not None:
            settings["seed"] = worker_sampler_seed(settings.get("seed"), session_seed, worker, stream)
        elif settings.get("seed") is not None:
            settings["seed"] += worker
        return SAMPLERS[settings.pop("name")](**settings)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        settings = dict(self.pruner)
        return PRUNERS[settings.pop("name")](**settings)


def new_session_seed() -> int:
    """A seed of the session's own, from the operating system's entropy: two sessions on one storage
    (one after the other, or at once on two machines) must not draw the same configurations, and
    nothing they share (the study's seed, its trial count) can tell them apart when they start at once."""
    return secrets.randbits(32)


def worker_sampler_seed(study_seed: int | None, session_seed: int, worker: int,
                        stream: tuple[int, int] = FIRST_STREAM) -> int:
    """The sampler seed of ``worker`` in a session: a function of the study's seed (its file's, or
    SEED=n), the session's seed and the worker, so that a session is replayed from the seed recorded
    on its MLflow run and on each of its trials (`tune --session-seed`).

    ``stream`` is (phase, opening): a worker that opens the study again, after a lost storage or for
    the final phase, gets a seed of its own; the same seed would draw its first configurations again."""
    entropy = [session_seed, worker] if study_seed is None else [study_seed, session_seed, worker]
    if stream != FIRST_STREAM:  # the first stream keeps the seeds that sessions recorded before streams
        entropy += list(stream)
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def study_path(name_or_path: str | Path) -> Path:
    """`mlp` -> studies/mlp.toml; a path is taken as given."""
    return named_path(name_or_path, STUDIES_DIR)


def available_studies() -> list[str]:
    return names_in(STUDIES_DIR)


def load_study(name_or_path: str | Path) -> StudySpec:
    path = study_path(name_or_path)
    if not path.is_file():
        known = ", ".join(available_studies()) or "none"
        raise StudyFileError(f"{path}: no such study file (studies here: {known})")
    document = read_toml(path, StudyFileError, "a study file is TOML, e.g. studies/mlp.toml")
    return parse_study(document, path)


def parse_study(document: dict[str, Any], path: Path) -> StudySpec:
    def fail(key: str, message: str) -> StudyFileError:
        return StudyFileError(f"{path}: {key}: {message}")

    unknown = sorted(set(document) - TOP_LEVEL_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key; allowed: {', '.join(sorted(TOP_LEVEL_KEYS))}")

    objective = document.get("objective", "val_accuracy")
    if objective not in OBJECTIVES:
        raise fail("objective", f"{objective!r} is not supported; allowed: {', '.join(OBJECTIVES)}")
    trials = document.get("trials", 20)
    if not is_int(trials) or trials < 1:
        raise fail("trials", f"{trials!r} must be a positive integer")
    timeout = document.get("timeout")
    if timeout is not None and (not is_number(timeout) or timeout <= 0):
        raise fail("timeout", f"{timeout!r} must be a positive number of seconds")

    fixed = _table(document, "fixed", fail)
    try:
        TrainConfig().replace(**fixed)
    except ConfigError as error:
        raise fail("fixed", str(error)) from None

    search = _table(document, "search", fail)
    if not search:
        raise fail("search", "the search space is empty; add at least one [search] entry")
    space = tuple(parse_param(name, spec, fail) for name, spec in search.items())
    overlap = sorted(set(fixed) & set(search))
    if overlap:
        raise fail(f"search.{overlap[0]}", "is both fixed and searched; keep one")

    recipe = _recipe(document, fail)
    enqueue = document.get("enqueue", [])
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise fail("enqueue", "must be a list of tables of searched values")
    # Each configuration to try first, with the name an error gives it.
    to_enqueue = [(f"enqueue[{i}]", values) for i, values in enumerate(enqueue)]
    if recipe is not None:
        # The recipe's settings are the study's fixed ones ([fixed] overrides them), and the values it
        # sets of the searched fields are tried before [[enqueue]]'s (the rest sampled): the search
        # starts from the recipe.
        fixed = {**{k: v for k, v in recipe.settings.items() if k not in search}, **fixed}
        recipe_trial = {name: _as_toml_value(value) for name, value in recipe.settings.items() if name in search}
        to_enqueue.insert(0, (f"recipe {recipe.name}'s", recipe_trial))

    sampler = _component(document, "sampler", SAMPLERS, "tpe", fail)
    pruner = _component(document, "pruner", PRUNERS, "median", fail)

    by_name = {p.name: p for p in space}
    enqueued = []
    for label, values in to_enqueue:
        missing = sorted(set(by_name) - set(values)) if label.startswith("enqueue") else []
        extra = sorted(set(values) - set(by_name))
        if missing or extra:
            raise fail(label, f"must give exactly the searched fields; missing {missing}, unknown {extra}")
        try:
            TrainConfig().replace(**fixed, **values)
        except ConfigError as error:
            raise fail(label, str(error)) from None
        params = {k: v for name, value in values.items() for k, v in by_name[name].as_params(value).items()}
        outside = [name for name in values if not by_name[name].fits(params)]
        if outside:
            separator = " " if label.startswith("recipe") else "."
            raise fail(f"{label}{separator}{outside[0]}",
                       f"{values[outside[0]]!r} is outside the search space of search.{outside[0]}")
        enqueued.append(params)

    warm_start = _optional_table(document, "warm_start", WarmStart, fail)
    if warm_start is not None:
        if not isinstance(warm_start.get("study"), str) or not warm_start["study"]:
            raise fail("warm_start.study", "must name an earlier study in the same storage, e.g. \"cnn\"")
        if warm_start["study"] == path.stem:
            raise fail("warm_start.study", "names this study itself; name an earlier one")
        warm_start = WarmStart(**warm_start)
        if not is_int(warm_start.best) or warm_start.best < 1:
            raise fail("warm_start.best", f"{warm_start.best!r} must be a positive integer")
    final = _optional_table(document, "final", FinalPhase, fail)
    if final is not None:
        if not is_number(final.get("seconds")) or final["seconds"] <= 0:
            raise fail("final.seconds", f"{final.get('seconds')!r} must be a positive number of seconds")
        final = FinalPhase(**final)
        if not is_int(final.max_epochs) or final.max_epochs < 1:
            raise fail("final.max_epochs", f"{final.max_epochs!r} must be a positive integer")

    spec = StudySpec(
        name=path.stem, path=path, description=document.get("description", ""), fixed=fixed, space=space,
        sampler=sampler, pruner=pruner, trials=trials, timeout=timeout, objective=objective,
        enqueue=tuple(enqueued), warm_start=warm_start, final=final, recipe=recipe.name if recipe else None,
    )
    for name, family in spec.searched_but_unused():
        raise fail(f"search.{name}", f"only the {family} family reads it, but this study fixes model = "
                                     f"{spec.base_config().model!r}; search model too, or drop {name}")
    for kind, make in (("sampler", spec.make_sampler), ("pruner", spec.make_pruner)):
        try:
            make()
        except (TypeError, ValueError) as error:
            raise fail(kind, f"bad setting for {getattr(spec, kind)['name']}: {error}") from None
    return spec


def _recipe(document: dict, fail) -> Recipe | None:
    name = document.get("recipe")
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise fail("recipe", f"{name!r} must name a recipe, e.g. \"fast-cnn\" (recipes/fast-cnn.toml)")
    try:
        return load_recipe(name)
    except RecipeError as error:
        raise fail("recipe", str(error)) from None


def _as_toml_value(value: Any) -> Any:
    """A config value as a study file would write it (tuples as lists)."""
    return list(value) if isinstance(value, tuple) else value


def _component(document: dict, kind: str, registry: dict, default: str, fail) -> dict[str, Any]:
    settings = dict(_table(document, kind, fail)) or {"name": default}
    name = settings.get("name", default)
    if name not in registry:
        raise fail(f"{kind}.name", f"{name!r} is not a known {kind}; allowed: {', '.join(registry)}")
    settings["name"] = name
    return settings


def _optional_table(document: dict, key: str, kind: type, fail) -> dict[str, Any] | None:
    """The table ``key``, if there, holding only the fields of the dataclass ``kind``."""
    if key not in document:
        return None
    allowed = {f.name for f in fields(kind)}
    settings = dict(_table(document, key, fail))
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise fail(f"{key}.{unknown[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    return settings


def _table(document: dict, key: str, fail) -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise fail(key, "must be a table")
    return value
