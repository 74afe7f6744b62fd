"""Plain-data configuration: the one source of truth for every command's options and recipes.

A command's configuration is a dataclass of plain values; its fields are the command's flags
(with their help, allowed values and range) and its ``recipe`` names the layers of defaults
that depend on the model or the data. ``resolve`` layers them, later ones winning:

    dataclass defaults < the recipe for the model (and demo settings) < the --config YAML file
    < command-line flags

Each option is declared once: options that several commands share are small dataclasses
(NetworkOptions, ImagesOption, ...) that the commands' configurations inherit. Numbers live in
one place: a field that a recipe sets has no dataclass default (``RECIPE``), so the recipe is
where its value is read; a field no recipe touches keeps its default here. Ranges are declared
beside the option (``within=POSITIVE``) and checked by ``Config.validate`` with one sentence
naming the key; a class's own ``validate`` holds only the rules that relate several keys.

Every layer is checked against the dataclass: an unknown key or a value of the wrong type is a
ConfigError that names the key and where it came from. Every integer option has an upper bound,
and validation refuses a command that clearly cannot fit in this machine's memory
(fcmae.config.budget). The --config file is read by fcmae.config.yaml_io, which refuses aliases.
This module imports no torch, and neither does validation, so `fcmae --help` and
`--print-config` stay fast.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from fcmae.config.budget import Need, check_fits
from fcmae.config.yaml_io import load_yaml
from fcmae.errors import ConfigError, shorten
from fcmae.models import ModelError
from fcmae.run.layout import default_run_dir
from fcmae.run.paths import check_outputs, resolved

C = TypeVar("C", bound="Config")

RECIPE: Any = dataclasses.MISSING  # as a field's default: none here, the command's recipe sets it


@dataclass(frozen=True)
class Range:
    """The allowed values of a number: an interval, open or closed at either end."""

    low: float
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False
    why: str = ""  # said after the rule, e.g. "the network's stride"

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def rule(self) -> str:
        """How a message says it: "must be positive", "must lie in (0, 1]", ..."""
        if self.high < math.inf:
            left, right = "[" if self.low_closed else "(", "]" if self.high_closed else ")"
            text = f"must lie in {left}{_number(self.low)}, {_number(self.high)}{right}"
        elif self.low == 0:
            text = "must not be negative" if self.low_closed else "must be positive"
        else:
            text = f"must be {'at least' if self.low_closed else 'more than'} {_number(self.low)}"
        return f"{text} ({self.why})" if self.why else text


def _number(bound: float) -> str:
    """A bound as a rule says it: 2**63 for a large power of two, else %g."""
    if isinstance(bound, int) and bound > 2**20 and bound & (bound - 1) == 0:
        return f"2**{bound.bit_length() - 1}"
    return f"{bound:g}"


POSITIVE = Range(0)
NON_NEGATIVE = Range(0, low_closed=True)
FRACTION = Range(0, 1)  # (0, 1)

# Every integer option has an upper bound: a count ends in torch or numpy, which hold integers
# in 64 bits (a tensor's size, a sampler's epoch, a step counter); tighter ones say their reason.
INT64 = 2**63
COUNT = Range(0, INT64, why="torch and numpy count in 64-bit integers")  # 1, 2, ...
COUNT_OR_ZERO = Range(0, INT64, low_closed=True, why=COUNT.why)  # 0, 1, 2, ...


def opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    positional: bool = False,
    within: Range | None = None,
    identity: bool = True,
    path: str | None = None,
    legacy: Any = dataclasses.MISSING,
) -> Any:
    """A keyword-only dataclass field with the help text (and allowed values or range) the CLI
    shows; default RECIPE: the recipe supplies it. A positional field takes one or more values
    without a flag. A range applies to every element of a tuple; None is always allowed.
    identity=False declares an option that may change when a run resumes (how it runs, not
    what it computes); every other option defines the run (``Config.identity_keys``).
    path="input" or "output": a file or folder the command reads or writes, resolved once by
    ``resolve`` and held to the one output-vs-input rule (``Config.inputs``, ``outputs``).
    legacy: for an option added after runs were made, the value that means what those runs did
    without it, so that they resume without naming it (``Config.legacy_values``)."""
    metadata = {
        "help": help,
        "choices": choices,
        "positional": positional,
        "within": within,
        "identity": identity,
        "path": path,
        "legacy": legacy,
    }
    return field(default=default, kw_only=True, metadata=metadata)


def _elements(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


@dataclass
class Config:
    """Base of every command's configuration."""

    output_root: ClassVar[str | None] = None  # names the command; see layout.default_run_dir

    @classmethod
    def recipe(cls, chosen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Named layers of defaults between the dataclass and the user's values, lowest first;
        chosen: the user's values (config file and flags)."""
        return []

    def validate(self) -> None:
        """Raise ConfigError naming the key: every number is finite, then every declared range
        holds, then what the command needs fits in this machine's memory (``needs``).
        Subclasses add the rules that relate several keys."""
        fields = dataclasses.fields(self)
        for f in fields:
            value = getattr(self, f.name)
            if any(isinstance(v, float) and not math.isfinite(v) for v in _elements(value)):
                raise ConfigError(
                    f"--{f.name.replace('_', '-')} must be a finite number, got {shorten(value)}."
                )
        for f in fields:
            value, within = getattr(self, f.name), f.metadata.get("within")
            if within and value is not None and not all(v in within for v in _elements(value)):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{f.name} {within.rule()}, got {shorten(shown)}.")
        check_fits(self, self.needs())

    def needs(self) -> list[Need]:
        """The memory this command needs, in parts (fcmae.config.budget); validate refuses
        what clearly cannot fit. None by default."""
        return []

    @classmethod
    def identity_keys(cls) -> tuple[str, ...]:
        """The options that define a run: a resume must keep their values (fcmae.run.identity)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("identity", True))

    @classmethod
    def legacy_values(cls) -> dict[str, Any]:
        """{key: value} of the options added since runs were made: what a run that predates
        one did (fcmae.run.identity reads a record without the key as holding this value)."""
        return {
            f.name: f.metadata["legacy"]
            for f in dataclasses.fields(cls)
            if f.metadata.get("legacy", dataclasses.MISSING) is not dataclasses.MISSING
        }

    def resolve_paths(self) -> None:
        """Make every path option's value absolute, once (fcmae.run.paths.resolved)."""
        for f in dataclasses.fields(self):
            kind, value = f.metadata.get("path"), getattr(self, f.name)
            if kind and value is not None:
                hub = kind == "input"  # a Hub name is something to read, never to write
                for v in _elements(value) if kind == "output" else ():
                    if os.path.islink(v) and not os.path.isdir(v):  # a folder's link is fine
                        raise ConfigError(
                            f"{_flag(f.name)} {v} is a link (to {os.readlink(v)}); pass the "
                            f"path of the file to write itself."
                        )
                values = tuple(resolved(v, hub) for v in _elements(value))
                setattr(self, f.name, values if isinstance(value, tuple) else values[0])

    def inputs(self) -> dict[str, str | None]:
        """What the command reads, {flag: path}: its path="input" options; a command adds
        what it reads that is no option."""
        return self._paths("input")

    def outputs(self) -> dict[str, str | None]:
        """What the command writes, {flag: path}: its path="output" options; a command adds
        what it derives (a default beside an input)."""
        return self._paths("output")

    def _paths(self, kind: str) -> dict[str, str | None]:
        """{flag: value} of the options declared path=kind."""
        return {
            _flag(f.name): getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("path") == kind
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML files and checkpoints: lists, not tuples, and numbers as the
        recipes write them (40, not 40.0)."""
        return {
            k: [_as_written(e) for e in v] if isinstance(v, tuple) else _as_written(v)
            for k, v in dataclasses.asdict(self).items()
        }


def _as_written(value: Any) -> Any:
    """A float that Python writes as N.0 as the integer N (it reads back as the same float)."""
    return int(value) if isinstance(value, float) and repr(value).endswith(".0") else value


def _describe(tp: Any) -> str:
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            plural = {str: "strings", int: "integers", float: "numbers"}
            return f"a list of {plural.get(args[0], _describe(args[0]))}"
        return f"a list of {len(args)} numbers"
    if _is_optional(tp):
        return f"{_describe(_inner(tp))} or null"
    return str(tp)


def _is_optional(tp: Any) -> bool:
    return isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)


def _inner(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _coerce(value: Any, tp: Any) -> Any:
    """Return value as type tp, or raise ValueError."""
    if _is_optional(tp):
        return None if value is None else _coerce(value, _inner(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond floats: infinite, as float("1e400") is
                return math.inf if value > 0 else -math.inf
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis and isinstance(value, (list, tuple)):
            return tuple(_coerce(v, args[0]) for v in value)
        if args[-1] is Ellipsis and args[0] is str and isinstance(value, str):
            return (value,)  # `track: mlflow` in a YAML file, a list of one
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a) for v, a in zip(value, args))
    raise ValueError


def check(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate keys and types of one layer against dataclass cls; return the coerced values.

    source names the layer in error messages, e.g. "configs/pretrain/x.yaml".
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"Unknown key {shorten(key)} in {source}; known keys: {', '.join(sorted(known))}."
            )
        try:
            out[key] = _coerce(value, hints[key])
        except ValueError:
            raise ConfigError(
                f"Key {key!r} in {source} must be {_describe(hints[key])}, got {shorten(value)}."
            ) from None
        choices = known[key].metadata.get("choices")
        if choices and out[key] is not None and out[key] not in choices:
            raise ConfigError(
                f"Key {key!r} in {source} must be one of "
                f"{', '.join(map(str, choices))}, got {shorten(value)}."
            )
    return out


def resolve(cls: type[C], config_file: str | None = None, flags: dict[str, Any] | None = None) -> C:
    """The validated configuration of cls from its layers: defaults < cls.recipe < the config
    file < flags."""
    file_values = check(cls, load_yaml(config_file), config_file) if config_file else {}
    chosen = {**file_values, **check(cls, flags or {}, "the command line")}
    merged: dict[str, Any] = {}
    for _, values in cls.recipe(chosen):
        merged.update(values)
    cfg = cls(**{**merged, **chosen})
    if cls.output_root and getattr(cfg, "output_dir", "") is None:
        cfg.output_dir = default_run_dir(cls.output_root, cfg.model, getattr(cfg, "data", None))
    cfg.resolve_paths()
    try:
        cfg.validate()
    except ModelError as e:  # a rule of the model's (masking) said in its own words
        raise ConfigError(str(e)) from None
    check_outputs(cfg.outputs(), cfg.inputs())
    return cfg


def require(cfg: Any, *keys: str) -> None:
    """Raise ConfigError naming the first of keys that is unset."""
    for key in keys:
        if getattr(cfg, key) is None:
            raise ConfigError(f"--{key.replace('_', '-')} is required; see --help.")


def _flag(key: str) -> str:
    """The command line's name of a key."""
    return f"--{key.replace('_', '-')}"
