"""What a tracker mirrors of a run directory, read from its files (torch-free): the command,
config.yaml, identity.yaml, the records of metrics.jsonl, the pictures and the final exports;
and RUN/trackers.json, where the run keeps the ids of its tracker runs.

The run directory is the source of truth: a tracker gets what these files hold, while the run
writes them (fcmae.track.trackers, from the Run's sinks) or afterwards (`fcmae track`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcmae.errors import UserError
from fcmae.run import identity, layout
from fcmae.run.files import write_text_atomic
from fcmae.run.metrics import parse_record

NOT_A_RUN = (
    "pass the folder of a run of fcmae pretrain, finetune or linprobe (its --output-dir), or of "
    "an fcmae sweep"
)
Claim = Callable[[Path], Path]


@dataclass
class Metric:
    """One number of a record: its name as TensorBoard and the trackers show it (TYPE/KEY,
    e.g. step/loss, epoch/knn_acc1), its value and its step."""

    name: str
    value: float
    step: int


def metrics_of(record: dict[str, Any]) -> list[Metric]:
    """The numbers of a step or epoch record (none of other records)."""
    if record.get("type") not in ("step", "epoch"):
        return []
    return [
        Metric(f"{record['type']}/{key}", float(value), record["step"])
        for key, value in record.items()
        if key not in ("type", "step") and _is_number(value)
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class RunFolder:
    """A run directory as the trackers read it. claim(path) claims a file of the run before it
    is written (the Run's, or the run's manifest's: fcmae.run.manifest)."""

    path: Path
    claim: Claim
    command: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)  # identity.yaml's
    documents: tuple[str, ...] = (layout.CONFIG, layout.IDENTITY)  # files uploaded at the end
    results: str | None = None  # a sweep's: the file that says it is complete
    _read: tuple[tuple[int, int], list[dict[str, Any]]] | None = field(
        default=None, repr=False, compare=False
    )  # records(), and the size and time of the file they were read from

    @classmethod
    def read(cls, path: Path, claim: Claim) -> RunFolder:
        """The run in path; UserError when path holds none (no config.yaml and identity.yaml)."""
        if not path.is_dir():
            raise UserError(f"{path} is not a folder; {NOT_A_RUN}.")
        records = {record.source: record for record in identity.read_records(path)}
        if set(records) != {layout.IDENTITY, layout.CONFIG}:
            raise UserError(f"{path} holds no run (config.yaml, identity.yaml); {NOT_A_RUN}.")
        ident = records[layout.IDENTITY]
        return cls(
            path, claim, ident.command or "", records[layout.CONFIG].settings, ident.settings
        )

    @classmethod
    def read_sweep(cls, path: Path, key: str, settings: dict[str, Any]) -> RunFolder:
        """The folder of a sweep of key over settings (fcmae.experiments.sweep), which has no
        manifest: its trackers.json is its own."""
        documents = ("sweep.yaml", "results.csv", "results.md", "results.png")
        config = {"set": key, **settings}
        return cls(path, lambda p: p, "fcmae sweep", config, config, documents, "results.csv")

    @property
    def name(self) -> str:
        """How a tracker names the run: its path, relative to this folder when inside it."""
        relative = os.path.relpath(self.path)
        return self.path.as_posix() if relative.startswith("..") else Path(relative).as_posix()

    def records(self) -> list[dict[str, Any]]:
        """The records of metrics.jsonl in file order (unreadable lines passed over), read
        again only when the file changed (a long run's file is large, and asked often)."""
        path = self.path / layout.METRICS
        if not path.is_file():
            return []
        stat = path.stat()
        version = (stat.st_size, stat.st_mtime_ns)
        if self._read is None or self._read[0] != version:
            lines = path.read_text(errors="replace").splitlines()
            self._read = version, [r for r in map(parse_record, lines) if r is not None]
        return self._read[1]

    def metrics(self) -> list[Metric]:
        """Every number of the step and epoch records."""
        return [metric for record in self.records() for metric in metrics_of(record)]

    def last_step(self) -> int:
        """The step of the last record (0 when none)."""
        return max((r["step"] for r in self.records()), default=0)

    def last_epoch(self) -> int:
        epochs = [r.get("epoch") for r in self.records() if r["type"] == "epoch"]
        return max((e for e in epochs if isinstance(e, int)), default=0)

    def complete(self) -> bool:
        """Whether the run trained all the epochs its config.yaml asks for (a sweep: whether
        it wrote its results)."""
        if self.results:
            return (self.path / self.results).is_file()
        epochs = self.config.get("epochs")
        return isinstance(epochs, int) and self.last_epoch() >= epochs

    def pictures(self) -> list[Path]:
        """recon/epoch-NNNN.png, in epoch order."""
        folder = self.path / layout.RECON
        found = folder.glob("epoch-*.png") if folder.is_dir() else ()
        return sorted(p for p in found if layout.numbered(p.name, "epoch", ".png"))

    def final_exports(self) -> list[Path]:
        """The exports written with the last checkpoint of a complete run (encoder-NNNN.pth,
        ema-NNNN.pth, ...; not the training state)."""
        if not self.complete():
            return []
        folder, epochs = self.path / layout.CHECKPOINTS, self.config["epochs"]
        return sorted(
            p
            for p in (folder.glob(f"*-{epochs:04d}.pth") if folder.is_dir() else ())
            if not p.name.startswith(layout.CHECKPOINT + "-")
        )

    def tracked(self, tracker: str) -> dict[str, Any]:
        """What trackers.json keeps for tracker ({} when nothing)."""
        return _read_json(self.path / layout.TRACKERS).get(tracker) or {}

    def keep(self, tracker: str, value: dict[str, Any]) -> None:
        """Record value for tracker in trackers.json (atomically)."""
        path = self.path / layout.TRACKERS
        kept = {**_read_json(path), tracker: value}
        write_text_atomic(self.claim(path), json.dumps(kept, indent=1, sort_keys=True) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    """trackers.json; {} when there is none. UserError when it cannot be read as what fcmae
    writes there: {"mlflow": {URI: RUN_ID}, "wandb": {"id", "step", "pictures", "exports"}}."""
    if not path.exists():
        return {}
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        value = None
    if not (isinstance(value, dict) and _valid(value)):
        raise UserError(
            f"{path} cannot be read, so which tracker runs mirror {path.parent} is unknown; "
            f"delete it to mirror the run to new tracker runs."
        )
    return value


def _valid(kept: dict[str, Any]) -> bool:
    """Whether trackers.json's content has the types fcmae writes."""
    mlflow, wandb = kept.get("mlflow", {}), kept.get("wandb", {})
    names = (wandb.get("pictures", []), wandb.get("exports", [])) if isinstance(wandb, dict) else ()
    return (
        isinstance(mlflow, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in mlflow.items())
        and isinstance(wandb, dict)
        and isinstance(wandb.get("id", ""), str)
        and type(wandb.get("step", -1)) is int
        and all(isinstance(n, list) and all(isinstance(x, str) for x in n) for n in names)
    )
