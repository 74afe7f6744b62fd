"""Weights & Biases as a tracker (fcmae.track.trackers): online when you are logged in
(WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc), else offline, into runs/wandb/ (WANDB_DIR
moves it), for `wandb sync` to upload later; WANDB_MODE decides when set.

A run is one W&B run of the project WANDB_PROJECT (default "fcmae"), named by its folder, its
id kept in RUN/trackers.json (a resumed run continues it): config.yaml as its config (current
values; a change accepted with --accept-changes is in its summary, fcmae.changed.KEY), every
number of the step and epoch records as TYPE/KEY at the record's step, the pictures as the
image "recon", config.yaml and identity.yaml as files, and the final exports as a model
artifact. W&B cannot be asked what it holds offline, so trackers.json also keeps the last step
sent and the pictures and exports sent: nothing is sent twice.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from fcmae.errors import UserError
from fcmae.run import layout
from fcmae.run.files import probe
from fcmae.track.folder import RunFolder, metrics_of
from fcmae.track.trackers import Parent, Tracker, fcmae_version, reason

log = logging.getLogger("fcmae")

PROJECT = "fcmae"
DEFAULT_DIR = Path("runs")  # W&B writes runs/wandb/


def logged_in() -> bool:
    """Whether W&B has an API key here: WANDB_API_KEY, or a ~/.netrc entry for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reach(url: str) -> None:
    """UserError unless the W&B server at url answers (any HTTP answer will do)."""
    try:
        urllib.request.urlopen(url, timeout=10).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as error:
        raise UserError(
            f"W&B at {url} cannot be reached ({reason(error)}); check the network or "
            f"WANDB_BASE_URL, set WANDB_MODE=offline to sync later, or run without --track "
            f"wandb."
        ) from None


