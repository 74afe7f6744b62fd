"""Files a command writes: the one atomic write, the one "can this path be written" check, the
one sentence for a failed write, and the one "is this output an input" check.

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


def disk_error(path: str | Path, error: OSError, flag: str = "") -> UserError:
    """The sentence for a write that failed (a full disk, a read-only folder, no permission):
    it names the path, the option behind it (flag) and the fix."""
    what = f"{flag} {path}" if flag else str(path)
    return UserError(
        f"Cannot write {what} ({error.strerror or type(error).__name__}); free some disk space "
        f"or pass a path in a writable folder."
    )


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], flag: str = "") -> Path:
    """Call write(file) on a temporary file beside path, fsync it, then rename it over path.

    Parent folders are created. An OSError (a full disk, a read-only folder) removes the
    temporary file and becomes disk_error's UserError naming flag (or the path); returns path.
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
        raise disk_error(path, e, flag) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str, flag: str = "") -> Path:
    """write_atomic for text (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text.encode()), flag)


def probe(folder: Path) -> None:
    """Create folder and a file in it, then remove the file; raises what the OS raises."""
    folder.mkdir(parents=True, exist_ok=True)
    test = temporary_name(folder / "write-test")
    test.write_bytes(b"")
    test.unlink()


def writable(
    path: str | Path, flag: str, folder: bool = False, suffixes: tuple[str, ...] = ()
) -> Path:
    """Make sure path (a file to write, or with folder=True a folder to write into) can be
    written before any work is done: its folder is created and probed. suffixes: the names
    the file may have (a picture is ".png", never a checkpoint's name). UserError naming flag."""
    path = Path(path)
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name.")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(
            f"{flag} {path} must end in {' or '.join(suffixes)}, the kind of file written; "
            f"pass another {flag}."
        )
    try:
        probe(path if folder else path.parent)
    except OSError as e:
        raise disk_error(path, e, flag) from None
    return path


def _overlaps(output: Path, source: Path) -> bool:
    """Whether writing output changes source: the same file (the same inode when both exist,
    hard links too, else the same path once links and dots are resolved), or a file inside
    the folder source."""
    try:
        if os.path.samefile(output, source):
            return True
    except OSError:  # one of them does not exist (yet)
        pass
    out, src = os.path.realpath(output), os.path.realpath(source)
    return out == src or (os.path.isdir(src) and out.startswith(src.rstrip(os.sep) + os.sep))


def distinct_output(output: str | Path, inputs: dict[str, str | Path | None], flag: str) -> None:
    """Refuse, before any work, an output (the value of flag) that is, or lies inside, one of
    the command's inputs, {description: path}, e.g. {"the --checkpoint": path}: writing it
    would destroy or change what the command reads. Unset inputs are skipped."""
    for what, path in inputs.items():
        if path is not None and _overlaps(Path(output), Path(path)):
            raise UserError(
                f"{flag} {output} would overwrite or change {what} ({path}), which this command "
                f"reads; pass another {flag}."
            )
