"""The trackers --track names, each reached (fcmae.track.trackers)."""

from __future__ import annotations

from fcmae.track.trackers import Tracker


def connect(names: tuple[str, ...]) -> list[Tracker]:
    """The trackers named, each reached; UserError naming the one that cannot be. Their
    packages are imported here, only when named."""
    trackers: list[Tracker] = []
    for name in names:
        if name == "mlflow":
            from fcmae.track.mlflow_tracker import MlflowTracker

            trackers.append(MlflowTracker())
        else:
            from fcmae.track.wandb_tracker import WandbTracker

            trackers.append(WandbTracker())
    return trackers
