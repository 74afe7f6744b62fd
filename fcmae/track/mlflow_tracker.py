"""MLflow as a tracker (fcmae.track.trackers): to MLFLOW_TRACKING_URI when it is set (a team
server), else to an embedded SQLite store beside the runs, runs/mlflow.db (artifacts in
runs/mlartifacts), which `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` shows.

A run is one MLflow run of the experiment MLFLOW_EXPERIMENT_NAME (default "fcmae"), named by
its folder: config.yaml as parameters (a value MLflow already holds is never changed: a setting
changed since, by --accept-changes or a resume with other --epochs, is the tag
fcmae.changed.KEY "OLD -> NEW"), identity.yaml's settings, the command and fcmae's version as
tags, every number of the step and epoch records as the metric TYPE/KEY at the record's step,
the pictures under recon/, config.yaml and identity.yaml, and the final exports under
checkpoints/. What the MLflow run already holds is read back first, so nothing is added twice.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from fcmae.errors import UserError
from fcmae.track.folder import Metric, RunFolder, metrics_of
from fcmae.track.trackers import Parent, Tracker, fcmae_version, reason

log = logging.getLogger("fcmae")

DEFAULT_STORE = Path("runs") / "mlflow.db"
EXPERIMENT = "fcmae"
BATCH = 1000  # metrics per request: MLflow's limit
# How long MLflow's HTTP client insists before a call fails (its own defaults retry for
# minutes, which would stall training), and no progress bars: the user's environment wins.
ENV_DEFAULTS = {
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the SQLite store runs/mlflow.db of this folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE.resolve()}"


class MlflowTracker(Tracker):
    """The tracking server or store at tracking_uri(), reached (UserError if it cannot be)."""

    name, title = "mlflow", "MLflow"

    def __init__(self) -> None:
        for key, value in ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        for logger in ("mlflow", "alembic", "urllib3"):  # their progress is not the run's
            logging.getLogger(logger).setLevel(logging.ERROR)
        from mlflow import MlflowClient

        self.where = tracking_uri()
        self.run_id, self.relogged, self.folder = "", 0, None
        store = Path(self.where.removeprefix("sqlite:///"))
        sqlite = self.where.startswith("sqlite:///")
        try:
            if sqlite:  # a file: its folder made, and opened now (MLflow retries for minutes)
                store.parent.mkdir(parents=True, exist_ok=True)
                sqlite3.connect(store, timeout=10).execute("pragma schema_version").close()
            self.client = MlflowClient(self.where)
            self.experiment_id = self._experiment(store.parent if sqlite else None)
        except Exception as error:
            raise _refusal(self.where, error) from None

    def _experiment(self, store_folder: Path | None) -> str:
        """The id of the experiment MLFLOW_EXPERIMENT_NAME (default fcmae), made if new: beside
        a SQLite store, its artifacts go to mlartifacts/ there."""
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = str(store_folder / "mlartifacts") if store_folder else None
        return self.client.create_experiment(name, artifact_location=location)

    def _find(self, folder: RunFolder) -> Any:
        """The MLflow run that trackers.json names for this URI, if MLflow holds it."""
        run_id = folder.tracked(self.name).get(self.where)
        try:
            run = self.client.get_run(run_id) if run_id else None
        except MlflowException as error:  # not there: a new run will mirror the folder
            if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            return None
        return None if run is None or run.info.lifecycle_stage == "deleted" else run

    def behind(self, folder: RunFolder) -> bool:
        run = self._find(folder)
        if run is None:
            return True
        self.run_id = run.info.run_id
        new, _ = self._params(folder, run.data.params)
        metrics, files = self._missing(folder, set(run.data.metrics), with_documents=True)
        done = run.info.status == ("FINISHED" if folder.complete() else "KILLED")
        return bool(new or metrics or files) or not done

    def start(self, folder: RunFolder, parent: Parent | None) -> None:
        run = self._find(folder)
        if run is None:
            run = self.client.create_run(self.experiment_id, run_name=folder.name)
            runs = folder.tracked(self.name)
            folder.keep(self.name, {**runs, self.where: run.info.run_id})
        elif run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id, self.folder = run.info.run_id, folder
        self._describe(folder, run.data, parent)
        metrics, files = self._missing(folder, set(run.data.metrics), with_documents=False)
        last = folder.last_step()
        if self.relogged > last:  # logged after the checkpoint this run continues from
            _relogging(self, folder, last, self.relogged)
            self.client.set_tag(self.run_id, "fcmae.relogged_after_step", str(last))
        self._log(metrics)
        for path, under in files:
            self.client.log_artifact(self.run_id, str(path), under)

    def _params(
        self, folder: RunFolder, params: dict[str, str]
    ) -> tuple[list[Any], dict[str, str]]:
        """(the parameters of config.yaml that the run lacks, a tag fcmae.changed.KEY for each
        it holds with another value: MLflow never changes a parameter)."""
        from mlflow.entities import Param

        new, changed = [], {}
        for key, value in folder.config.items():
            text = str(value)[:6000]  # MLflow's limit of a parameter's value
            if key not in params:
                new.append(Param(key, text))
            elif params[key] != text and key != "accept_changes":
                changed[f"fcmae.changed.{key}"] = f"{params[key]} -> {text}"
        return new, changed

    def _describe(self, folder: RunFolder, data: Any, parent: Parent | None) -> None:
        """The parameters the run lacks, and the tags (data: what the run holds); a
        fcmae.changed tag whose setting is back to the parameter's value goes."""
        from mlflow.entities import RunTag

        new, changed = self._params(folder, data.params)
        for tag in data.tags:
            if tag.startswith("fcmae.changed.") and tag not in changed:
                self.client.delete_tag(self.run_id, tag)
        tags = {
            "fcmae.command": folder.command,
            "fcmae.version": fcmae_version(),
            "fcmae.run_dir": str(folder.path),
            **{key: str(value) for key, value in folder.settings.items()},
            **changed,
            **_accepted(folder),
        }
        if parent is not None:
            if parent.runs.get(self.name):
                tags["mlflow.parentRunId"] = parent.runs[self.name]
            tags.update(parent.tags)
        tagged = [RunTag(key, value) for key, value in tags.items()]
        for i in range(0, max(len(new), len(tagged)), 100):  # MLflow's limit per request
            self.client.log_batch(self.run_id, params=new[i : i + 100], tags=tagged[i : i + 100])

    def _missing(
        self, folder: RunFolder, logged: set[str], with_documents: bool
    ) -> tuple[list[Metric], list[tuple[Path, str | None]]]:
        """(the folder's metrics at steps the run lacks, its files the run lacks as (path,
        artifact folder)): the pictures, and with_documents the documents and final exports
        (which the run uploads when it ends). A file is held when one of its name and size is.
        logged: the metrics the run holds (the last step of any of them is kept as relogged)."""
        metrics = folder.metrics()
        held = {
            key: {m.step for m in self.client.get_metric_history(self.run_id, key)}
            for key in {m.name for m in metrics} | logged
        }
        self.relogged = max((max(steps, default=0) for steps in held.values()), default=0)
        files = [(path, "recon") for path in folder.pictures()]
        if with_documents:
            files += [(path, "checkpoints") for path in folder.final_exports()]
        listed = {under: self._held(under) for under in {under for _, under in files}}
        files = [f for f in files if (f[0].name, f[0].stat().st_size) not in listed[f[1]]]
        if with_documents:
            files += [(path, None) for path in self._stale(folder)]
        return [m for m in metrics if m.step not in held[m.name]], files

    def _stale(self, folder: RunFolder) -> list[Path]:
        """The folder's documents (config.yaml, ...) that the run lacks or holds otherwise."""
        stale = []
        with tempfile.TemporaryDirectory() as copies:
            for path in (folder.path / name for name in folder.documents):
                if not path.is_file():
                    continue
                try:
                    held = self.client.download_artifacts(self.run_id, path.name, copies)
                    same = Path(held).read_bytes() == path.read_bytes()
                except (OSError, MlflowException):  # not there
                    same = False
                if not same:
                    stale.append(path)
        return stale

    def _held(self, under: str | None) -> set[tuple[str, int | None]]:
        """(name, size) of the run's artifacts in the folder under."""
        found = self.client.list_artifacts(self.run_id, under)
        return {(Path(f.path).name, f.file_size) for f in found}

    def log(self, record: dict[str, Any]) -> None:
        if record["type"] == "changed":  # metrics.jsonl holds it now: the tags, anew
            for key, value in _accepted(self.folder).items():
                self.client.set_tag(self.run_id, key, value)
        self._log(metrics_of(record))

    def _log(self, metrics: list[Metric]) -> None:
        from mlflow.entities import Metric as Logged

        now = int(time.time() * 1000)
        logged = [Logged(m.name, m.value, now, m.step) for m in metrics]
        for i in range(0, len(logged), BATCH):
            self.client.log_batch(self.run_id, metrics=logged[i : i + BATCH])

    def picture(self, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), "recon")

    def finish(self, folder: RunFolder, status: str) -> None:
        held = self._held("checkpoints")
        for path in folder.final_exports():
            if (path.name, path.stat().st_size) not in held:
                self.client.log_artifact(self.run_id, str(path), "checkpoints")
        for path in self._stale(folder):
            self.client.log_artifact(self.run_id, str(path))
        with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints links: logged here
            self.client.set_terminated(self.run_id, status)
        log.info("MLflow run %s.", self.link())

    def link(self) -> str:
        """Where to see the run: its page on a tracking server, else how to open the store."""
        if self.where.startswith(("http://", "https://")):
            page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
            return f"{self.where.rstrip('/')}/{page}"
        return f"{self.run_id} in {self.where} (mlflow ui --backend-store-uri {self.where})"

    def parent_id(self, folder: RunFolder) -> str:
        return self._find(folder).info.run_id


