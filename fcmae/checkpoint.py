"""Checkpoint files: atomic writes, the newest K kept, auto-resume with corrupt-file fallback.

A run directory's checkpoints live in `<run>/checkpoints/`:

    checkpoint-0010.pth   full training state after 10 epochs (see Engine for the keys)
    encoder-0010.pth      exports beside it, e.g. the encoder alone in the dense layout
    checkpoint-best.pth   tagged checkpoints (fine-tuning's best) are never pruned

Everything is saved as tensors and plain Python data so that `torch.load(weights_only=True)`
reads it: no pickled classes, no numpy arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fcmae.errors import UserError

log = logging.getLogger("fcmae")

_NUMBERED = re.compile(r"checkpoint-(\d+)\.pth")
DIGEST = "digest"  # the key under which save_atomic stores the content's digest


class CorruptCheckpoint(UserError):
    """A checkpoint file exists but cannot be read or lacks required keys."""


def checkpoint_path(directory: Path, epoch: int | str, prefix: str = "checkpoint") -> Path:
    """`<directory>/<prefix>-0010.pth` for an epoch number, `<prefix>-best.pth` for a tag."""
    name = f"{epoch:04d}" if isinstance(epoch, int) else epoch
    return Path(directory) / f"{prefix}-{name}.pth"


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
    """torch.save to a temporary file in the same directory, fsync, then rename over path.

    A crash at any moment leaves either the old file or the new one, never half of one. A
    dict gets a "digest" key, its content's digest(), which read() verifies.
    """
    path = Path(path)
    if isinstance(obj, dict):
        obj = {**obj, DIGEST: digest(obj)}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def numbered_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of `checkpoint-NNNN.pth` files, newest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in directory.iterdir() if (m := _NUMBERED.fullmatch(p.name))
    ]
    return sorted(found, reverse=True)


def prune(directory: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last numbered checkpoints and the exports beside them."""
    for epoch, _ in numbered_checkpoints(directory)[keep_last:]:
        for sibling in Path(directory).glob(f"*-{epoch:04d}.pth"):
            sibling.unlink(missing_ok=True)


def writable(path: str | Path, flag: str, folder: bool = False) -> Path:
    """Make sure path (a file to write, or with folder=True a folder to write into) can be
    written before any work is done: its folder is created and probed. UserError naming flag."""
    path = Path(path)
    where = path if folder else path.parent
    try:
        if not folder and path.is_dir():
            raise UserError(f"{flag} {path} is a folder; pass a file name.")
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(
            f"Cannot write {flag} {path} ({e.strerror or type(e).__name__}); pass a path in a "
            f"writable folder."
        ) from None
    return path


def remove_leftovers(directory: Path) -> None:
    """Delete what an interrupted save leaves: temporary files, and numbered exports whose
    checkpoint was never written (save_checkpoint writes the exports first)."""
    directory = Path(directory)
    saved = {epoch for epoch, _ in numbered_checkpoints(directory)}
    for path in directory.iterdir():
        number = re.fullmatch(r"[a-z_]+-(\d+)\.pth", path.name)
        orphan = number is not None and int(number.group(1)) not in saved
        if (path.name.startswith(".") and ".tmp" in path.name) or orphan:
            log.info("Removing %s, left by an interrupted save.", path)
            path.unlink(missing_ok=True)


def read(path: str | Path) -> Any:
    """The one reader of checkpoint files: .safetensors, or torch files loaded on the CPU with
    weights_only (no pickled code runs). Raises UserError for a missing file and
    CorruptCheckpoint for one that cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint {path} does not exist; check the path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        # Official checkpoints carry their argparse arguments; allow that one class.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign classes: all mean "unusable"
        detail = str(e).splitlines()[0] if str(e) else "no detail"
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


def newest_valid(directory: Path, required: tuple[str, ...] = ()) -> tuple[Path, dict] | None:
    """The newest numbered checkpoint that loads, skipping (and logging) corrupt ones.

    Returns None when the directory holds no numbered checkpoint; raises UserError when it
    holds some but none is readable, since starting over would silently discard the run.
    """
    candidates = numbered_checkpoints(directory)
    for i, (_, path) in enumerate(candidates):
        try:
            return path, load(path, required)
        except CorruptCheckpoint as e:
            following = candidates[i + 1][1].name if i + 1 < len(candidates) else None
            log.warning(
                "%s Skipping it%s.",
                e,
                f"; trying the previous one, {following}" if following else "",
            )
    if candidates:
        raise UserError(
            f"No readable checkpoint in {directory}; remove the corrupt files or "
            f"pass --resume none with a new --output-dir to start over."
        )
    return None


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain data (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
