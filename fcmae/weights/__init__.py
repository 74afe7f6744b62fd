"""Checkpoint layouts, timm's names and Hub names: every file a network can come from."""
