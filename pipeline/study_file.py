"""Study files: `studies/<name>.toml` -> a validated StudySpec (search space, sampler, pruner, budget).

A study file holds fixed TrainConfig settings, the search space over TrainConfig fields, the
sampler and pruner with their settings, and the default budget. Loading checks everything and
reports a bad file with its path, the key and what is allowed; the sampler and pruner are built
once at load time so that their settings are checked by Optuna itself.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from pipeline.config import ConfigError, TrainConfig, field_names
from pipeline.paths import STUDIES_DIR

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
TOP_LEVEL_KEYS = {"description", "objective", "trials", "timeout", "fixed", "search", "sampler", "pruner", "enqueue",
                  "warm_start", "final"}
FINAL_KEYS = {"seconds", "max_epochs"}
WARM_START_KEYS = {"study", "best"}
PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
    "layers": {"type", "depth", "width", "log", "step"},
}


class StudyFileError(ValueError):
    """A study file is missing or invalid; the message names the file, the key and what is allowed."""


@dataclass(frozen=True)
class Param:
    """One searched TrainConfig field."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()
    depth: tuple[int, int] = (1, 1)  # layers: how many layers
    width: tuple[int, int] = (1, 1)  # layers: each layer's width

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        # layers: a depth, then one width per layer; Optuna records them as name_depth, name_1, ...
        depth = trial.suggest_int(f"{self.name}_depth", *self.depth)
        return tuple(trial.suggest_int(f"{self.name}_{i}", *self.width, log=self.log, step=self.step or 1)
                     for i in range(1, depth + 1))

    def names_in(self, params: dict[str, Any]) -> list[str]:
        """The Optuna parameter names in ``params`` that belong to this field."""
        return [k for k in params if k == self.name or (self.type == "layers" and k.startswith(f"{self.name}_"))]

    def fits(self, params: dict[str, Any]) -> bool:
        """Whether this field's values in ``params`` (recorded by another study, for a warm start) lie
        in its range; a field absent from them fits (Optuna samples it)."""
        if not self.names_in(params):
            return True
        if self.type == "categorical":
            return self.name in params and params[self.name] in self.choices
        if self.type != "layers":
            value = params.get(self.name)
            return isinstance(value, (int, float)) and self.low <= value <= self.high
        depth = params.get(f"{self.name}_depth")
        if not isinstance(depth, int) or not self.depth[0] <= depth <= self.depth[1]:
            return False
        widths = [params.get(f"{self.name}_{i}") for i in range(1, depth + 1)]
        step = self.step or 1
        return all(isinstance(w, int) and self.width[0] <= w <= self.width[1] and (w - self.width[0]) % step == 0
                   for w in widths)

    def as_params(self, value: Any) -> dict[str, Any]:
        """The Optuna parameters that ``value`` corresponds to (for enqueueing a known configuration)."""
        if self.type != "layers":
            return {self.name: value}
        return {f"{self.name}_depth": len(value), **{f"{self.name}_{i}": w for i, w in enumerate(value, 1)}}


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
    # A new study first runs the `best` best configurations of this earlier study that fit its space.
    warm_start: dict[str, Any] | None = None  # {"study": name, "best": n}
    # After the search: the best trial's configuration trained longer, within `seconds` of the session's
    # timeout, for as many epochs as fit (at most `max_epochs`); promoted only if it validates better.
    final: dict[str, Any] | None = None  # {"seconds": s, "max_epochs": n}

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
        if "final_epochs" in trial.user_attrs:
            config = config.replace(epochs=trial.user_attrs["final_epochs"])
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
        return replace(self, fixed={k: getattr(base, k) for k in fixed})

    def make_sampler(self, worker: int = 0) -> optuna.samplers.BaseSampler:
        """Parallel workers each get their own seed (seed + worker): with one seed they would sample alike."""
        settings = dict(self.sampler)
        if settings.get("seed") is not None:
            settings["seed"] += worker
        return SAMPLERS[settings.pop("name")](**settings)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        settings = dict(self.pruner)
        return PRUNERS[settings.pop("name")](**settings)


