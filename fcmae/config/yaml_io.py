"""YAML in and out: every reader of YAML in the project reads through ``parse_yaml`` (no
aliases, no key given twice, a bounded length); ``load_yaml`` reads a --config file of settings,
``dump_yaml`` and ``write_yaml`` write plain data. Torch-free."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from fcmae.errors import ConfigError, cut, shorten
from fcmae.run.files import write_text_atomic

YAML_LIMIT = 1_000_000  # characters: a YAML file of settings holds a few thousand


class _Refused(yaml.YAMLError):
    """Valid YAML that parse_yaml does not read; the message says why and the fix."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing aliases and a mapping that gives a key twice."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            alias = self.peek_event()
            raise _Refused(
                f"uses a YAML alias (*{cut(alias.anchor, 40)} on line "
                f"{alias.start_mark.line + 1}), which fcmae does not read (nested aliases expand "
                f"a small file without bound); write the value out instead"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _Refused(
                    f"gives the key {shorten(key)} twice (again on line "
                    f"{key_node.start_mark.line + 1}); keep one of them"
                )
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str) -> Any:
    """The data of a YAML text; every reader of YAML in the project reads through this one.

    YAML's safe loader, without aliases (a small text with nested aliases expands into billions
    of values, a "billion laughs") and without a key given twice in a mapping (PyYAML keeps the
    last). source names the text in the ConfigError, one sentence, that refuses it: e.g. a path,
    or "Config file c.yaml".
    """
    if len(text) > YAML_LIMIT:
        raise ConfigError(
            f"{source} is longer than {YAML_LIMIT} characters, too long for a YAML file of "
            f"settings; pass the right file."
        )
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _Refused as e:
        raise ConfigError(f"{source} {e}.") from None
    except yaml.YAMLError as e:
        raise ConfigError(
            f"{source} is not valid YAML ({cut(' '.join(str(e).split()))})."
        ) from None
    except RecursionError:
        raise ConfigError(
            f"{source} nests its values too deeply to be read; write plain keys and values."
        ) from None
    except ValueError as e:  # e.g. int() of more than 4300 digits, or the date 2024-13-01
        reason = cut(str(e).split(";")[0])
        raise ConfigError(
            f"{source} holds a value that cannot be read ({reason}); fix it."
        ) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of settings with parse_yaml; a missing or unreadable file, bad
    syntax, an alias or a key given twice is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; check the --config path.")
    try:
        with path.open() as f:
            text = f.read(YAML_LIMIT + 1)  # no more: parse_yaml refuses a longer text
    except UnicodeDecodeError:
        raise ConfigError(
            f"Config file {path} is not text; pass a YAML file (--print-config writes one)."
        ) from None
    except OSError as e:
        raise ConfigError(
            f"Config file {path} cannot be read ({e.strerror}); check the --config path."
        ) from None
    values = parse_yaml(text, f"Config file {path}")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys to values.")
    return values


def dump_yaml(values: Any) -> str:
    """Plain data as YAML text, keys in their declared order: the one YAML writer."""
    return yaml.safe_dump(values, sort_keys=False)


def write_yaml(values: Any, path: str | Path) -> None:
    """dump_yaml(values) written atomically at path (fcmae.run.files)."""
    write_text_atomic(path, dump_yaml(values))
