"""A run's training checkpoints in RUN/checkpoints/: what they hold, saving, finding, restoring and
pruning them. Only the files the run's manifest records are found, cleaned up or pruned.

A checkpoint holds {"model", "optimizer", "scaler", "epoch", "step", "steps_per_epoch", "rng"
(one state per rank), "config", "extra", "world_size"}, all loadable with
torch.load(weights_only=True). Exports (e.g. the encoder alone) are written beside it, before
it: a checkpoint on disk means its exports are too.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from fcmae.errors import UserError
from fcmae.run import layout
from fcmae.run.checkpoint import CorruptCheckpoint, load, save_atomic
from fcmae.run.manifest import Manifest
from fcmae.train import distributed as dist
from fcmae.train.runtime import seed_everything

log = logging.getLogger("fcmae")

REQUIRED = ("model", "epoch")  # what makes a file a training checkpoint
Exports = dict[str, Callable[[nn.Module], Any]]  # kind -> fn(model) -> what KIND-NNNN.pth holds


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainState:
    """What a checkpoint holds and a resume restores (besides config and random states)."""

    model: nn.Module  # the plain module, not the DDP or compiled wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    extra: dict[str, Stateful] = field(default_factory=dict)
    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps
    last_checkpoint: Path | None = None


class Checkpoints:
    """The checkpoints of one run (folder: RUN/checkpoints), as one of the run's processes.

    config: the run's settings, saved in every checkpoint. keep_last: numbered checkpoints
    kept (with their exports); tagged ones ("best") are never pruned.
    """

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        process: dist.DistInfo,
        config: dict[str, Any],
        keep_last: int,
        seed: int,
    ):
        self.folder, self.manifest, self.process = folder, manifest, process
        self.config, self.keep_last, self.seed = config, keep_last, seed

    def file(self, tag: int | str, kind: str = layout.CHECKPOINT) -> Path:
        """Where a checkpoint or export of this run lives; see layout.file_name."""
        return self.folder / layout.file_name(tag, kind)

    def numbered(self, kind: str = layout.CHECKPOINT) -> list[tuple[int, Path]]:
        """(epoch, path) of the run's own numbered files of kind that exist, newest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.iterdir():
            epoch = layout.numbered(path.name, kind)
            if epoch is not None and path in self.manifest:
                found.append((epoch, path))
        return sorted(found, reverse=True)

    def newest_valid(self) -> tuple[Path, dict] | None:
        """The newest numbered checkpoint that loads, skipping (and logging) corrupt ones.

        None when the run has no numbered checkpoint; UserError when it has some but none is
        readable, since starting over would silently discard the run.
        """
        candidates = self.numbered()
        for i, (_, path) in enumerate(candidates):
            try:
                return path, load(path, REQUIRED)
            except CorruptCheckpoint as e:
                following = candidates[i + 1][1].name if i + 1 < len(candidates) else None
                log.warning(
                    "%s Skipping it%s.",
                    e,
                    f"; trying the previous one, {following}" if following else "",
                )
        if candidates:
            raise UserError(
                f"No readable checkpoint in {self.folder}; remove the corrupt files or pass "
                f"--resume none with a new --output-dir to start over."
            )
        return None

    def remove_leftovers(self) -> None:
        """Delete what an interrupted save of this run left: staging files of its own files,
        and numbered exports whose checkpoint was never written (exports are written first).
        Files the run did not write are left alone."""
        saved = {epoch for epoch, _ in self.numbered()}
        orphans = []
        for path in self.folder.iterdir() if self.folder.is_dir() else ():
            epoch = layout.numbered(path.name, path.name.partition("-")[0])
            if epoch is not None and epoch not in saved and path in self.manifest:
                orphans.append(path)
        for path in self.manifest.temporaries(self.folder) + orphans:
            log.info("Removing %s, left by an interrupted save.", path)
            path.unlink(missing_ok=True)
            if path in orphans:
                self.manifest.forget(path)

    def save(self, state: TrainState, exports: Exports, tag: int | str | None = None) -> Path:
        """Write the full training state (all ranks call; rank 0 writes), its exports first.

        tag: None numbers the file by completed epochs and prunes to keep_last; a string such
        as "best" writes checkpoint-best.pth, which pruning never touches.
        """
        rngs = dist.all_gather_object(rng_state())
        tag = state.epoch if tag is None else tag
        path = self.file(tag)
        if self.process.is_main:
            for kind, export in exports.items():
                save_atomic(export(state.model), self.manifest.claim(self.file(tag, kind)))
            content = {
                "model": state.model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scaler": state.scaler.state_dict(),
                "epoch": state.epoch,
                "step": state.global_step,
                "steps_per_epoch": state.steps_per_epoch,
                "rng": rngs,
                "config": self.config,
                "extra": {name: obj.state_dict() for name, obj in state.extra.items()},
                "world_size": len(rngs),
            }
            save_atomic(content, self.manifest.claim(path))
            if isinstance(tag, int):
                self.prune()
        if isinstance(tag, int):
            state.last_checkpoint = path
        dist.barrier()
        return path

    def prune(self) -> None:
        """Delete all but the newest keep_last numbered checkpoints, with their exports."""
        for epoch, _ in self.numbered()[self.keep_last :]:
            for path in self.folder.glob(f"*-{epoch:04d}.pth"):
                if layout.numbered(path.name, path.name.partition("-")[0]) == epoch:
                    self.manifest.forget(path)

    def restore(self, state: TrainState, saved: tuple[Path, dict]) -> None:
        """Load a checkpoint, (path, content), into state."""
        path, content = saved
        try:
            state.model.load_state_dict(content["model"])
            state.optimizer.load_state_dict(content["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"Checkpoint {path} does not fit this model or optimizer ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no detail'}); resume with the same "
                f"--model and settings it was written with, or pass another --output-dir."
            ) from None
        if state.scaler.is_enabled() and content.get("scaler"):
            state.scaler.load_state_dict(content["scaler"])
        saved_extra = content.get("extra") or {}
        missing = [name for name in state.extra if name not in saved_extra]
        if missing:
            raise UserError(
                f"Checkpoint {path} holds no {' or '.join(missing)} state, so it was written "
                f"with other settings; resume with the settings it was written with (its "
                f"config), or pass another --output-dir."
            )
        for name, obj in state.extra.items():
            obj.load_state_dict(saved_extra[name])
        state.epoch, state.global_step = content["epoch"], content["step"]
        rank, world_size = self.process.rank, self.process.world_size
        if len(content["rng"]) == world_size:
            set_rng_state(content["rng"][rank])
        else:
            log.warning(
                "Checkpoint was written by %d processes, this run has %d: random states "
                "are re-seeded, so the run continues but is not bit-identical.",
                len(content["rng"]),
                world_size,
            )
            seed_everything(self.seed, rank, 1 + state.epoch)
        state.last_checkpoint = path
        log.info("Resumed from %s (epoch %d, step %d).", path, state.epoch, state.global_step)


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
    if torch.backends.mps.is_available():  # masks drawn on an Apple GPU use its generator
        state["mps"] = torch.mps.get_rng_state()
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
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])
