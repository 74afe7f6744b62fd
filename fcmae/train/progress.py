"""What the loop shows while it trains: the statistics of an epoch (Meter), the progress line
with loss, lr, img/s and ETA, and the lines that end an epoch and a run."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fcmae")


def log_epoch(record: dict[str, Any], epochs: int) -> None:
    """The console and log.txt line of an epoch record."""
    skipped = record["skipped_images"]
    log.info(
        "epoch %d/%d  loss %.4f  %.1f img/s  %s%s",
        record["epoch"],
        epochs,
        record["loss"],
        record["img_per_s"],
        format_duration(record["time_s"]),
        f"  skipped {skipped} unreadable images" if skipped else "",
    )


class Meter:
    """Step statistics of one epoch, summed for the epoch and for the current logging window.

    add() takes one optimizer step's statistics averaged over ranks: "loss", "images" and
    "skipped" (per rank), and the step's own metrics.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.start = self.window_start = time.perf_counter()
        self.steps = self.window_steps = 0
        self.totals: dict[str, float] = {}
        self.window_totals: dict[str, float] = {}

    def add(self, stats: dict[str, float]) -> None:
        for totals in (self.totals, self.window_totals):
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
        self.steps += 1
        self.window_steps += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def window(self) -> dict[str, float]:
        """Mean loss and metrics, and img/s, since the last call; starts a new window."""
        now = time.perf_counter()
        totals, steps = self.window_totals, self.window_steps
        record = {k: v / steps for k, v in totals.items() if k not in ("images", "skipped")}
        record["img_per_s"] = totals["images"] * self.world_size / (now - self.window_start)
        self.window_totals, self.window_steps, self.window_start = {}, 0, now
        return record

    def epoch(self) -> dict[str, float]:
        """The epoch record's numbers: mean loss, img/s, time_s and skipped_images."""
        elapsed = self.elapsed()
        return {
            "loss": self.totals["loss"] / self.steps,
            "img_per_s": self.totals["images"] * self.world_size / elapsed,
            "time_s": elapsed,
            "skipped_images": round(self.totals["skipped"] * self.world_size),
        }


def log_nothing_to_do(run_dir: Path, epochs: int) -> None:
    log.info(
        "Nothing to do: the run in %s already finished %d epochs (raise --epochs to train longer).",
        run_dir,
        epochs,
    )


def log_done(checkpoint: Path | None, exports: dict[str, Path], run_dir: Path) -> None:
    """The line that ends a run: where its checkpoint, exports and logs are."""
    exported = "".join(f", {kind} alone in {path.name}" for kind, path in exports.items())
    log.info(
        "Done. Checkpoint: %s%s. Logs: %s/log.txt, metrics.jsonl; TensorBoard: "
        "tensorboard --logdir %s/tb",
        checkpoint,
        exported,
        run_dir,
        run_dir,
    )


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A progress line: redrawn in place on a terminal, printed about ten times an epoch in
    files (cluster logs), where carriage returns would pile up."""

    def __init__(self, epochs: int, steps_per_epoch: int, stream=None):
        self.epochs, self.steps = epochs, steps_per_epoch
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.last_draw = 0.0

    def update(self, epoch: int, i: int, record: dict[str, Any], eta_s: float) -> None:
        """epoch and i are 0-based; i is the optimizer step within the epoch just finished;
        record: the step record (loss, lr, img_per_s)."""
        line = (
            f"epoch {epoch + 1}/{self.epochs}  step {i + 1}/{self.steps}  "
            f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['img_per_s']:.1f} img/s  eta {format_duration(eta_s)}"
        )
        if self.tty:
            now = time.monotonic()
            if now - self.last_draw > 0.2 or i + 1 == self.steps:
                self.stream.write("\r" + line.ljust(100))
                self.stream.flush()
                self.last_draw = now
        elif (i + 1) % max(1, self.steps // 10) == 0 or i + 1 == self.steps:
            log.info(line)

    def end_epoch(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_record(runtime: Any, plan: Any, step: int) -> dict[str, Any]:
    """The record that opens a run (or its resumption), also logged: where it runs and how it
    batches; runtime: fcmae.train.runtime.Runtime, plan: fcmae.train.optim.BatchPlan."""
    world_size = runtime.dist.world_size
    log.info(
        "Device %s x %d processes, precision %s; effective batch %d = %d per device x %d "
        "processes x %d accumulation steps; lr %.3g; %d steps per epoch.",
        runtime.device,
        world_size,
        runtime.precision,
        plan.effective_batch,
        plan.effective_batch // world_size // plan.accum_iter,
        world_size,
        plan.accum_iter,
        plan.peak_lr,
        plan.steps_per_epoch,
    )
    return {
        "type": "run",
        "step": step,
        "world_size": world_size,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "effective_batch": plan.effective_batch,
        "accum_iter": plan.accum_iter,
        "lr": plan.peak_lr,
        "steps_per_epoch": plan.steps_per_epoch,
    }
