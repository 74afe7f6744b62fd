"""Hooks a job gives the engine, and the small view of the run they see."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fcmae.run.metrics import Metrics
from fcmae.run.run import Run
from fcmae.train.runtime import Runtime


@dataclass
class Context:
    """What a callback sees of a run; the engine keeps epoch and step current."""

    model: nn.Module  # the plain module, not the DDP or compiled wrapper
    epochs: int  # the run's length
    run: Run  # its files: run.file(name) claims one to write
    runtime: Runtime  # device, precision, dist (rank, is_main), loader(), autocast()
    metrics: Metrics | None  # the main process's metrics; None on the others
    save_checkpoint: Callable[[str], Path]  # a tagged checkpoint, e.g. "best": all ranks call
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken


class Callback:
    """Subclass and override what you need. Called on every rank."""

    def on_step_end(self, ctx: Context) -> None:
        """After each optimizer step."""

    def on_epoch_end(self, ctx: Context) -> dict[str, Any] | None:
        """After each epoch (ctx.epoch: completed epochs); returned metrics join the epoch
        record."""
        return None
