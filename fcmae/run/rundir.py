"""A run directory: its layout, the one naming rule for checkpoints and exports, its lock, and
the clean-up of what an interrupted run of its own left behind.

    RUN/config.yaml, log.txt, metrics.jsonl, tb/      written by the engine
    RUN/checkpoints/checkpoint-0010.pth               training state after 10 epochs
    RUN/checkpoints/encoder-0010.pth                  an export written with it (the job
                                                      names its kinds: encoder, ema, ...)
    RUN/checkpoints/checkpoint-best.pth, ema-best.pth tagged files: never pruned

One run uses a directory at a time (a lock file held while it runs). Files in it that the run
did not write (other names, other kinds) are never deleted.

A directory is one experiment: RUN/identity.yaml records the command and the settings that
define the run (fcmae.config's options, less those declared ``identity=False``). A later start
in the directory with other values is refused (``accept``), unless the user names the changed
settings, which are then logged and recorded.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
from pathlib import Path
from typing import IO, Any

import yaml

from fcmae.errors import UserError
from fcmae.run.files import TMP_MARK, probe, write_text_atomic

log = logging.getLogger("fcmae")

CHECKPOINT = "checkpoint"  # the kind of the training-state files
IDENTITY = "identity.yaml"  # the command and the settings that define the run
EFFECTIVE = "effective_batch"  # recorded resolved: images per optimizer step
_TEMPORARY = re.compile(
    rf"\..+{re.escape(TMP_MARK)}[0-9a-f]{{32}}"
)  # fcmae.run.files's staging files


def file_name(tag: int | str, kind: str = CHECKPOINT) -> str:
    """``checkpoint-0010.pth`` for epoch 10, ``ema-best.pth`` for kind "ema" and tag "best"."""
    return f"{kind}-{tag:04d}.pth" if isinstance(tag, int) else f"{kind}-{tag}.pth"


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (old value, new value)} of the keys of new whose value differs from old's; a key
    that old lacks (an option added since it was written) is not compared."""
    return {
        key: (old[key], value) for key, value in new.items() if key in old and old[key] != value
    }


def changed(changes: dict[str, tuple[Any, Any]]) -> str:
    """{key: (old, new)} as "mask_ratio 0.6 -> 0.5, seed 0 -> 1"."""
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


