"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from typing import Any

from torch import nn


def param_groups(
    model: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None
) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters of model.

    No weight decay on 1-D tensors, biases, and the names (or fnmatch patterns) that the model's
    ``no_weight_decay()`` returns, as timm's models declare them. With ``lr_scale(name)`` (e.g.
    layer-wise lr decay) each group also carries the "lr_scale" that the engine multiplies the
    scheduled lr by.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (
            param.ndim <= 1
            or name.endswith(".bias")
            or any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)
        )
        scale = lr_scale(name) if lr_scale else 1.0
        group = groups.setdefault(
            (scale, no_decay),
            {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale},
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Linear warmup from 0, then half-cycle cosine to min_lr; epoch is fractional."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
