"""AdamW parameter groups, the batch arithmetic of a step and the learning-rate schedule."""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fcmae.errors import ConfigError

log = logging.getLogger("fcmae")


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
    skip_declared: bool = True,
) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters of model.

    No weight decay on 1-D tensors and biases (timm's ``add_weight_decay``, the rule of the
    official pretraining) and, with ``skip_declared``, on the names (or fnmatch patterns) the
    model's ``no_weight_decay()`` declares, as timm's models do: GRN's gamma and beta and the
    mask token, which the official fine-tuning exempts too. With ``lr_scale(name)`` (e.g.
    layer-wise lr decay) each group also carries the "lr_scale" that the engine multiplies the
    scheduled lr by.
    """
    declared = (
        model.no_weight_decay() if skip_declared and hasattr(model, "no_weight_decay") else ()
    )
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = (
            param.ndim <= 1
            or name.endswith(".bias")
            or any(fnmatch.fnmatchcase(name, pattern) for pattern in declared)
        )
        scale = lr_scale(name) if lr_scale else 1.0
        group = groups.setdefault(
            (scale, no_decay),
            {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale},
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def adamw(
    groups: list[dict[str, Any]], betas: tuple[float, float], device: torch.device
) -> torch.optim.AdamW:
    """AdamW over groups; the lr is set per step (lr_at x each group's lr_scale)."""
    # Fused kernels: CUDA, and MPS since torch 2.4 (fp32 parameters); elsewhere the default.
    fused = device.type in ("cuda", "mps") or None
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, fused=fused)


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Linear warmup from 0, then half-cycle cosine to min_lr; epoch is fractional."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass(frozen=True)
class BatchPlan:
    """How images make up an optimizer step, and the peak lr that follows from it."""

    accum_iter: int  # forward/backward passes per optimizer step
    effective_batch: int  # images per optimizer step over all processes
    peak_lr: float  # the lr after warmup: --lr, or --blr x effective_batch / 256
    steps_per_epoch: int  # optimizer steps per epoch


def batch_arithmetic(cfg: Any, world_size: int) -> tuple[int, int, float]:
    """(accum_iter, effective_batch, peak_lr) of a TrainConfig on world_size processes:
    accumulation reaches cfg.effective_batch if set (rounded to whole forward passes), and the
    peak lr is --lr, or --blr x effective_batch / 256. Raises ConfigError when --min-lr, the
    end of the cosine, exceeds that peak (the schedule would climb instead of decay)."""
    per_step = cfg.batch_size * world_size
    if cfg.accum_iter is not None:
        accum = cfg.accum_iter
    elif cfg.effective_batch is not None:
        accum = max(1, round(cfg.effective_batch / per_step))
    else:
        accum = 1
    effective = accum * per_step
    peak_lr = cfg.lr if cfg.lr is not None else cfg.blr * effective / 256
    if cfg.min_lr > peak_lr:
        raise ConfigError(
            f"min_lr ({cfg.min_lr:g}) must not exceed the peak lr {peak_lr:g} (blr "
            f"{cfg.blr:g} x effective batch {effective} / 256); lower --min-lr or raise --blr."
        )
    return accum, effective, peak_lr


def plan_batches(cfg: Any, world_size: int, batches_per_epoch: int) -> BatchPlan:
    """The BatchPlan of a TrainConfig for world_size processes that each get
    batches_per_epoch batches an epoch (see batch_arithmetic)."""
    accum, effective, peak_lr = batch_arithmetic(cfg, world_size)
    if cfg.accum_iter is None and cfg.effective_batch not in (None, effective):
        log.warning(
            "Effective batch %d is not a multiple of %d (batch size x processes); using %d.",
            cfg.effective_batch,
            cfg.batch_size * world_size,
            effective,
        )
    return BatchPlan(accum, effective, peak_lr, batches_per_epoch // accum)
