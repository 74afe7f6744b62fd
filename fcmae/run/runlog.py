"""What a run writes while it trains: console and file log, JSON-lines metrics, TensorBoard,
and a one-line progress display with loss, lr, img/s and ETA. Main process only."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from fcmae.run.files import disk_error, write_text_atomic

log = logging.getLogger("fcmae")


def setup_logging(run_dir: Path | None, rank: int) -> list[logging.Handler]:
    """Logging of the "fcmae" logger to the console (unless a caller, such as the CLI, set it
    up already) and, on the main process, to run_dir/log.txt. Returns the handlers added, for
    close_logging: the console outlives a run that the CLI started.

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
    if run_dir is not None and rank == 0:
        path = run_dir / "log.txt"
        try:
            file = LogFile(path, encoding="utf-8", errors="backslashreplace")
        except OSError as e:
            raise disk_error(path, e, "--output-dir") from None
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
            print(f"fcmae: warning: {disk_error(self.baseFilename, error)}", file=sys.stderr)


def log_to_file(message: str) -> None:
    """An error line in log.txt alone (the console already shows it, as the CLI reports it)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for h in log.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)


def close_logging(handlers: list[logging.Handler]) -> None:
    for h in handlers:
        log.removeHandler(h)
        h.close()


class MetricsWriter:
    """Appends records to run_dir/metrics.jsonl and their numbers to TensorBoard (run_dir/tb).

    On resume, purge_step drops what the interrupted run logged after its last checkpoint, in
    both the JSON lines and the TensorBoard events, so curves have no doubled segments.
    """

    def __init__(self, run_dir: Path, purge_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow

        self.path = run_dir / "metrics.jsonl"
        purge_step = purge_step or None  # a fresh run keeps nothing to purge
        if self.path.exists():
            self._purge(purge_step)
        try:
            self.file = open(self.path, "a")
            # TensorBoard purges events at steps >= purge_step; the checkpoint's own step stays.
            self.tb = SummaryWriter(
                str(run_dir / "tb"), purge_step=None if purge_step is None else purge_step + 1
            )
        except OSError as e:
            raise disk_error(run_dir, e, "--output-dir") from None

    def _purge(self, purge_step: int | None) -> None:
        """Keep the records up to purge_step (all without one), dropping lines that are not
        JSON: the half line a crash or a full disk leaves at the end, with a warning."""
        kept, broken = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                broken += bool(line.strip())
                continue
            if (
                purge_step is None
                or not isinstance(record, dict)
                or record.get("step", 0) <= purge_step
            ):
                kept.append(line)
        if broken:
            log.warning(
                "Dropping %d unreadable line(s) of %s (cut off when a run stopped mid-write).",
                broken,
                self.path,
            )
        if broken or purge_step is not None:
            write_text_atomic(self.path, "".join(line + "\n" for line in kept), "--output-dir")

    def write(self, record: dict[str, Any]) -> None:
        """record: {"type": "step"|"epoch"|..., "step": int, <name>: number, ...}."""
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:
            raise disk_error(self.path, e, "--output-dir") from None
        for key, value in record.items():
            if key not in ("type", "step") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def write_run(
        self, runtime: Any, plan: Any, step: int, changes: dict[str, tuple[Any, Any]] | None = None
    ) -> None:
        """The record that opens a run (or its resumption): where it runs and how it batches;
        runtime: fcmae.train.runtime.Runtime, plan: fcmae.train.optim.BatchPlan. Also logged.
        changes: settings that --accept-changes let change on this resume, {key: (old, new)},
        recorded as a "changed" record."""
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
        self.write(
            {
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
        )
        if changes:
            values = {key: {"from": old, "to": new} for key, (old, new) in changes.items()}
            self.write({"type": "changed", "step": step, "changes": values})

    def add_image(self, tag: str, image: Any, step: int) -> None:
        """An (H, W, 3) uint8 picture into TensorBoard."""
        self.tb.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self.file.close()
        self.tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
