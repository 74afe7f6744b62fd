"""Checkpoint files: written atomically with a digest of their content, read back safely.

Everything is saved as tensors and plain Python data so that `torch.load(weights_only=True)`
reads it: no pickled classes, no numpy arrays. What a training checkpoint holds and where a
run keeps its files: fcmae.run.checkpointer and fcmae.run.layout.
"""

from __future__ import annotations

import argparse
import hashlib
import zipfile
from pathlib import Path
from typing import Any

import torch

from fcmae.errors import UserError
from fcmae.run.files import write_atomic

DIGEST = "digest"  # the key under which save_atomic stores the content's digest
# What a torch zip checkpoint may inflate to: torch.save stores its members uncompressed, so a
# real checkpoint's content is its own size; 4x leaves room for one that another tool
# recompressed (weights shrink by far less than that), the margin for small files. A file
# above it (a zip bomb) is refused before anything is inflated.
INFLATE_RATIO, INFLATE_MARGIN = 4, 64 * 2**20


class CorruptCheckpoint(UserError):
    """A checkpoint file exists but cannot be read or lacks required keys."""


def digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes and every
    plain value, walked in a fixed order (dict keys sorted)."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
        elif isinstance(x, dict):
            h.update(b"{")
            for key in sorted(x, key=repr):
                h.update(repr(key).encode())
                walk(x[key])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):  # alike: a loader may return one for the other
            h.update(b"[")
            for item in x:
                walk(item)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through fcmae.run.files.write_atomic: a crash leaves the old file or the new one,
    never half of one. A dict gets a "digest" key, its content's digest(), which read()
    verifies."""
    if isinstance(obj, dict):
        obj = {**obj, DIGEST: digest(obj)}
    write_atomic(path, lambda f: torch.save(obj, f))


def read(path: str | Path) -> Any:
    """The one reader of checkpoint files: .safetensors, or torch files loaded on the CPU with
    weights_only (no pickled code runs). Raises UserError for a path that is not a file and
    CorruptCheckpoint for one that cannot be read."""
    path = Path(path)
    if not path.is_file():
        what = (
            "is a folder"
            if path.is_dir()
            else "is not a regular file (a device, a pipe or a link to one)"
            if path.exists()
            else "does not exist"
        )
        raise UserError(f"Checkpoint {path} {what}; pass a checkpoint file.")
    check_inflated_size(path)
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        # Official checkpoints carry their argparse arguments; allow that one class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign classes: all mean "unusable"
        # torch's first sentence only (its zip reader goes on about reporting the error)
        detail = str(e).splitlines()[0].split(". ")[0] if str(e) else "no detail"
        if "weights_only" in detail or "Weights only load failed" in detail:
            detail = "it holds pickled objects other than tensors and plain data"
        raise CorruptCheckpoint(
            f"Checkpoint {path} cannot be read ({type(e).__name__}: "
            f"{detail}); pass a .pth/.pt/.bin/.safetensors file written by "
            f"torch."
        ) from e
    if isinstance(state, dict) and DIGEST in state:  # written by save_atomic: verify it
        expected = state.pop(DIGEST)
        if digest(state) != expected:
            raise CorruptCheckpoint(
                f"Checkpoint {path} was damaged after it was written (its content does not "
                f"match its digest); use an earlier checkpoint or the run's other copy."
            )
    return state


def _read_safetensors(path: Path) -> dict[str, Any]:
    """A .safetensors file's tensors; with the pixel statistics its metadata records (an
    export of fcmae's), {"state_dict": tensors, "pixel_stats": ...}."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        stats = (f.metadata() or {}).get("pixel_stats")
    tensors = load_file(path)
    return {"state_dict": tensors, "pixel_stats": stats} if stats else tensors


def check_inflated_size(path: Path) -> None:
    """Refuse a zip checkpoint whose members would inflate past INFLATE_RATIO x its size plus
    INFLATE_MARGIN, from the sizes its directory declares (the reader allocates no more than
    those), before anything is read. Other files pass: torch.load reads them as they are."""
    if not zipfile.is_zipfile(path):
        return
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return  # torch.load says what is wrong with it
    if inflated > INFLATE_RATIO * size + INFLATE_MARGIN:
        raise CorruptCheckpoint(
            f"Checkpoint {path} would inflate from {size / 2**20:.1f} MiB to "
            f"{inflated / 2**20:.0f} MiB, far more than a torch checkpoint does (it is "
            f"stored uncompressed): it is not one, or it is damaged; pass a checkpoint written "
            f"by torch."
        )


def load(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """read() a training checkpoint; raise CorruptCheckpoint if it lacks a required key."""
    state = read(path)
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise CorruptCheckpoint(
            f"Checkpoint {path} lacks {', '.join(missing)}: it is not a training checkpoint; "
            f"resume from a checkpoints/checkpoint-NNNN.pth of an fcmae run (or --resume auto)."
        )
    return state
