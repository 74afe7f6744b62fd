"""The trackers --track names, each reached (fcmae.track.trackers)."""

from __future__ import annotations

import logging
import os

from fcmae.track.trackers import Tracker

log = logging.getLogger("fcmae")


def connect(names: tuple[str, ...]) -> list[Tracker]:
    """The trackers named, each reached; UserError naming the one that cannot be. Their
    packages are imported here, only when named; W&B is left out when WANDB_MODE=disabled."""
    trackers: list[Tracker] = []
    for name in names:
        if name == "wandb" and os.environ.get("WANDB_MODE") == "disabled":
            log.info("WANDB_MODE=disabled: --track wandb sends nothing.")
        elif name == "mlflow":
            from fcmae.track.mlflow_tracker import MlflowTracker

            trackers.append(MlflowTracker())
        else:
            from fcmae.track.wandb_tracker import WandbTracker

            trackers.append(WandbTracker())
    return trackers
