"""Experiment trackers as sinks of a run: MLflow (fcmae.track.mlflow_tracker) and Weights &
Biases (fcmae.track.wandb_tracker), fed from a run directory's files and records.

    trackers = connect(cfg.track)        # at Run.open: each reachable, or one sentence
                                         # (fcmae.track.connect)
    sinks = Sinks(trackers, folder)      # folder: fcmae.track.folder.RunFolder
    sinks.start()                        # the tracker run, its parameters and tags, and
                                         # what the folder holds that the tracker lacks
    sinks.log(record); sinks.picture(path, step)
    sinks.finish("FINISHED")             # the documents, the final exports, the status

A tracker run is found again through RUN/trackers.json, so a resumed run continues it and
`fcmae track` adds only what it lacks. A tracker that fails once it was reached costs one
warning: the run goes on without it, and its directory stays complete.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fcmae.errors import cut
from fcmae.track.folder import RunFolder

log = logging.getLogger("fcmae")


@dataclass
class Parent:
    """The tracker runs a run nests under (a sweep's), and the tags the nested run carries."""

    runs: dict[str, str] = field(default_factory=dict)  # tracker -> the parent's id there
    tags: dict[str, str] = field(default_factory=dict)  # e.g. {"sweep.key": "mask_ratio"}


_PARENT: contextvars.ContextVar[Parent | None] = contextvars.ContextVar("parent", default=None)


@contextlib.contextmanager
def nested(parent: Parent) -> Iterator[None]:
    """Runs started inside the block nest under parent (a sweep's points)."""
    token = _PARENT.set(parent)
    try:
        yield
    finally:
        _PARENT.reset(token)


class Tracker:
    """One tracker, connected; it mirrors one run at a time. ``where`` names it in sentences
    (its URI)."""

    name = ""  # as --track names it
    title = ""  # as a sentence does
    where = ""

    def start(self, folder: RunFolder, parent: Parent | None) -> None:
        """Open the folder's tracker run (the one trackers.json names, else a new one, nested
        under parent), record its parameters and tags, and add the metrics and pictures that
        the folder holds and the tracker lacks."""
        raise NotImplementedError

    def log(self, record: dict[str, Any]) -> None:
        """One record of metrics.jsonl, as the run writes it."""
        raise NotImplementedError

    def picture(self, path: Path, step: int) -> None:
        """A picture the run wrote (recon/epoch-NNNN.png)."""
        raise NotImplementedError

    def finish(self, folder: RunFolder, status: str) -> None:
        """The folder's documents and final exports, then how the run ended, in MLflow's
        words: FINISHED, FAILED or KILLED (interrupted, or incomplete)."""
        raise NotImplementedError

    def behind(self, folder: RunFolder) -> bool:
        """Whether the tracker lacks something of folder (`fcmae track` leaves it if not)."""
        raise NotImplementedError

    def parent_id(self, folder: RunFolder) -> str:
        """What runs nested under the one started for folder name it by (Parent.runs)."""
        raise NotImplementedError


def fcmae_version() -> str:
    """The installed fcmae's version."""
    try:
        return version("fcmae")
    except PackageNotFoundError:
        return "unknown"


def reason(error: BaseException) -> str:
    """A failure in a few words: the innermost connection error, else the first line."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError):
            return "connection refused"
        if isinstance(seen, TimeoutError):
            return "timed out"
        seen = seen.__cause__ or seen.__context__
    text = str(error).strip().splitlines()
    if any("Connection refused" in line for line in text):
        return "connection refused"
    return cut(text[0] if text else type(error).__name__, 160)


class Sinks:
    """The trackers of one run folder; a tracker that fails is said once and then dropped."""

    def __init__(self, trackers: list[Tracker], folder: RunFolder):
        self.trackers, self.folder = list(trackers), folder
        self.step = 0

    def start(self) -> None:
        parent = _PARENT.get()
        for tracker in list(self.trackers):
            self._guard(tracker, "as the run began", lambda t: t.start(self.folder, parent))

    def log(self, record: dict[str, Any]) -> None:
        self.step = record.get("step", self.step)
        for tracker in list(self.trackers):
            self._guard(tracker, f"at step {self.step}", lambda t: t.log(record))

    def picture(self, path: Path, step: int) -> None:
        for tracker in list(self.trackers):
            self._guard(tracker, f"at step {step}", lambda t: t.picture(path, step))

    def parent(self, tags: dict[str, str]) -> Parent:
        """What a run nested under this one is given (a sweep's point), with its tags."""
        parent = Parent(tags=tags)
        for tracker in list(self.trackers):

            def note(t: Tracker) -> None:
                parent.runs[t.name] = t.parent_id(self.folder)

            self._guard(tracker, "at a sweep's point", note)
        return parent

    def finish(self, status: str) -> None:
        for tracker in list(self.trackers):
            self._guard(tracker, "as the run ended", lambda t: t.finish(self.folder, status))
        self.trackers = []

    def _guard(self, tracker: Tracker, when: str, call: Callable[[Tracker], None]) -> None:
        try:
            call(tracker)
        except Exception as error:  # a tracker's failure never stops the run
            self.trackers.remove(tracker)
            log.warning(
                "%s at %s failed %s (%s): the run goes on without it, and %s stays complete; "
                "`fcmae track %s --track %s` adds what it missed once it answers.",
                tracker.title,
                tracker.where,
                when,
                reason(error),
                self.folder.path,
                self.folder.path,
                tracker.name,
            )
