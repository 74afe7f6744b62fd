"""`fcmae track RUN_DIR ... --track mlflow`: run directories uploaded to trackers from their
files, for runs trained without a tracker, or while it could not be reached.

A tracker gets what it lacks, nothing else, so a second call adds nothing (fcmae.track). A sweep
directory (with its sweep.yaml) is uploaded as the sweep's run with each point's pretraining
nested under it, as `fcmae sweep --track` makes them. A run at work in its directory is refused:
upload it once it ends.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from fcmae.config.tracking import TrackConfig
from fcmae.errors import UserError
from fcmae.experiments.sweep import SWEEP_FILE, claimed
from fcmae.run import layout
from fcmae.run.manifest import Manifest
from fcmae.run.run import hold
from fcmae.track.connect import connect
from fcmae.track.folder import RunFolder
from fcmae.track.trackers import Parent, Tracker, reason

log = logging.getLogger("fcmae")


def run(cfg: TrackConfig) -> None:
    """Upload each of cfg.runs to each tracker of cfg.track."""
    if not cfg.track:
        raise UserError("--track is required: the trackers to upload to, mlflow or wandb.")
    if not cfg.runs:
        raise UserError(
            "Name the run directories to upload: fcmae track RUN_DIR ... --track mlflow."
        )
    trackers = connect(cfg.track)  # each reachable before the first upload
    for path in map(Path, cfg.runs):
        if (path / SWEEP_FILE).is_file():
            upload_sweep(path, trackers)
        else:
            upload_run(path, trackers)


def upload_run(path: Path, trackers: list[Tracker], parent: Parent | None = None) -> bool:
    """The run in path, to the trackers that lack some of it; whether any did."""
    with hold(path, "upload it once it ends"):
        manifest = Manifest(path)
        if not manifest.exists() and (path / layout.CONFIG).is_file():
            manifest.adopt_legacy()  # a run from before manifests: its files are its own
        kept = path / layout.TRACKERS
        if kept.exists() and kept not in manifest:
            raise UserError(
                f"{kept} is in the way: the run did not write it, and fcmae never replaces a "
                f"file it did not write; move it away, then run fcmae track again."
            )
        folder = RunFolder.read(path, manifest.claim)
        status = "FINISHED" if folder.complete() else "KILLED"
        behind = []
        for tracker in trackers:
            with _failing(tracker, folder):
                if tracker.behind(folder):
                    behind.append(tracker)
                    tracker.start(folder, parent)
                    tracker.finish(folder, status)
    said = " and ".join(f"{t.title} at {t.where}" for t in behind or trackers)
    log.info("%s: %s %s.", path, "uploaded to" if behind else "already all in", said)
    return bool(behind)


def upload_sweep(path: Path, trackers: list[Tracker]) -> None:
    """The sweep in path, and each of its points nested under it."""
    key, settings = claimed(path / SWEEP_FILE)
    folder = RunFolder.read_sweep(path, key, settings)
    points = sorted(p for p in path.glob(f"{key}=*") if (p / layout.CONFIG).is_file())
    status = "FINISHED" if folder.complete() else "KILLED"
    added = False
    for tracker in trackers:
        with _failing(tracker, folder):
            behind = tracker.behind(folder)
            added |= behind
            if behind:
                tracker.start(folder, None)
            parent = Parent({tracker.name: tracker.parent_id(folder)})
            for point, other in zip(points, connect((tracker.name,)) * len(points)):
                parent.tags = {"sweep.key": key, "sweep.value": point.name.partition("=")[2]}
                added |= upload_run(point, [other], parent)  # the sweep's instance stays open
            if behind:
                tracker.finish(folder, status)
    done = "uploaded" if added else "already all in the trackers"
    log.info("%s: the sweep of %s and its %d points are %s.", path, key, len(points), done)


@contextlib.contextmanager
def _failing(tracker: Tracker, folder: RunFolder) -> Iterator[None]:
    """A tracker's failure while uploading folder as one sentence."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        raise UserError(
            f"{tracker.title} at {tracker.where} failed while uploading {folder.path} "
            f"({reason(error)}); run the same command again once it answers: what it holds "
            f"is kept, and only the rest is added."
        ) from None
