"""Run configuration: YAML files in configs/ plus dotted command-line overrides.

A run config has one small dataclass section per subsystem; each section lives next to the
code that owns it and validates itself in ``__post_init__``. This module only composes the
sections, loads YAML strictly (an unknown key names the closest valid one) and coerces
override strings to the declared field types.

    cfg = load_config("configs/default.yaml", ["train.steps=10", "parallel.zero_stage=1"])
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_llm.checkpoint.config import CheckpointConfig
from megatron_llm.data.config import DataConfig
from megatron_llm.model.config import ModelConfig
from megatron_llm.parallel.config import ParallelConfig
from megatron_llm.training.config import EvalConfig, LoggingConfig, OptimConfig, TrainConfig


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid RunConfig."""


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        # Checks that span sections; each section has already checked itself.
        check_finite(self)
        if self.parallel.pp > 1 and self.parallel.zero_stage != 1:
            # ZeRO 2/3 are refused by DeepSpeed's pipeline engine; with ZeRO 0 its gradient
            # clipping counts only the first stage's gradients (DeepSpeed 0.19), and bf16
            # pipeline checkpoints fail to load. ZeRO 1 is right in fp32 and bf16 (tested).
            raise ValueError(
                f"parallel.zero_stage={self.parallel.zero_stage} with parallel.pp="
                f"{self.parallel.pp}: pipeline parallelism runs with ZeRO stage 1 only; "
                "use parallel.zero_stage=1 (at dp=1 it costs nothing)"
            )
        self.model.check_divisible_by_tp(
            self.parallel.tp, sequence_parallel=self.parallel.sequence_parallel
        )
        forked_dropout = self.model.attention_dropout > 0 or (
            self.parallel.sequence_parallel and self.model.dropout > 0
        )
        if self.train.activation_checkpointing and self.parallel.tp > 1 and forked_dropout:
            # Recomputation restores torch's RNG but not the per-rank stream that split
            # tensors draw their dropout masks from (parallel/random.py): backward would use
            # other masks than forward.
            raise ValueError(
                "train.activation_checkpointing with parallel.tp > 1 needs "
                "model.attention_dropout=0 (and model.dropout=0 with sequence parallelism)"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_finite(cfg: RunConfig) -> None:
    """No float field may be inf or nan: ``optim.lr=inf`` would train a NaN model to the end
    (comparisons such as ``lr > 0`` let nan through, so the sections cannot catch it)."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        for field in dataclasses.fields(part):
            value = getattr(part, field.name)
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in items):
                raise ValueError(not_finite(f"{section.name}.{field.name}", value))


def not_finite(name: str, value: Any) -> str:
    return f"{name}={value}: not a finite number; give a finite value"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML file (or the defaults when path is None) and apply ``a.b=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    source = str(path) if path is not None else "<defaults>"
    for item in overrides or []:
        _apply_override(raw, item)
    return from_dict(raw, source=source)


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return _build(RunConfig, raw, prefix="", source=source)
    except ConfigError:
        raise
    except ValueError as e:  # a section's __post_init__ rejected a value
        raise ConfigError(f"{source}: {e}") from e


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key or "." not in key:
        raise ConfigError(
            f"override {item!r}: expected section.field=value, e.g. train.lr=3e-4 parallel.tp=2"
        )
    *sections, leaf = key.split(".")
    node = raw
    for s in sections:
        child = node.setdefault(s, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {s!r} is a value, not a section")
        node = child
    # Strings stay strings here; _coerce turns them into the declared type, which avoids YAML's
    # surprises ("3e-4" is a str in YAML 1.1, "no" a bool).
    node[leaf] = _OverrideStr(value)


class _OverrideStr(str):
    """A value that came from the command line as text and may be parsed into the field's type."""


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {prefix + str(key)!r}{_suggest(key, fields, prefix)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, prefix + key + ".", source)
        else:
            kwargs[key] = _coerce(value, hint, prefix + key, source)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from e


def _suggest(key: Any, fields: dict[str, Any], prefix: str) -> str:
    close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
    if close:
        return f"; did you mean {prefix + close[0]!r}?"
    return f"; valid keys: {', '.join(prefix + f for f in fields)}"


def _coerce(value: Any, hint: Any, name: str, source: str) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: {name}: expected {expected}, got {value!r}")

    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, _OverrideStr) and value.lower() in ("null", "none")):
            if type(None) in options:
                return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _coerce(value, opt, name, source)
            except ConfigError as e:
                errors.append(str(e).split(": expected ", 1)[-1].split(", got ")[0])
        raise bad(" or ".join(errors + (["null"] if type(None) in options else [])))
    if origin is Literal:
        allowed = typing.get_args(hint)
        for a in allowed:
            if value == a or (isinstance(value, _OverrideStr) and str(a) == value):
                return a
        raise bad("one of " + ", ".join(repr(a) for a in allowed))
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, _OverrideStr):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, list):
            raise bad("a list")
        return [_coerce(_relax(v), item_hint, f"{name}[{i}]", source) for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, _OverrideStr) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise bad("true or false")
    if hint is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, _OverrideStr):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise bad("an integer")
    if hint is float:
        if isinstance(value, bool):
            raise bad("a number")
        number = None
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise bad("a number")
        if not math.isfinite(number):  # before the sections' range checks, which nan passes
            raise ConfigError(f"{source}: {not_finite(name, value)}")
        return number
    if hint is str:
        if isinstance(value, str):
            return str(value)
        raise bad("a string")
    if hint is Any:
        return value
    raise TypeError(f"config field {name} has an unsupported type {hint!r}")


def _relax(v: Any) -> Any:
    # Items of a list given on the command line are text too.
    return _OverrideStr(v) if isinstance(v, str) and not isinstance(v, _OverrideStr) else v
