"""The metric sinks of a run (main process only): RUN/metrics.jsonl, one JSON record per line,
the same numbers in TensorBoard (RUN/tb) and in the experiment trackers (fcmae.track), which
also receive the run's pictures. A failed write (a full disk) is one sentence, in
either sink: TensorBoard writes on a thread of its own, whose failure is reported here, at the
next record, instead of as a traceback of that thread."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from fcmae.run import layout
from fcmae.run.files import write_error, write_text_atomic, writing

log = logging.getLogger("fcmae")


class Metrics:
    """Appends records to RUN/metrics.jsonl and their numbers to TensorBoard (RUN/tb).

    On resume, purge_step drops what the interrupted run logged after its last checkpoint, in
    both the JSON lines and the TensorBoard events, so curves have no doubled segments.
    """

    def __init__(self, root: Path, purge_step: int = 0, trackers: Any = None):
        from torch.utils.tensorboard import SummaryWriter  # imported here: it is slow

        self.path, self.tb_path = root / layout.METRICS, root / layout.TENSORBOARD
        if self.path.exists():  # a start from scratch keeps nothing of an earlier one
            self._purge(purge_step)
        with writing(self.path):
            self.file = open(self.path, "a")
        _quiet_tensorboard_threads()
        with writing(self.tb_path):
            # TensorBoard purges events at steps >= purge_step; the checkpoint's own step stays.
            self.tb = SummaryWriter(str(self.tb_path), purge_step=purge_step + 1)
        self.trackers = trackers  # a fcmae.track.trackers.Sinks, or None
        if trackers:  # after the purge: they catch up with what the run directory holds
            trackers.start()

    def _purge(self, purge_step: int) -> None:
        """Keep the records up to purge_step, the step of the checkpoint the run continues
        from (none when it starts from scratch: 0), dropping lines that are not JSON (the half
        line a crash or a full disk leaves at the end) with a warning."""
        kept, broken = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                broken += bool(line.strip())
                continue
            step = record.get("step", 0) if isinstance(record, dict) else 0
            if purge_step and step <= purge_step:
                kept.append(line)
        if broken:
            log.warning(
                "Dropping %d unreadable line(s) of %s (cut off when a run stopped mid-write).",
                broken,
                self.path,
            )
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        """record: {"type": "step"|"epoch"|..., "step": int, <name>: number, ...}."""
        with writing(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        with writing(self.tb_path):
            for key, value in record.items():
                if key not in ("type", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])
        if self.trackers:
            self.trackers.log(record)

    def picture(self, path: Path, image: Any, step: int) -> None:
        """A picture the run wrote at path (RUN/recon/...), image its (H, W, 3) uint8 pixels:
        into TensorBoard under the folder's name, and to the trackers."""
        with writing(self.tb_path):
            self.tb.add_image(path.parent.name, image, step, dataformats="HWC")
        if self.trackers:
            self.trackers.picture(path, step)

    def close(self, status: str = "FINISHED") -> None:
        """Close every sink (each is tried); a failed last write is one sentence. status: how
        the run ended, for the trackers (fcmae.track.trackers.STATUSES)."""
        try:
            with writing(self.path):
                self.file.close()
        finally:
            try:
                with writing(self.tb_path):
                    self.tb.close()
            finally:
                if self.trackers:
                    self.trackers.finish(status)


def parse_record(line: str) -> dict[str, Any] | None:
    """One line of metrics.jsonl as a record (a JSON object with a "type" and an integer
    "step"), or None when it is blank, cut off or not a record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("type"), str):
        return None
    step = record.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return None
    return record


def _quiet_tensorboard_threads() -> None:
    """TensorBoard's writer thread re-raises a failed write, which Python prints as a traceback
    ("Exception in thread"); the same error is raised again at the next write of the main
    thread, where Metrics turns it into a sentence. So that thread's disk errors print nothing."""
    if getattr(threading.excepthook, "_fcmae", False):
        return
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and write_error("", args.exc_value):
            return
        previous(args)

    hook._fcmae = True  # type: ignore[attr-defined]
    threading.excepthook = hook
