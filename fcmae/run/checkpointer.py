"""A run's training checkpoints: what they hold, saving, restoring and pruning them.

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
from fcmae.run.checkpoint import CorruptCheckpoint, load, save_atomic
from fcmae.run.rundir import RunDir
from fcmae.train import distributed as dist
from fcmae.train.runtime import seed_everything

log = logging.getLogger("fcmae")

REQUIRED = ("model", "epoch")  # what makes a file a training checkpoint


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


class Checkpointer:
    """Saves and restores a run's TrainState in its RunDir, as one of the run's processes.

    resume: "auto" (the newest readable checkpoint of the run, if any), "none" (refused when
    the run already has checkpoints) or a checkpoint path, which is read now, before the run
    directory is touched. exports: kind -> fn(model) -> object written as KIND-NNNN.pth.
    """

    def __init__(
        self,
        run_dir: RunDir,
        process: dist.DistInfo,
        resume: str,
        config: dict[str, Any],
        keep_last: int,
        seed: int,
        exports: dict[str, Callable[[nn.Module], Any]] | None = None,
    ):
        self.run_dir, self.process, self.resume, self.config = run_dir, process, resume, config
        self.keep_last, self.seed = keep_last, seed
        self.exports = dict(exports or {})
        self._resume_file: tuple[Path, dict] | None = None
        if resume == "none" and run_dir.numbered():
            raise UserError(
                f"{run_dir.checkpoints} already holds checkpoints; pass --resume auto to "
                f"continue that run, or another --output-dir to start anew."
            )
        if resume not in ("auto", "none"):
            path = Path(resume)
            if not path.is_file():
                raise UserError(
                    f"--resume {path} does not exist; pass a checkpoint file, auto or none."
                )
            self._resume_file = path, load(path, REQUIRED)

    def resume_settings(self) -> dict[str, Any] | None:
        """The settings saved in the --resume file, when one is named and has them."""
        config = self._resume_file[1].get("config") if self._resume_file else None
        return config if isinstance(config, dict) else None

    def save(self, state: TrainState, tag: int | str | None = None) -> Path:
        """Write the full training state (all ranks call; rank 0 writes).

        tag: None numbers the file by completed epochs and prunes to keep_last; a string such
        as "best" writes checkpoint-best.pth, which pruning never touches.
        """
        rngs = dist.all_gather_object(rng_state())
        tag = state.epoch if tag is None else tag
        path = self.run_dir.file(tag)
        if self.process.is_main:
            for kind, export in self.exports.items():
                save_atomic(export(state.model), self.run_dir.file(tag, kind), "--output-dir")
            save_atomic(
                {
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
                },
                path,
                "--output-dir",
            )
            if isinstance(tag, int):
                self.run_dir.prune(self.keep_last, tuple(self.exports))
        if isinstance(tag, int):
            state.last_checkpoint = path
        dist.barrier()
        return path

    def restore(self, state: TrainState) -> None:
        """Load the checkpoint that resume names into state, if there is one."""
        found = self._find()
        if found is None:
            return
        path, saved = found
        try:
            state.model.load_state_dict(saved["model"])
            state.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"Checkpoint {path} does not fit this model or optimizer ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no detail'}); resume with the same "
                f"--model and settings it was written with, or pass another --output-dir."
            ) from None
        if state.scaler.is_enabled() and saved.get("scaler"):
            state.scaler.load_state_dict(saved["scaler"])
        saved_extra = saved.get("extra") or {}
        missing = [name for name in state.extra if name not in saved_extra]
        if missing:
            raise UserError(
                f"Checkpoint {path} holds no {' or '.join(missing)} state, so it was written "
                f"with other settings; resume with the settings it was written with (its "
                f"config), or pass another --output-dir."
            )
        for name, obj in state.extra.items():
            obj.load_state_dict(saved_extra[name])
        state.epoch, state.global_step = saved["epoch"], saved["step"]
        rank, world_size = self.process.rank, self.process.world_size
        if len(saved["rng"]) == world_size:
            set_rng_state(saved["rng"][rank])
        else:
            log.warning(
                "Checkpoint was written by %d processes, this run has %d: random states "
                "are re-seeded, so the run continues but is not bit-identical.",
                len(saved["rng"]),
                world_size,
            )
            seed_everything(self.seed, rank, 1 + state.epoch)
        state.last_checkpoint = path
        log.info("Resumed from %s (epoch %d, step %d).", path, state.epoch, state.global_step)

    def _find(self) -> tuple[Path, dict] | None:
        if self.resume == "none":
            return None
        if self.resume != "auto":
            found, self._resume_file = self._resume_file, None  # the memory goes with the model
            return found
        # Rank 0 picks (and logs skipped corrupt files); the others load the same file, so
        # multi-node resume needs the output dir on a shared filesystem.
        found = self.newest_valid() if self.process.is_main else None
        path = dist.broadcast_object(str(found[0]) if found else None)
        if path is None:
            return None
        return Path(path), found[1] if found else load(Path(path), REQUIRED)

    def newest_valid(self) -> tuple[Path, dict] | None:
        """The newest numbered checkpoint that loads, skipping (and logging) corrupt ones.

        None when the run has no numbered checkpoint; UserError when it has some but none is
        readable, since starting over would silently discard the run.
        """
        candidates = self.run_dir.numbered()
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
                f"No readable checkpoint in {self.run_dir.checkpoints}; remove the corrupt "
                f"files or pass --resume none with a new --output-dir to start over."
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