def _refusal(uri: str, error: Exception) -> UserError:
    """The sentence for a tracking URI that MLflow cannot use."""
    text = str(error)
    if "filesystem tracking backend" in text:
        return UserError(
            f"MLflow keeps no runs in a folder such as {uri} any more; set MLFLOW_TRACKING_URI "
            f"to a SQLite file (sqlite:///PATH/mlflow.db) or a tracking server "
            f"(http://HOST:PORT), or unset it for runs/mlflow.db."
        )
    if uri.startswith("sqlite:///"):
        return UserError(
            f"MLflow cannot open the SQLite store {uri.removeprefix('sqlite:///')} "
            f"({reason(error)}); set MLFLOW_TRACKING_URI to a file it can write "
            f"(sqlite:///PATH/mlflow.db), or run without --track mlflow."
        )
    if "unsupported URI" in text:
        return UserError(
            f"MLFLOW_TRACKING_URI {uri} is no tracking URI MLflow knows; set it to a SQLite "
            f"file (sqlite:///PATH/mlflow.db) or a tracking server (http://HOST:PORT), or unset "
            f"it for runs/mlflow.db."
        )
    return UserError(
        f"MLflow at {uri} cannot be reached ({reason(error)}); start it, or set "
        f"MLFLOW_TRACKING_URI to a tracking server or store that answers, or run without "
        f"--track mlflow."
    )


