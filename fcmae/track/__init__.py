"""Experiment trackers (MLflow, W&B) as sinks of a run, and what they mirror of its directory."""
