"""A run directory: its layout, the one naming rule for checkpoints and exports, its lock, and
the clean-up of what an interrupted run of its own left behind.

    RUN/config.yaml, log.txt, metrics.jsonl, tb/      written by the engine
    RUN/checkpoints/checkpoint-0010.pth               training state after 10 epochs
    RUN/checkpoints/encoder-0010.pth                  an export written with it (the job
                                                      names its kinds: encoder, ema, ...)
    RUN/checkpoints/checkpoint-best.pth, ema-best.pth tagged files: never pruned

One run uses a directory at a time (a lock file held while it runs). Files in it that the run
did not write (other names, other kinds) are never deleted.
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
from fcmae.io import TMP_MARK, write_text_atomic

log = logging.getLogger("fcmae")

CHECKPOINT = "checkpoint"  # the kind of the training-state files
_TEMPORARY = re.compile(rf"\..+{re.escape(TMP_MARK)}[0-9a-f]{{32}}")  # fcmae.io's staging files


def file_name(tag: int | str, kind: str = CHECKPOINT) -> str:
    """``checkpoint-0010.pth`` for epoch 10, ``ema-best.pth`` for kind "ema" and tag "best"."""
    return f"{kind}-{tag:04d}.pth" if isinstance(tag, int) else f"{kind}-{tag}.pth"


class RunDir:
    """The folder of one run (``path``) and its ``checkpoints/`` subfolder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self._lock: IO[str] | None = None

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
        """Create the directory and hold its lock until unlock() (one run per directory)."""
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
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

    def write_config(self, values: dict[str, Any]) -> None:
        """config.yaml: the run's resolved settings, keys in their declared order."""
        text = yaml.safe_dump(values, sort_keys=False)
        write_text_atomic(self.path / "config.yaml", text, "--output-dir")

    def remove_leftovers(self, kinds: tuple[str, ...]) -> None:
        """Delete what an interrupted save of this run leaves: fcmae.io's temporary files, and
        numbered files of the run's export kinds whose checkpoint was never written (exports
        are written before their checkpoint). Anything else is left alone."""
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