class WandbTracker(Tracker):
    """W&B in the mode of the module's docstring; its folder is checked writable."""

    name, title = "wandb", "W&B"

    def __init__(self) -> None:
        logging.getLogger("wandb").setLevel(logging.ERROR)
        self.mode = os.environ.get("WANDB_MODE") or ("online" if logged_in() else "offline")
        self.dir = Path(os.environ.get("WANDB_DIR") or DEFAULT_DIR).resolve()
        self.where = f"{self.dir / 'wandb'} ({self.mode})"
        if self.mode == "online":
            self.where = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
        if self.mode == "online":
            _reach(self.where)
        try:
            probe(self.dir / "wandb")
        except UserError:
            raise UserError(
                f"--track wandb writes to {self.dir / 'wandb'}, which cannot be written; set "
                f"WANDB_DIR to a folder that can be."
            ) from None
        self.run: Any = None
        self.folder: RunFolder | None = None
        self.sent, self.pictures, self.exports = -1, set(), set()

    def behind(self, folder: RunFolder) -> bool:
        kept = folder.tracked(self.name)
        steps = [r["step"] for r in folder.records()]
        return (
            not kept.get("id")
            or max(steps, default=-1) > kept.get("step", -1)
            or bool({p.name for p in folder.pictures()} - set(kept.get("pictures", [])))
            or bool({p.name for p in folder.final_exports()} - set(kept.get("exports", [])))
        )

    def start(self, folder: RunFolder, parent: Parent | None) -> None:
        import wandb

        kept, self.folder = folder.tracked(self.name), folder
        self.sent = kept.get("step", -1)
        self.pictures, self.exports = set(kept.get("pictures", [])), set(kept.get("exports", []))
        settings = wandb.Settings(
            silent=True,
            console="off",
            x_disable_stats=True,
            x_disable_machine_info=True,
            x_save_requirements=False,
            disable_git=True,
            save_code=False,
            init_timeout=30,
        )
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or PROJECT,
                id=kept.get("id"),  # offline, `wandb sync` joins the runs of one id
                resume="allow" if self.mode == "online" else None,
                name=folder.name,
                group=parent.runs.get(self.name) if parent else _group(folder),
                job_type=folder.command.removeprefix("fcmae ") or None,
                tags=[f"fcmae-{fcmae_version()}"],
                dir=str(self.dir),
                mode=self.mode,
                reinit="create_new",
                settings=settings,
            )
        except Exception as error:
            raise UserError(
                f"W&B at {self.where} cannot be reached ({reason(error)}); run `wandb login` "
                f"again, or set WANDB_MODE=offline, or run without --track wandb."
            ) from None
        extra = {"fcmae_version": fcmae_version(), "fcmae_command": folder.command}
        self.run.config.update(
            {**folder.config, **extra, **(parent.tags if parent else {})}, allow_val_change=True
        )
        self._keep(folder)
        if self.sent > folder.last_step():  # logged after the checkpoint this run continues from
            log.warning(
                "W&B at %s holds what the interrupted run logged after step %d, up to step %d, "
                "and takes no step twice: its values stand there, and this run's values of "
                "those steps are in %s and TensorBoard only.",
                self.where,
                folder.last_step(),
                self.sent,
                folder.path / "metrics.jsonl",
            )
        self._catch_up(folder)

    def _catch_up(self, folder: RunFolder) -> None:
        """The records after the last step sent, and the pictures not sent, in step order."""
        records = folder.records()
        steps = {r["epoch"]: r["step"] for r in records if r["type"] == "epoch"}
        pictures = {
            steps[epoch]: path
            for path in folder.pictures()
            if path.name not in self.pictures
            and (epoch := layout.numbered(path.name, "epoch", ".png")) in steps
        }
        sent = self.sent  # log() moves it on: an epoch record shares its step with a step one
        for record in records:
            if record["step"] > sent:
                for step in [s for s in sorted(pictures) if s <= record["step"]]:
                    self.picture(pictures.pop(step), step)
                self.log(record)
        for step in sorted(pictures):
            self.picture(pictures[step], step)

    def log(self, record: dict[str, Any]) -> None:
        if record["type"] == "changed":
            for key, change in record.get("changes", {}).items():
                where = f"at step {record['step']}"
                self.run.summary[f"fcmae.changed.{key}"] = (
                    f"{change['from']} -> {change['to']} {where}"
                )
            return
        metrics = metrics_of(record)
        if metrics and record["step"] >= self.sent:  # W&B takes no step below one it has
            self.run.log({m.name: m.value for m in metrics}, step=record["step"])
            self.sent = record["step"]
            if record["type"] == "epoch":  # what was sent, kept should the run be killed
                self._keep(self.folder)

    def picture(self, path: Path, step: int) -> None:
        import wandb

        if step < self.sent:
            return
        self.run.log({"recon": wandb.Image(str(path), caption=path.name)}, step=step)
        self.pictures.add(path.name)

    def finish(self, folder: RunFolder, status: str) -> None:
        import wandb

        copies = Path(self.run.dir) / "fcmae"  # the W&B run's files (its own are beside)
        copies.mkdir(exist_ok=True)
        for name in folder.documents:
            if (folder.path / name).is_file():
                shutil.copyfile(folder.path / name, copies / name)
        exports = [p for p in folder.final_exports() if p.name not in self.exports]
        if exports:
            name = re.sub(r"[^\w.-]+", "-", folder.name).strip("-")
            artifact = wandb.Artifact(f"{name}-exports", type="model")
            for path in exports:
                artifact.add_file(str(path))
            self.run.log_artifact(artifact)
            self.exports.update(p.name for p in exports)
        online = self.mode == "online"
        seen = self.run.url if online else f"wandb sync {Path(self.run.dir).parent}"
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)
        self._keep(folder)
        log.info("W&B run %s (%s).", self.run.id, seen)

    def parent_id(self, folder: RunFolder) -> str:
        return folder.name  # the W&B group of a sweep's runs

    def _keep(self, folder: RunFolder) -> None:
        folder.keep(
            self.name,
            {
                "id": self.run.id,
                "step": self.sent,
                "pictures": sorted(self.pictures),
                "exports": sorted(self.exports),
            },
        )


def _group(folder: RunFolder) -> str | None:
    """A sweep's own run is in the group of its points."""
    return folder.name if folder.command == "fcmae sweep" else None
