"""Training configuration: one frozen dataclass, validated on construction.

What gets logged and what a study samples are exactly these fields (``asdict(config)``), so
there is no second list of hyperparameters to keep in sync.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, fields
from typing import Any, Literal

from pipeline.errors import PipelineError

ModelFamily = Literal["mlp", "cnn"]
OptimizerName = Literal["adam", "adamw", "sgd"]
ScheduleName = Literal["onecycle", "wsd", "cosine", "plateau", "none"]
AugmentName = Literal["none", "flip", "crop-flip"]
TTAName = Literal["none", "flip", "flip-translate"]
PrecisionName = Literal["auto", "float32", "bfloat16"]

NOTEBOOK_TEST_ACCURACY = 0.9030  # the notebook's MLP: the figure every trained model is compared with


class ConfigError(PipelineError, ValueError):
    """A configuration key is unknown or its value is out of range; the message names the key."""


@dataclass(frozen=True)
class TrainConfig:
    # Model family and shape.
    model: ModelFamily = "mlp"
    hidden_sizes: tuple[int, ...] = (512, 256, 128)  # MLP hidden widths: the notebook's 784-512-256-128-10
    batch_norm: bool = True
    dropout: float = 0.1  # probability, applied after every hidden layer / conv stage
    cnn_channels: tuple[int, ...] = (32, 64)  # one stage per entry; each stage halves the image side
    cnn_convs_per_stage: int = 2
    cnn_residual: bool = False  # identity skip around every conv after a stage's first
    cnn_head_width: int = 128  # width of the dense layer after the conv stages (0: none)
    cnn_pool_first: bool = False  # pool after a stage's first conv, before batch norm (faster), not at its end

    # Optimisation.
    epochs: int = 20
    batch_size: int = 128
    optimizer: OptimizerName = "adamw"
    lr: float = 2e-3  # peak learning rate (OneCycle's max_lr), for lr_reference_batch's batch size when set
    # The batch size `lr` is given for (0: `lr` as it is). With 128, a batch of 256 trains at sqrt(2) * lr
    # (Adam, AdamW) or 2 * lr (SGD): a study then samples lr and batch_size independently of each other.
    lr_reference_batch: int = 0
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only (Nesterov)
    label_smoothing: float = 0.1
    # onecycle: warm-up over the first 30 %, then down to zero. wsd (warmup-stable-decay): one epoch's
    # warm-up, constant, then down to zero over the last quarter: every trial of a study is at the same
    # learning rate until the decay, so pruning rungs before it compare like with like.
    schedule: ScheduleName = "onecycle"
    patience: int = 0  # early stopping for stand-alone runs, in epochs without improvement; 0: off

    # Data.
    augment: AugmentName = "none"  # "flip": random horizontal flips; "crop-flip": plus random shifts of up to 2 px
    # Test-time augmentation for a model trained with augment: the most the final model may average over,
    # each step kept only when it validates better. "flip": the mirror image; "flip-translate": also the
    # image moved by a pixel (6 forward passes an image).
    tta: TTAName = "flip"
    val_size: int = 10_000  # images held out of the 60,000 training images for validation
    train_subset: int = 0  # train on this many images only (0: all), for cheap runs
    seed: int = 0
    # Training arithmetic. auto: bfloat16 autocast where the hardware does it natively (CUDA, CPUs with
    # AVX-512 BF16 or AMX; measured speed-ups in docs/results.md), float32 elsewhere. Validation and the exported
    # model compute in float32 on a CPU, so promotion and clients see the same accuracy.
    precision: PrecisionName = "auto"

    def __post_init__(self) -> None:
        _check_literals(self)
        _require(self, "hidden_sizes", self.hidden_sizes and all(w >= 1 for w in self.hidden_sizes),
                 "one or more positive widths, e.g. 512,256,128")
        _require(self, "dropout", 0.0 <= self.dropout < 1.0, "0 <= dropout < 1")
        _require(self, "cnn_channels", self.cnn_channels and all(c >= 1 for c in self.cnn_channels),
                 "one or more positive channel counts, e.g. 32,64")
        _require(self, "cnn_channels", len(self.cnn_channels) <= 4, "at most 4 stages (28 px halves to 1 px)")
        _require(self, "cnn_convs_per_stage", self.cnn_convs_per_stage >= 1, ">= 1")
        _require(self, "cnn_head_width", self.cnn_head_width >= 0, ">= 0")
        _require(self, "epochs", self.epochs >= 1, ">= 1")
        _require(self, "batch_size", self.batch_size >= 2, ">= 2 (batch norm needs two samples)")
        _require(self, "lr", self.lr > 0, "> 0")
        _require(self, "lr_reference_batch", self.lr_reference_batch >= 0, ">= 0 (0: lr as it is)")
        _require(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        _require(self, "momentum", 0 <= self.momentum < 1, "0 <= momentum < 1")
        _require(self, "label_smoothing", 0 <= self.label_smoothing < 1, "0 <= label_smoothing < 1")
        _require(self, "patience", self.patience >= 0, ">= 0 (0 turns early stopping off)")
        _require(self, "val_size", self.val_size >= 1, ">= 1 (and fewer than the training images)")
        _require(self, "train_subset", self.train_subset >= 0, ">= 0 (0: the whole training split)")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied; unknown keys raise ConfigError naming them."""
        unknown = sorted(set(changes) - field_names())
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r}; known keys: {', '.join(sorted(field_names()))}")
        return dataclasses.replace(self, **{k: coerce(k, v) for k, v in changes.items()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Fields that only one model family reads: a study that fixes the other family and searches them
# would spend its trials on values that change nothing.
FAMILY_FIELDS = {
    "mlp": frozenset({"hidden_sizes", "batch_norm"}),
    "cnn": frozenset({"cnn_channels", "cnn_convs_per_stage", "cnn_residual", "cnn_head_width", "cnn_pool_first"}),
}


def fields_unused_by(model: str) -> dict[str, str]:
    """The fields the ``model`` family ignores, each with the family that reads it."""
    return {name: family for family, names in FAMILY_FIELDS.items() if family != model for name in names}


def field_names() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


@functools.cache
def _field_types() -> dict[str, Any]:
    """TrainConfig's field types, resolved once: resolving its string annotations on every value
    checked took more time than the checks (seconds per study file read, half a test tier)."""
    return typing.get_type_hints(TrainConfig)


def coerce(key: str, value: Any) -> Any:
    """Convert ``value`` (a string from the command line, or a TOML/Optuna value) to the field's type."""
    hint = _field_types()[key]
    try:
        return _coerce_to(hint, value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"bad value {value!r} for {key!r}: {error}") from None


def _coerce_to(hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(map(str, allowed))}")
        return value
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(hint)
        if isinstance(value, str):
            parts = value.split(",")
            if value.strip() and not all(part.strip() for part in parts):
                raise ValueError(f"an empty entry in {value!r}; write the numbers separated by single commas")
            value = [part for part in parts if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list of {item_type.__name__}")
        return tuple(_coerce_to(item_type, item) for item in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
            return value.lower() in {"true", "1", "yes", "on"}
        raise ValueError("expected true or false")
    if hint is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected an integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool):
            raise ValueError("expected a number")
        return float(value)
    return hint(value)


def _check_literals(config: TrainConfig) -> None:
    hints = _field_types()
    for f in fields(config):
        if typing.get_origin(hints[f.name]) is typing.Literal:
            allowed = typing.get_args(hints[f.name])
            _require(config, f.name, getattr(config, f.name) in allowed, f"one of {', '.join(allowed)}")


def _require(config: TrainConfig, key: str, condition: Any, allowed: str) -> None:
    if not condition:
        raise ConfigError(f"config key {key!r} = {getattr(config, key)!r} is out of range: allowed {allowed}")
