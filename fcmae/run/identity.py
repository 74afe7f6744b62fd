"""A run's identity: the settings that define it, checked against every record of it (torch-free).

A run directory records its settings three times: identity.yaml (the command and the settings
that define the run), config.yaml (every resolved option) and each checkpoint's own "config".
``check`` compares a new start's settings with the reference, the newest checkpoint's settings
(a file with a digest, so not edited by hand) or, before the first checkpoint, identity.yaml.
Every other record must agree with the reference, but for the changes identity.yaml says were
accepted since that checkpoint: a record that is unreadable, incomplete or contradicts the
reference is refused in one sentence, never passed. A setting no record holds (an option added
since the run began) is a change from "(unrecorded)", accepted only when named, unless the option
declares the value that means what runs did before it existed (its legacy value).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcmae.config.yaml_io import parse_yaml, write_yaml
from fcmae.errors import UserError
from fcmae.run import layout

UNRECORDED = "(unrecorded)"
IDENT = layout.IDENTITY


@dataclass
class Record:
    """One record of a run's settings."""

    source: str  # how a sentence names it: "identity.yaml", "checkpoint-0010.pth", ...
    settings: dict[str, Any]
    command: str | None = None  # None: not recorded (config.yaml, checkpoints)
    accepted: dict[str, Any] = field(default_factory=dict)  # key -> value it replaced


def same(old: Any, new: Any) -> bool:
    """Equal values; a relative path recorded before paths were resolved equals its resolved
    form (as this working directory resolves it)."""
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return list(old) == list(new)
    if isinstance(old, str) and isinstance(new, str) and old != new and os.path.isabs(new):
        return not os.path.isabs(old) and os.path.realpath(old) == new
    return old == new


def changed(changes: dict[str, tuple[Any, Any]]) -> str:
    """{key: (old, new)} as "mask_ratio 0.6 -> 0.5, seed 0 -> 1"."""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def read_records(folder: Path) -> list[Record]:
    """identity.yaml and config.yaml of the run in folder, those that exist. UserError naming
    the file when one cannot be read as what it should be."""
    records = []
    for name in (layout.IDENTITY, layout.CONFIG):
        path = folder / name
        if not path.exists():
            continue
        try:
            values = parse_yaml(path.read_text(), str(path))
            if name == layout.IDENTITY:
                record = Record(
                    name, values["settings"], str(values["command"]), values.get("accepted") or {}
                )
            else:
                record = Record(name, values)
            if isinstance(record.settings, dict) and isinstance(record.accepted, dict):
                records.append(record)
                continue
        except (OSError, UnicodeDecodeError, UserError, TypeError, KeyError):
            pass
        raise UserError(
            f"{path} cannot be read, so the settings of the run in {folder} are unknown; "
            f"restore it, or pass another --output-dir."
        )
    return records


def check(
    command: str,
    values: dict[str, Any],
    keys: tuple[str, ...],
    accepted: tuple[str, ...],
    records: list[Record],
    where: str,
    legacy: dict[str, Any] | None = None,
) -> dict[str, tuple[Any, Any]]:
    """Check a start's settings (values: every option of command) against a run's records,
    the reference first (see the module); only keys count, legacy: Config.legacy_values().
    Returns {key: (old, new)} of the changes that accepted names; UserError for another
    command, a record that contradicts the reference or lacks a setting it holds, or a change
    accepted does not name. where names the run in a sentence ("The run in DIR")."""
    records = [_with_legacy(record, legacy or {}) for record in records]
    if not records:
        return {}
    for record in records:
        made_by = record.command
        if made_by is None and set(record.settings) - set(values) - {layout.EFFECTIVE}:
            made_by = "another command"
        if made_by not in (None, command):
            raise UserError(
                f"{where} was made by {made_by}, not by {command}; pass another --output-dir."
            )
    (reference, *others), ident = records, next((r for r in records if r.source == IDENT), None)
    excused = ident.accepted if ident else {}
    for record in others:
        for key in keys:
            if key not in reference.settings:
                continue
            if key not in record.settings:
                raise UserError(
                    f"{where}: {record.source} lacks {key}, which {reference.source} holds, so "
                    f"it was edited; restore it, or pass another --output-dir."
                )
            old, said = reference.settings[key], record.settings[key]
            if not same(old, said) and not (key in excused and same(old, excused[key])):
                raise UserError(
                    f"{where}: {record.source} says {key} {said!r} where {reference.source} says "
                    f"{old!r}, so one was edited; restore it, or pass another --output-dir."
                )
    changes = {}
    for key in keys:
        holder = next((r for r in records if key in r.settings), None)
        old = holder.settings[key] if holder else UNRECORDED
        if key == layout.EFFECTIVE and old is None:  # left unresolved by older versions
            continue
        if not same(old, values[key]):
            changes[key] = (old, values[key])
    # A change accepted since the newest checkpoint stays accepted until the next one.
    before = {k for k in excused if same(ident.settings.get(k), values.get(k))}
    refused = {k: change for k, change in changes.items() if k not in {*accepted, *before}}
    if refused:
        raise UserError(
            f"{where} has other settings ({changed(refused)}); pass another --output-dir "
            f"to start a new run, or --accept-changes {','.join(refused)} to continue this "
            f"one with the new values."
        )
    return changes


def _with_legacy(record: Record, legacy: dict[str, Any]) -> Record:
    """record, holding each legacy value it lacks: what its run did before the option existed
    (so a record written since, and the changes, are measured against that)."""
    settings = {**legacy, **record.settings}
    return Record(record.source, settings, record.command, record.accepted)


def write_identity(path: Path, command: str, settings: dict, accepted: dict[str, Any]) -> None:
    """identity.yaml: the command, the settings that define the run and, under "accepted",
    the value each change accepted since the newest checkpoint replaced."""
    record = {"command": command, "settings": settings}
    if accepted:
        record["accepted"] = accepted
    write_yaml(record, path)
