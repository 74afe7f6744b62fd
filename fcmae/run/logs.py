"""The log of a run and of every command: the "fcmae" logger on the console and, for a run, in
RUN/log.txt (main process only). Torch-free: the CLI sets up the console before any job."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from fcmae.run.files import write_error

log = logging.getLogger("fcmae")


def setup_logging(log_file: Path | None, rank: int) -> list[logging.Handler]:
    """Logging of the "fcmae" logger to the console (unless a caller, such as the CLI, set it
    up already) and, on the main process, to log_file (a run's log.txt). Returns the handlers
    added, for close_logging: the console outlives a run that the CLI started.

    The main process logs INFO to stdout; other ranks only print warnings and errors, prefixed
    with their rank, so a problem on one worker is not hidden.
    """
    log.setLevel(logging.INFO)
    log.propagate = False
    added: list[logging.Handler] = []
    if not any(getattr(h, "_fcmae", False) for h in log.handlers):
        console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
        if rank != 0:
            console.setLevel(logging.WARNING)
        console.setFormatter(
            PrintableFormatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s")
        )
        added.append(console)
    if log_file is not None and rank == 0:
        try:
            file = LogFile(log_file, encoding="utf-8", errors="backslashreplace")
        except OSError as e:
            raise write_error(log_file, e) from None
        file.setFormatter(PrintableFormatter("%(message)s"))
        added.append(file)
    for h in added:
        h._fcmae = True  # type: ignore[attr-defined]
        log.addHandler(h)
    return added


class PrintableFormatter(logging.Formatter):
    """A formatter whose lines any stream can write: a file name that is not UTF-8 (its bytes
    decoded as surrogates) is shown escaped, \\udcff, instead of failing the handler."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class LogFile(logging.FileHandler):
    """log.txt. A write that fails (a full disk) is said once on stderr, in one sentence,
    instead of a traceback per line; the console log goes on."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
        elif not self.failed:
            self.failed = True
            print(f"fcmae: warning: {write_error(self.baseFilename, error)}", file=sys.stderr)


def log_to_file(message: str | logging.LogRecord) -> None:
    """A line in log.txt alone, that the console already shows: an error as the CLI reports
    it (a message), or a record logged before log.txt was opened (see remembered)."""
    record = message
    if isinstance(message, str):
        record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


@contextlib.contextmanager
def remembered() -> Iterator[list[logging.LogRecord]]:
    """The records the "fcmae" logger takes (INFO and above) while the block runs, as they go
    to the console too: what a run says before its log.txt exists, to write there later."""
    records: list[logging.LogRecord] = []
    keeper = logging.Handler(logging.INFO)
    keeper.emit = records.append  # type: ignore[method-assign]
    level = log.level
    log.setLevel(min(level or logging.INFO, logging.INFO))
    log.addHandler(keeper)
    try:
        yield records
    finally:
        log.removeHandler(keeper)
        log.setLevel(level)


def close_logging(handlers: list[logging.Handler]) -> None:
    """Remove and close handlers; a log file that cannot take its last lines (a full disk) is
    said on stderr, never raised: it must not hide the error that ended a run."""
    for h in handlers:
        log.removeHandler(h)
        try:
            h.close()
        except OSError as e:
            if getattr(h, "failed", False):  # said already, at the first failed line
                continue
            print(
                f"fcmae: warning: {write_error(getattr(h, 'baseFilename', ''), e)}", file=sys.stderr
            )
