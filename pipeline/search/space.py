"""The searched parameters of a study file's `[search]` table: one ``Param`` per TrainConfig field,
parsed and checked here, and turned into Optuna suggestions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import optuna

from pipeline.training.config import ConfigError, TrainConfig, field_names

PARAM_KEYS = {
    "float": {"type", "low", "high", "log", "step"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
    "layers": {"type", "depth", "width", "log", "step"},
}


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


def parse_param(name: str, spec: Any, fail) -> Param:
    """One `[search]` entry; ``fail(key, message)`` makes the error that names the file and the key."""
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
        if step is not None and (not is_int(step) or step < 1 or log or (width[1] - width[0]) % step):
            raise fail(f"{key}.step", f"{step!r} must be a positive integer that divides the width range, "
                                      f"and cannot be combined with log = true")
        return Param(name, kind, depth=depth, width=width, log=log, step=step)

    is_valid = is_int if kind == "int" else is_number
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
    if not (isinstance(pair, list) and len(pair) == 2 and all(is_int(v) for v in pair)):
        raise fail(f"{key}.{which}", f"must be [low, high] integers, got {pair!r}")
    low, high = pair
    if low < minimum or high < low:
        raise fail(f"{key}.{which}", f"empty or invalid range {pair}: need {minimum} <= low <= high")
    return low, high


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))