def _relogging(tracker: Tracker, folder: RunFolder, last: int, held: int) -> None:
    """Say that the tracker holds values the run dropped when it resumed (it cannot delete
    them), and that the run logs those steps again."""
    log.warning(
        "%s at %s holds what the interrupted run logged after step %d, up to step %d, which this "
        "run trains again: %s keeps those values too, so its history shows two at those steps "
        "(%s and TensorBoard hold the new ones).",
        tracker.title,
        tracker.where,
        last,
        held,
        tracker.title,
        folder.path / "metrics.jsonl",
    )


def _accepted(folder: RunFolder) -> dict[str, str]:
    """fcmae.accepted.KEY: every change --accept-changes let through, from the "changed"
    records of metrics.jsonl, e.g. "0.6 -> 0.5 at step 6; 0.5 -> 0.6 at step 8"."""
    said: dict[str, list[str]] = {}
    for record in folder.records():
        changes = record.get("changes")
        if record["type"] != "changed" or not isinstance(changes, dict):
            continue
        for key, change in changes.items():
            if isinstance(change, dict):
                said.setdefault(f"fcmae.accepted.{key}", []).append(
                    f"{change.get('from')} -> {change.get('to')} at step {record['step']}"
                )
    return {key: "; ".join(changes) for key, changes in said.items()}