def study_path(name_or_path: str | Path) -> Path:
    """`mlp` -> studies/mlp.toml; a path is taken as given."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.parent != Path("."):
        return candidate
    return STUDIES_DIR / f"{candidate}.toml"


def available_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))


def load_study(name_or_path: str | Path) -> StudySpec:
    path = study_path(name_or_path)
    if not path.is_file():
        known = ", ".join(available_studies()) or "none"
        raise StudyFileError(f"{path}: no such study file (studies here: {known})")
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise StudyFileError(f"{path}: not valid TOML: {error}") from None
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
    if not _is_int(trials) or trials < 1:
        raise fail("trials", f"{trials!r} must be a positive integer")
    timeout = document.get("timeout")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        raise fail("timeout", f"{timeout!r} must be a positive number of seconds")

    fixed = _table(document, "fixed", fail)
    try:
        TrainConfig().replace(**fixed)
    except ConfigError as error:
        raise fail("fixed", str(error)) from None

    search = _table(document, "search", fail)
    if not search:
        raise fail("search", "the search space is empty; add at least one [search] entry")
    space = tuple(_parse_param(name, spec, fail) for name, spec in search.items())
    overlap = sorted(set(fixed) & set(search))
    if overlap:
        raise fail(f"search.{overlap[0]}", "is both fixed and searched; keep one")

    sampler = _component(document, "sampler", SAMPLERS, "tpe", fail)
    pruner = _component(document, "pruner", PRUNERS, "median", fail)

    enqueue = document.get("enqueue", [])
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise fail("enqueue", "must be a list of tables of searched values")
    by_name = {p.name: p for p in space}
    enqueued = []
    for i, values in enumerate(enqueue):
        missing = sorted(set(by_name) - set(values))
        extra = sorted(set(values) - set(by_name))
        if missing or extra:
            raise fail(f"enqueue[{i}]", f"must give exactly the searched fields; missing {missing}, unknown {extra}")
        try:
            TrainConfig().replace(**fixed, **values)
        except ConfigError as error:
            raise fail(f"enqueue[{i}]", str(error)) from None
        params = {k: v for name, value in values.items() for k, v in by_name[name].as_params(value).items()}
        outside = [name for name in values if not by_name[name].fits(params)]
        if outside:
            raise fail(f"enqueue[{i}].{outside[0]}", f"{values[outside[0]]!r} is outside the search space")
        enqueued.append(params)

    warm_start = _optional_table(document, "warm_start", WARM_START_KEYS, fail)
    if warm_start is not None:
        if not isinstance(warm_start.get("study"), str) or not warm_start["study"]:
            raise fail("warm_start.study", "must name an earlier study in the same storage, e.g. \"cnn\"")
        if warm_start["study"] == path.stem:
            raise fail("warm_start.study", "names this study itself; name an earlier one")
        best = warm_start.setdefault("best", 3)
        if not _is_int(best) or best < 1:
            raise fail("warm_start.best", f"{best!r} must be a positive integer")
    final = _optional_table(document, "final", FINAL_KEYS, fail)
    if final is not None:
        if not _is_number(final.get("seconds")) or final["seconds"] <= 0:
            raise fail("final.seconds", f"{final.get('seconds')!r} must be a positive number of seconds")
        max_epochs = final.setdefault("max_epochs", 100)
        if not _is_int(max_epochs) or max_epochs < 1:
            raise fail("final.max_epochs", f"{max_epochs!r} must be a positive integer")

    spec = StudySpec(
        name=path.stem, path=path, description=document.get("description", ""), fixed=fixed, space=space,
        sampler=sampler, pruner=pruner, trials=trials, timeout=timeout, objective=objective,
        enqueue=tuple(enqueued), warm_start=warm_start, final=final,
    )
    for kind, make in (("sampler", spec.make_sampler), ("pruner", spec.make_pruner)):
        try:
            make()
        except (TypeError, ValueError) as error:
            raise fail(kind, f"bad setting for {getattr(spec, kind)['name']}: {error}") from None
    return spec


def _parse_param(name: str, spec: Any, fail) -> Param:
    key = f"search.{name}"
    if name not in field_names():
        raise fail(key, f"not a config field; fields: {', '.join(sorted(field_names()))}")
    if not isinstance(spec, dict):
        raise fail(key, "must be a table such as { type = \"float\", low = 0.0, high = 0.5 }")
    kind = spec.get("type")
    if kind not in PARAM_KEYS:
        raise fail(f"{key}.type", f"{kind!r} is not a parameter type; allowed: {', '.join(PARAM_KEYS)}")
    unknown = sorted(set(spec) - PARAM_KEYS[kind])
    if unknown:
        raise fail(f"{key}.{unknown[0]}", f"unknown key for a {kind} parameter; allowed: "
                                          f"{', '.join(sorted(PARAM_KEYS[kind]))}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise fail(f"{key}.log", f"{log!r} must be true or false")

    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise fail(f"{key}.choices", "must be a non-empty list")
        for choice in choices:
            _check_value(name, choice, key, fail)
        return Param(name, kind, choices=tuple(choices))

    if kind == "layers":
        depth = _range_pair(spec, "depth", key, fail, minimum=1)
        width = _range_pair(spec, "width", key, fail, minimum=1)
        step = spec.get("step")
        if step is not None and (not _is_int(step) or step < 1 or log or (width[1] - width[0]) % step):
            raise fail(f"{key}.step", f"{step!r} must be a positive integer that divides the width range, "
                                      f"and cannot be combined with log = true")
        return Param(name, kind, depth=depth, width=width, log=log, step=step)

    is_valid = _is_int if kind == "int" else _is_number
    low, high, step = spec.get("low"), spec.get("high"), spec.get("step")
    for bound, value in (("low", low), ("high", high)):
        if not is_valid(value):
            raise fail(f"{key}.{bound}", f"{value!r} must be {'an integer' if kind == 'int' else 'a number'}")
    if not low < high:
        raise fail(key, f"empty range: low ({low}) must be below high ({high})")
    if log and low <= 0:
        raise fail(f"{key}.log", f"a log scale needs low > 0 (got low = {low})")
    if step is not None and (not is_valid(step) or step <= 0 or log):
        raise fail(f"{key}.step", "must be a positive number, and cannot be combined with log = true")
    for value in (low, high):
        _check_value(name, value, key, fail)
    return Param(name, kind, low=low, high=high, log=log, step=step)


def _check_value(name: str, value: Any, key: str, fail) -> None:
    try:
        TrainConfig().replace(**{name: value})
    except ConfigError as error:
        raise fail(key, str(error)) from None


def _range_pair(spec: dict, which: str, key: str, fail, *, minimum: int) -> tuple[int, int]:
    pair = spec.get(which)
    if not (isinstance(pair, list) and len(pair) == 2 and all(_is_int(v) for v in pair)):
        raise fail(f"{key}.{which}", f"must be [low, high] integers, got {pair!r}")
    low, high = pair
    if low < minimum or high < low:
        raise fail(f"{key}.{which}", f"empty or invalid range {pair}: need {minimum} <= low <= high")
    return low, high


def _component(document: dict, kind: str, registry: dict, default: str, fail) -> dict[str, Any]:
    settings = dict(_table(document, kind, fail)) or {"name": default}
    name = settings.get("name", default)
    if name not in registry:
        raise fail(f"{kind}.name", f"{name!r} is not a known {kind}; allowed: {', '.join(registry)}")
    settings["name"] = name
    return settings


def _optional_table(document: dict, key: str, allowed: set[str], fail) -> dict[str, Any] | None:
    if key not in document:
        return None
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))
