"""Checkpoint layouts and Hub names: every file a network can come from."""
