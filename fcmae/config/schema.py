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
ConfigError that names the key and where it came from. This module imports no torch, and
neither does validation, so `fcmae --help` and `--print-config` stay fast.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from fcmae.errors import ConfigError

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
            text = f"must lie in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low == 0:
            text = "must not be negative" if self.low_closed else "must be positive"
        else:
            text = f"must be {'at least' if self.low_closed else 'more than'} {self.low:g}"
        return f"{text} ({self.why})" if self.why else text


POSITIVE = Range(0)
NON_NEGATIVE = Range(0, low_closed=True)
FRACTION = Range(0, 1)  # (0, 1)


def opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    positional: bool = False,
    within: Range | None = None,
    identity: bool = True,
) -> Any:
    """A keyword-only dataclass field with the help text (and allowed values or range) the CLI
    shows; default RECIPE: the recipe supplies it. A positional field takes one or more values
    without a flag. A range applies to every element of a tuple; None is always allowed.
    identity=False declares an option that may change when a run resumes (how it runs, not
    what it computes); every other option defines the run (``Config.identity_keys``)."""
    metadata = {
        "help": help,
        "choices": choices,
        "positional": positional,
        "within": within,
        "identity": identity,
    }
    return field(default=default, kw_only=True, metadata=metadata)


def _elements(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


@dataclass
class Config:
    """Base of every command's configuration."""

    output_root: ClassVar[str | None] = None  # output_dir defaults to runs/<output_root>/<model>

    @classmethod
    def recipe(cls, chosen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Named layers of defaults between the dataclass and the user's values, lowest first;
        chosen: the user's values (config file and flags)."""
        return []

    def validate(self) -> None:
        """Raise ConfigError naming the key: every number is finite, then every declared range
        holds. Subclasses add the rules that relate several keys."""
        fields = dataclasses.fields(self)
        for f in fields:
            value = getattr(self, f.name)
            if any(isinstance(v, float) and not math.isfinite(v) for v in _elements(value)):
                raise ConfigError(
                    f"--{f.name.replace('_', '-')} must be a finite number, got {value}."
                )
        for f in fields:
            value, within = getattr(self, f.name), f.metadata.get("within")
            if within and value is not None and not all(v in within for v in _elements(value)):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{f.name} {within.rule()}, got {shown}.")

    @classmethod
    def identity_keys(cls) -> tuple[str, ...]:
        """The options that define a run: a resume must keep their values (fcmae.run.rundir)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("identity", True))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for YAML files and checkpoints."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


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
            return f"a list of {_describe(args[0])}s"
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
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis and isinstance(value, (list, tuple)):
            return tuple(_coerce(v, args[0]) for v in value)
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
                f"Unknown key {key!r} in {source}; known keys: {', '.join(sorted(known))}."
            )
        try:
            out[key] = _coerce(value, hints[key])
        except ValueError:
            raise ConfigError(
                f"Key {key!r} in {source} must be {_describe(hints[key])}, got {value!r}."
            ) from None
        choices = known[key].metadata.get("choices")
        if choices and out[key] is not None and out[key] not in choices:
            raise ConfigError(
                f"Key {key!r} in {source} must be one of "
                f"{', '.join(map(str, choices))}, got {value!r}."
            )
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad syntax or a key given twice is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; check the --config path.")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise ConfigError(
            f"Config file {path} is not text; pass a YAML file (--print-config writes one)."
        ) from None
    except _DuplicateKey as e:
        raise ConfigError(
            f"Config file {path} gives the key {e.key!r} twice (again on line {e.line}); keep "
            f"one of them."
        ) from None
    except yaml.YAMLError as e:
        message = f"Config file {path} is not valid YAML ({e})."
        raise ConfigError(message.replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys to values.")
    return values


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
        cfg.output_dir = f"runs/{cls.output_root}/{cfg.model}"
    cfg.validate()
    return cfg


def write_yaml(values: dict[str, Any], path: str | Path) -> None:
    """Write plain data as YAML, keys in their declared order."""
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


def require(cfg: Any, *keys: str) -> None:
    """Raise ConfigError naming the first of keys that is unset."""
    for key in keys:
        if getattr(cfg, key) is None:
            raise ConfigError(f"--{key.replace('_', '-')} is required; see --help.")
