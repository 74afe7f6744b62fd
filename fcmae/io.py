"""Files a command writes: the one atomic write and the one "can this path be written" check.

Torch-free. Every file fcmae writes for the user (checkpoints, exports, pictures, tables,
features) goes through ``write_atomic``, so a crash or a full disk leaves the old file or the
new one, never half of one, and a failed write is one sentence, not a traceback.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from fcmae.errors import UserError

TMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<hex>": a run's clean-up knows its own


def temporary_name(path: Path) -> Path:
    """Where write_atomic stages path: a hidden file beside it, unique to this write."""
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex}")


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], flag: str = "") -> Path:
    """Call write(file) on a temporary file beside path, fsync it, then rename it over path.

    Parent folders are created. An OSError (a full disk, a read-only folder) removes the
    temporary file and becomes a UserError naming flag (or the path); returns path.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        what = f"{flag} {path}" if flag else str(path)
        raise UserError(
            f"Cannot write {what} ({e.strerror or type(e).__name__}); free some disk space or "
            f"pass a path in a writable folder."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str, flag: str = "") -> Path:
    """write_atomic for text (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text.encode()), flag)


def writable(path: str | Path, flag: str, folder: bool = False) -> Path:
    """Make sure path (a file to write, or with folder=True a folder to write into) can be
    written before any work is done: its folder is created and probed. UserError naming flag."""
    path = Path(path)
    where = path if folder else path.parent
    try:
        if not folder and path.is_dir():
            raise UserError(f"{flag} {path} is a folder; pass a file name.")
        where.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(where / "write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"Cannot write {flag} {path} ({e.strerror or type(e).__name__}); pass a path in a "
            f"writable folder."
        ) from None
    return path
