"""The options of experiment tracking (--track, on pretrain, finetune, linprobe, sweep and
`fcmae track`) and of the quality watched while pretraining (--monitor-data). Torch-free: the
trackers' packages are looked for, not imported."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from fcmae.config.schema import COUNT, Config, opt
from fcmae.errors import ConfigError, shorten

TRACKERS = ("mlflow", "wandb")
TRACK_HELP = (
    "experiment trackers that receive the run as well, one or both: mlflow (to "
    "MLFLOW_TRACKING_URI when set, else to runs/mlflow.db), wandb (offline unless you are "
    "logged in); the run directory stays complete either way"
)


@dataclass
class TrackOption(Config):
    """The trackers a command reports to (fcmae.track)."""

    track: tuple[str, ...] = opt((), TRACK_HELP, identity=False)

    def validate(self) -> None:
        super().validate()
        check_trackers(self.track)


def check_trackers(names: tuple[str, ...]) -> None:
    """ConfigError for a name that is no tracker, a name given twice, or a tracker whose
    package is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(
                f"--track {shorten(name)} is not a tracker fcmae knows; pass mlflow, wandb or "
                f"both (--track mlflow wandb)."
            )
        if names.count(name) > 1:
            raise ConfigError(f"--track names {name} twice; name each tracker once.")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"--track {name} needs the {name} package, which is not installed here: "
                f"pip install -e '.[track]' (or pip install {name})."
            )


@dataclass
class MonitorOptions(Config):
    """The kNN accuracy watched while pretraining (fcmae.experiments.monitor)."""

    monitor_data: str | None = opt(
        None,
        "folder holding train/ and val/ ImageFolders (one subfolder of images per class): every "
        "--monitor-every epochs and at the end, the encoder's kNN top-1 on it, as fcmae knn "
        "measures it, joins the epoch record as knn_acc1",
        path="input",
        identity=False,
    )
    monitor_every: int = opt(
        10, "epochs between two kNN measurements of --monitor-data", within=COUNT, identity=False
    )


@dataclass
class TrackConfig(TrackOption):
    """Run directories uploaded to trackers from their files (fcmae track)."""

    runs: tuple[str, ...] = opt(
        (),
        "run directories of pretrain, finetune or linprobe, or sweep directories (each point "
        "nested under the sweep)",
        positional=True,
        path="input",
    )