class RunDir:
    """The folder of one run (``path``) and its ``checkpoints/`` subfolder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._lock: IO[str] | None = None
        self._accepted: tuple = ()  # what accept() let in, for record()

    def file(self, tag: int | str, kind: str = CHECKPOINT) -> Path:
        """Where a checkpoint or export of this run lives; see file_name."""
        return self.checkpoints / file_name(tag, kind)

    def numbered(self, kind: str = CHECKPOINT) -> list[tuple[int, Path]]:
        """(epoch, path) of the numbered files of kind, newest first."""
        if not self.checkpoints.is_dir():
            return []
        pattern = re.compile(rf"{re.escape(kind)}-(\d{{4,}})\.pth")
        found = [
            (int(m[1]), p) for p in self.checkpoints.iterdir() if (m := pattern.fullmatch(p.name))
        ]
        return sorted(found, reverse=True)

    def lock(self) -> None:
        """Create the directory, check that checkpoints/ can be written, and hold its lock until
        unlock() (one run per directory)."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            probe(self.checkpoints)  # before any work, not at the first save
            handle = open(self.path / ".lock", "a+")
        except OSError as e:
            raise UserError(
                f"Cannot write to output dir {self.path} ({e.strerror or e}); pass a writable "
                f"--output-dir."
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(
                f"Another run is using {self.path} (process {self._lock_owner()}); wait for it "
                f"to end, or pass another --output-dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{socket.gethostname()}:{os.getpid()}\n")
        handle.flush()
        self._lock = handle

    def _lock_owner(self) -> str:
        try:
            return (self.path / ".lock").read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def recorded(self) -> tuple[dict[str, Any], str | None] | None:
        """(settings, command) that the run of this directory recorded: identity.yaml, or the
        config.yaml of a run from before identity.yaml (command None); None when neither is
        there. UserError when the file cannot be read."""
        for name in (IDENTITY, "config.yaml"):
            path = self.path / name
            if not path.is_file():
                continue
            try:
                values = yaml.safe_load(path.read_text())
                if name == IDENTITY:
                    values, command = values["settings"], str(values["command"])
                else:
                    command = None
                if isinstance(values, dict):
                    return values, command
            except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, KeyError):
                pass
            raise UserError(
                f"{path} cannot be read, so the settings of the run in {self.path} are unknown; "
                f"pass another --output-dir."
            )
        return None

    def accept(
        self,
        command: str,
        values: dict[str, Any],
        identity_keys: tuple[str, ...],
        accepted: tuple[str, ...] = (),
        previous: dict[str, Any] | None = None,
    ) -> dict[str, tuple[Any, Any]]:
        """Check a run's settings (values, all options of command) against what this directory
        recorded or, in a new directory, previous (the settings in a --resume checkpoint).

        Only identity_keys count. Returns the changes that accepted names, {key: (old, new)};
        raises UserError when the directory holds another command's run, or other settings
        that accepted does not name. Reads only: record() writes what it accepted.
        """
        identity = {key: values[key] for key in identity_keys}
        self._accepted = command, identity, values, {}
        found, where = self.recorded(), f"The run in {self.path}"
        if found is None and previous is not None:
            found, where = (previous, None), "The --resume checkpoint"
        if found is None:
            return {}
        old, old_command = found
        if old_command is None and set(old) - set(values):  # written before identity.yaml
            old_command = "another command"
        if old_command not in (None, command):
            raise UserError(
                f"{where} was made by {old_command}, not by {command}; pass another --output-dir."
            )
        changes = differences(old, identity)
        if changes.get(EFFECTIVE, (0,))[0] is None:  # left unresolved before identity.yaml
            del changes[EFFECTIVE]
        refused = {key: change for key, change in changes.items() if key not in accepted}
        if refused:
            raise UserError(
                f"{where} has other settings ({changed(refused)}); pass another --output-dir "
                f"to start a new run, or --accept-changes {','.join(refused)} to continue this "
                f"one with the new values."
            )
        self._accepted = command, identity, values, changes
        return changes

    def record(self) -> None:
        """After accept(): log the changes it accepted, write identity.yaml and config.yaml."""
        command, identity, values, changes = self._accepted
        if changes:
            log.warning("Continuing with changed settings: %s.", changed(changes))
        self.write_identity(command, identity)
        self.write_config(values)

    def write_identity(self, command: str, identity: dict[str, Any]) -> None:
        """identity.yaml: the command and the settings that define this run."""
        text = yaml.safe_dump({"command": command, "settings": identity}, sort_keys=False)
        write_text_atomic(self.path / IDENTITY, text, "--output-dir")

    def write_config(self, values: dict[str, Any]) -> None:
        """config.yaml: the run's resolved settings, keys in their declared order."""
        text = yaml.safe_dump(values, sort_keys=False)
        write_text_atomic(self.path / "config.yaml", text, "--output-dir")

    def remove_leftovers(self, kinds: tuple[str, ...]) -> None:
        """Delete what an interrupted save of this run leaves: fcmae.run.files's temporary files,
        and numbered files of the run's export kinds whose checkpoint was never written
        (exports are written before their checkpoint). Anything else is left alone."""
        if not self.checkpoints.is_dir():
            return
        saved = {epoch for epoch, _ in self.numbered()}
        orphans = [p for kind in kinds for epoch, p in self.numbered(kind) if epoch not in saved]
        temporary = [p for p in self.checkpoints.iterdir() if _TEMPORARY.fullmatch(p.name)]
        for path in temporary + orphans:
            log.info("Removing %s, left by an interrupted save.", path)
            path.unlink(missing_ok=True)

    def prune(self, keep_last: int, kinds: tuple[str, ...]) -> None:
        """Delete all but the newest keep_last numbered checkpoints, with their exports."""
        for epoch, _ in self.numbered()[keep_last:]:
            for kind in (CHECKPOINT, *kinds):
                self.file(epoch, kind).unlink(missing_ok=True)
