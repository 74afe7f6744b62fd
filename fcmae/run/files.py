"""Files a command writes: the one atomic write, the one "can this path be written" check, and
the one place that turns a failed write into a sentence, from the fault itself.

Torch-free. Every file fcmae writes for the user (checkpoints, exports, pictures, tables,
features, logs) goes through ``write_atomic`` or ``writing``, so a crash or a full disk leaves
the old file or the new one, never half of one, and a failed write is one sentence naming the
path and the advice for its cause (``write_error``), not a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from fcmae.errors import UserError

TMP_MARK = ".tmp-"  # temporary files are ".<name>.tmp-<hex>": a run's clean-up knows its own
# What to do about a failed write, by its errno.
ADVICE = {
    errno.ENOSPC: "the disk is full; free some space, or pass a path on another disk",
    errno.EDQUOT: "the disk quota is used up; free some space, or pass a path on another disk",
    errno.EROFS: "the file system is read-only; pass a path on a writable one",
    errno.EACCES: "permission denied; pass a path in a folder you may write, or change its "
    "permissions",
    errno.EPERM: "the operation is not permitted; pass a path in a folder you may write",
    errno.EISDIR: "a folder is in the way; remove it or pass another path",
    errno.EEXIST: "a file is where a folder is needed; remove it or pass another path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; pass another path",
    errno.ENOENT: "a folder of the path does not exist (removed while running?); pass another path",
    errno.ENAMETOOLONG: "the name is too long; pass a shorter path",
}
# torch.save reports a failed write (a full disk) from its zip writer as a RuntimeError:
# "[enforce fail at inline_container.cc:...] unexpected pos ..." or "PytorchStreamWriter
# failed writing file ...". Recognised by these words.
TORCH_WRITE_FAILURE = ("inline_container.cc", "PytorchStreamWriter")


def temporary_name(path: Path) -> Path:
    """Where write_atomic stages path: a hidden file beside it, unique to this write."""
    return path.with_name(f".{path.name}{TMP_MARK}{uuid.uuid4().hex}")


def _cause(error: BaseException) -> OSError | None:
    """The OSError behind error: itself, or one in its chain (torch's writer raises a
    RuntimeError while handling the OSError of the write)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _free_bytes(path: Path) -> int | None:
    """Free space of the file system holding path (or its nearest existing folder)."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def write_error(path: str | Path, error: BaseException) -> UserError | None:
    """The sentence for a write of path that failed with error (an OSError, or torch's
    serialisation RuntimeError that wraps one), or None when error is not a failed write.
    The advice follows the errno; torch's error without an OSError behind it is read as a full
    disk when the disk has (almost) no space left."""
    path = Path(path)
    cause = _cause(error)
    if cause is None:
        if not (
            isinstance(error, RuntimeError) and any(w in str(error) for w in TORCH_WRITE_FAILURE)
        ):
            return None
        free = _free_bytes(path)
        code = errno.ENOSPC if free is not None and free < 2**20 else None
        reason = os.strerror(code) if code else "the writer failed"
    else:
        code, reason = cause.errno, cause.strerror or type(cause).__name__
    advice = ADVICE.get(code, "check the path and the disk, then run the same command again")
    return UserError(f"Cannot write {path} ({reason}): {advice}.")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Around code that writes path: a failed write becomes write_error's sentence."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        sentence = write_error(path, e)
        if sentence is None:
            raise
        raise sentence from None


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call write(file) on a temporary file beside path, fsync it, then rename it over path.

    Parent folders are created. A failed write (a full disk, a read-only folder) removes the
    temporary file and becomes write_error's sentence; returns path.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """write_atomic for text (UTF-8)."""
    return write_atomic(path, lambda f: f.write(text.encode()))


PNG_MARK = ("Software", "fcmae")  # the text chunk of every PNG fcmae writes: how it knows its own


def fcmae_png(path: Path) -> bool:
    """Whether path is a PNG that fcmae wrote (it carries PNG_MARK)."""
    from PIL import Image  # only when a picture is about to be replaced

    try:
        with Image.open(path) as picture:
            return picture.format == "PNG" and picture.text.get(PNG_MARK[0]) == PNG_MARK[1]
    except Exception:  # not an image, unreadable: not one of fcmae's
        return False


def replaceable(
    paths: list[Path], flag: str, overwrite: bool, ours: Callable[[Path], bool] | None = None
) -> None:
    """Refuse, before any work, to write a command's output files (the value of flag) over
    what fcmae may not replace: anything that is not a regular file (a folder, a device, a
    pipe: never), and a file that exists, unless overwrite is given or ours(path) says fcmae
    wrote it."""
    for path in map(Path, paths):
        if os.path.lexists(path) and not path.is_file():
            raise UserError(
                f"{flag} would replace {path}, which is not a regular file (a folder, a device "
                f"or a pipe); pass another {flag}."
            )
        if path.is_file() and not overwrite and not (ours and ours(path)):
            raise UserError(
                f"{flag} would replace {path}, which already exists and was not written by "
                f"fcmae; pass --overwrite to replace it, or another {flag}."
            )


def probe(folder: Path) -> None:
    """Create folder and a file in it, then remove the file; a failure is write_error's
    sentence."""
    test = temporary_name(folder / "write-test")
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        test.write_bytes(b"")
        test.unlink()


def writable(
    path: str | Path, flag: str, folder: bool = False, suffixes: tuple[str, ...] = ()
) -> Path:
    """Make sure path (a file to write, or with folder=True a folder to write into), the value
    of the option flag, can be written before any work is done: its folder is created and
    probed. suffixes: the names the file may have (a picture is ".png", never a checkpoint's
    name)."""
    path = Path(path)
    if not folder and path.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name.")
    if suffixes and path.suffix.lower() not in suffixes:
        raise UserError(
            f"{flag} {path} must end in {' or '.join(suffixes)}, the kind of file written; "
            f"pass another {flag}."
        )
    probe(path if folder else path.parent)
    return path
