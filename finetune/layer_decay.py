"""Layer-wise learning-rate decay for ConvNeXt V2, with the layer ids that the official
fine-tuning code (optim_factory.py) assigns.

Each parameter gets a layer id; its lr is scaled by ``decay ** (L + 1 - id)``, so
the head (id L + 1) trains at the full lr and the stem the slowest.

- ``single``: L = sum(depths); block b of stage s has id sum(depths[:s]) + b + 1,
  downsample layer k (the stem is k = 0) has sum(depths[:k]) + 1.
- ``group`` (the recipe of base and larger): L = 12; the stem is 0, stage 0 and
  1 blocks are 1 and 2, stage 2 blocks go three to an id from 3, stage 3 and
  its downsample are 12, downsample layers 1 and 2 are 2 and 3.

Everything else (final norm, head) has id L + 1.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fcmae.finetune.config import LAYER_DECAY_MODES as MODES
from fcmae.train.optim import param_groups

GROUP_LAYERS = 12


def num_layers(depths: tuple[int, ...], mode: str) -> int:
    return sum(depths) if mode == "single" else GROUP_LAYERS


def layer_id(name: str, depths: tuple[int, ...], mode: str) -> int:
    """The layer id of parameter ``name`` of a ConvNeXtV2 with these depths."""
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        stage = int(parts[1])
        if mode == "single":
            return sum(depths[:stage]) + 1
        return (0, 2, 3, GROUP_LAYERS)[stage]
    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        if mode == "single":
            return sum(depths[:stage]) + block + 1
        return (1, 2, 3 + block // 3, GROUP_LAYERS)[stage]
    return num_layers(depths, mode) + 1


def layer_decay_groups(
    model: nn.Module, weight_decay: float, decay: float, mode: str
) -> list[dict[str, Any]]:
    """AdamW parameter groups of a ConvNeXtV2, one per (layer id, decayed or not), each with
    its ``lr_scale`` = decay ** (L + 1 - id)."""
    if mode not in MODES:
        raise ValueError(f"layer decay mode {mode!r}; choose one of {', '.join(MODES)}")
    top = num_layers(model.depths, mode) + 1
    return param_groups(
        model, weight_decay, lambda name: decay ** (top - layer_id(name, model.depths, mode))
    )
