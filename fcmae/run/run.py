"""The Run: the one owner of everything a training run reads and writes, from open to close.

    runtime = Runtime.for_training(cfg)
    with Run.open(cfg, runtime.dist) as run:        # reads and checks; writes nothing
        Engine(cfg, run, runtime).fit(model, dataset, step, ...)   # calls run.begin()

Opening reads, so that a refusal leaves nothing: the --resume file or the run's newest
readable checkpoint, the run's records and the identity check against all of them
(fcmae.run.identity). ``begin``, once the engine has checked the data against the batch plan,
writes: the main process takes the directory's lock, checks that it can write there, removes
what an interrupted save of its own left, starts log.txt (with what the run said before) and
writes identity.yaml and config.yaml. Every file the run writes is claimed in its manifest first
(fcmae.run.manifest): clean-up and pruning touch only those, and a file of the user's that has
the name of one of the run's is never replaced. The trackers of --track are reached when the run
opens (one that cannot be refuses it) and are sinks beside metrics.jsonl and TensorBoard
(fcmae.track). Closing closes the sinks and releases the lock; a failure while closing never
hides the error that ended the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from fcmae.config.yaml_io import write_yaml
from fcmae.errors import UserError
from fcmae.run import identity, layout
from fcmae.run.checkpoint import load
from fcmae.run.checkpointer import REQUIRED, Checkpoints, Exports, TrainState
from fcmae.run.files import probe, writing
from fcmae.run.logs import close_logging, log_to_file, remembered, setup_logging
from fcmae.run.manifest import Manifest
from fcmae.run.metrics import Metrics
from fcmae.track.connect import connect
from fcmae.track.folder import RunFolder
from fcmae.track.trackers import Sinks, Tracker
from fcmae.train import distributed as dist
from fcmae.train.optim import batch_arithmetic

log = logging.getLogger("fcmae")

Settle = Callable[[dict[str, Any] | None], None]


def settings(cfg: Any, world_size: int) -> tuple[str, dict[str, Any]]:
    """(command, settings) of a run: the command's name, and cfg's values as the run uses them,
    with the effective batch resolved for world_size processes (the number a resume keeps)."""
    command = f"fcmae {cfg.output_root}" if cfg.output_root else type(cfg).__name__
    _, effective, _ = batch_arithmetic(cfg, world_size)
    return command, {**cfg.to_dict(), layout.EFFECTIVE: effective}


class Run:
    """One training run's directory (``path``), as one of the run's processes.

    cfg: a fcmae.config.commands.TrainConfig; its output_dir is the directory. Use ``open``.
    """

    def __init__(self, cfg: Any, process: dist.DistInfo, settle: Settle | None = None):
        self.cfg, self.process = cfg, process
        if cfg.output_dir is None:
            raise UserError("The run has no --output-dir; pass one.")
        self.path = Path(cfg.output_dir)
        self.manifest = Manifest(self.path)
        # What the run says before it begins goes to log.txt too, once it exists.
        self._remember = contextlib.ExitStack()
        self._said = self._remember.enter_context(remembered())
        self._begun = False
        with contextlib.ExitStack() as on_refusal:
            on_refusal.callback(self._remember.close)
            if not self.manifest.exists() and self._holds_a_run():
                self.manifest.adopt_legacy()  # a run from before manifests
            self._refuse_strangers()
            self.checkpoints = Checkpoints(
                self.path / layout.CHECKPOINTS, self.manifest, process, {}, cfg.keep_last, cfg.seed
            )
            self.resumed = self._find_resume()
            if settle is not None:
                settle(self.resumed[1].get("config") if self.resumed else None)
            self.command, self.values = settings(cfg, process.world_size)
            self.checkpoints.config = self.values
            self.changes = self._check_identity()
            self.trackers = self._connect(getattr(cfg, "track", ()))
            on_refusal.pop_all()
        self.metrics: Metrics | None = None
        self._handlers: list[logging.Handler] = []
        self._lock: IO[str] | None = None

    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg: Any, process: dist.DistInfo, settle: Settle | None = None) -> Iterator[Run]:
        """The run, read and checked (see the module): nothing is written until ``begin``, so
        a job may still refuse its input; closed when the block ends, however it ends.
        settle(recorded), when given, settles the settings that a run derives once (from its
        data: --pixel-stats data) before they are checked: recorded is the settings of the
        checkpoint it continues, None for a start."""
        run = cls(cfg, process, settle)
        try:
            yield run
        except BaseException as error:
            run._close(error)
            raise
        run._close(None)

    def _holds_a_run(self) -> bool:
        names = (layout.IDENTITY, layout.CONFIG)
        return any((self.path / n).exists() for n in names) or any(
            layout.numbered(p.name) is not None
            for p in (self.path / layout.CHECKPOINTS).glob("*.pth")
        )

    def _refuse_strangers(self) -> None:
        """Refuse, before anything is written, a file the run did not write where the run will
        write one: its records and sinks, and the checkpoints, exports and pictures of the
        epochs it saves. Other files are left alone."""
        cfg, root = self.cfg, self.path
        ahead = [root / n for n in (layout.CONFIG, layout.IDENTITY, layout.LOG, layout.METRICS)]
        ahead += [root / layout.TENSORBOARD, root / layout.TRACKERS]
        for folder, every in (
            (layout.CHECKPOINTS, cfg.save_every),
            (layout.RECON, getattr(cfg, "recon_every", 0)),
        ):
            for path in (root / folder).iterdir() if (root / folder).is_dir() else ():
                epoch = layout.numbered(path.name, path.name.split("-")[0], path.suffix)
                if path.name.endswith("-best.pth") or (
                    every
                    and epoch
                    and epoch <= cfg.epochs
                    and (epoch % every == 0 or epoch == cfg.epochs)
                ):
                    ahead.append(path)
        for path in ahead:
            self.manifest.refuse_foreign(path)

    def _find_resume(self) -> tuple[Path, dict] | None:
        """(path, content) of the checkpoint to resume from, read now; None to start anew."""
        resume = self.cfg.resume
        if resume == "none":
            if self.checkpoints.numbered():
                raise UserError(
                    f"{self.checkpoints.folder} already holds checkpoints; pass --resume auto to "
                    f"continue that run, or another --output-dir to start anew."
                )
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_file():
                what = "is a folder" if path.is_dir() else "does not exist"
                raise UserError(f"--resume {path} {what}; pass a checkpoint file, auto or none.")
            return path, load(path, REQUIRED)
        # Rank 0 picks (and logs skipped corrupt files); the others load the same file, so
        # multi-node resume needs the output dir on a shared filesystem.
        found = self.checkpoints.newest_valid() if self.process.is_main else None
        path = dist.broadcast_object(str(found[0]) if found else None)
        if path is None:
            return None
        return found or (Path(path), load(Path(path), REQUIRED))

    def _check_identity(self) -> dict[str, tuple[Any, Any]]:
        """The changes accepted against the run's records. Without a checkpoint to continue
        from, the start is the run anew: only the command must be the same."""
        records = identity.read_records(self.path)
        where = f"The run in {self.path}"
        if self.resumed is None:
            identity.check(self.command, self.values, (), (), records, where)
            if records:
                log.info(
                    "No checkpoint in %s to continue from: the run begins anew with the "
                    "settings given now.",
                    self.path,
                )
            return {}
        if self.resumed and isinstance(self.resumed[1].get("config"), dict):
            path, content = self.resumed
            source = (
                path.name if path.parent == self.checkpoints.folder else "--resume " + str(path)
            )
            records.insert(0, identity.Record(source, content["config"]))
            if not path.parent == self.checkpoints.folder and len(records) == 1:
                where = f"The --resume checkpoint {path}"
        keys, accepted = self.cfg.identity_keys(), self.cfg.accepted_changes()
        legacy = self.cfg.legacy_values()
        return identity.check(self.command, self.values, keys, accepted, records, where, legacy)

    def _connect(self, names: tuple[str, ...]) -> list[Tracker]:
        """The trackers --track names, reached by the main process (fcmae.track.trackers): one
        that cannot be refuses the run, on every process, before anything is written."""
        trackers, refusal = [], None
        if names and self.process.is_main:
            try:
                trackers = connect(names)
            except UserError as error:
                refusal = str(error)
        refusal = dist.broadcast_object(refusal) if names else None
        if refusal:
            error = UserError(refusal)
            error.all_ranks = True  # type: ignore[attr-defined]  # rank 0 says it
            raise error
        return trackers

    def begin(self) -> None:
        """Lock, clean up and record (main process); every process logs. The engine calls it
        once the run's input is checked; later calls do nothing."""
        if self._begun:
            return
        self._begun = True
        self._remember.close()
        if not self.process.is_main:
            self._handlers = setup_logging(None, self.process.rank)
            return
        self._take_lock()
        self.manifest.write()
        log_file = self.manifest.claim(self.path / layout.LOG)
        self._handlers = setup_logging(log_file, self.process.rank)
        for record in self._said:  # what opening said on the console, now in log.txt too
            log_to_file(record)
        self.checkpoints.remove_leftovers()
        if self.changes:
            log.warning("Continuing with changed settings: %s.", identity.changed(self.changes))
        keys = self.cfg.identity_keys()
        replaced = {key: old for key, (old, _) in self.changes.items()}
        identity.write_identity(
            self.manifest.claim(self.path / layout.IDENTITY),
            self.command,
            {key: self.values[key] for key in keys},
            replaced if self.resumed else {},
        )
        write_yaml(self.values, self.manifest.claim(self.path / layout.CONFIG))  # config.yaml

    def _take_lock(self) -> None:
        """Create the directory, check that checkpoints/ can be written, and hold the lock (one
        run per directory)."""
        probe(self.checkpoints.folder)  # before any work, not at the first save
        self._lock = hold(self.path, "pass another --output-dir")

    def file(self, name: str) -> Path:
        """RUN/name, claimed as the run's: where the run may write it (e.g. a picture)."""
        return self.manifest.claim(self.path / name)

    def open_metrics(self, step: int) -> Metrics | None:
        """The metric sinks (main process; None on the others), continuing after step."""
        if not self.process.is_main:
            return None
        self.file(layout.METRICS)
        self.file(layout.TENSORBOARD)
        folder = RunFolder.read(self.path, self.file) if self.trackers else None
        sinks = Sinks(self.trackers, folder) if folder else None
        self.metrics = Metrics(self.path, step, sinks)
        if self.changes:
            changes = {key: {"from": old, "to": new} for key, (old, new) in self.changes.items()}
            self.metrics.write({"type": "changed", "step": step, "changes": changes})
        return self.metrics

    def restore(self, state: TrainState) -> None:
        """Load the checkpoint found at open, if any, into state (then forget it)."""
        if self.resumed is not None:
            self.checkpoints.restore(state, self.resumed)
            self.resumed = None  # the memory goes with the model

    def save(self, state: TrainState, exports: Exports, tag: int | str | None = None) -> Path:
        """A checkpoint with its exports; see Checkpoints.save."""
        return self.checkpoints.save(state, exports, tag)

    def _close(self, error: BaseException | None) -> None:
        """Close the sinks, the log and the lock, all of them; the first failure is raised
        unless an error already ends the run, which it must not hide (then it is said on
        stderr)."""
        self._remember.close()
        failures = []
        status = "FINISHED" if error is None else "FAILED"
        if isinstance(error, KeyboardInterrupt):
            status = "KILLED"
        for close in (lambda: self._close_metrics(status), self._close_log, self._unlock):
            try:
                close()
            except UserError as e:
                failures.append(e)
        if failures and error is None:
            raise failures[0]
        for failure in failures:
            print(f"fcmae: warning: {failure}", file=sys.stderr)

    def _close_metrics(self, status: str) -> None:
        if self.metrics is not None:
            metrics, self.metrics = self.metrics, None
            metrics.close(status)

    def _close_log(self) -> None:
        close_logging(self._handlers)
        self._handlers = []

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None


def hold(root: Path, other: str) -> IO[str]:
    """Hold root's lock, the one process at work in a run directory (close the file to release
    it); UserError when another holds it, other saying what else to do."""
    lock = root / layout.LOCK
    with writing(lock):
        handle = open(lock, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(
            f"Another run is using {root} (process {_owner(lock)}); wait for it to end, or {other}."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{socket.gethostname()}:{os.getpid()}\n")
    handle.flush()
    return handle


def _owner(lock: Path) -> str:
    try:
        return lock.read_text().strip() or "unknown"
    except OSError:
        return "unknown"
