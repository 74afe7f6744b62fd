"""The finetune job: a pretrained (or fresh) ConvNeXt V2 becomes a classifier, trained by the
engine with the paper's recipe; model and EMA are evaluated every epoch, the best is kept.

Run directory (besides the engine's logs and numbered checkpoints):
    checkpoints/checkpoint-best.pth   full state at the best epoch (model or EMA, see the log)
    checkpoints/ema-NNNN.pth, ema-best.pth   the EMA classifier alone, under "model"
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

import fcmae
from fcmae.data.sources import Batch, collate, run_stats
from fcmae.finetune.config import FinetuneConfig
from fcmae.finetune.data import (
    ClassNames,
    labelled_inputs,
    log_data,
    pretrained,
    settle_labelled,
    train_transform,
)
from fcmae.finetune.evaluate import Evaluator
from fcmae.finetune.layer_decay import layer_decay_groups
from fcmae.run.run import Run
from fcmae.train.callbacks import Callback, Context
from fcmae.train.engine import Engine
from fcmae.train.runtime import Runtime, seed_everything
from fcmae.weights.layouts import load_into

log = logging.getLogger("fcmae")


class Ema(ModelEmaV3, Callback):
    """timm's weight EMA, updated after every optimizer step."""

    def on_step_end(self, ctx: Context) -> None:
        self.update(ctx.model)


def make_train_step(cfg: FinetuneConfig, num_classes: int) -> Callable:
    """The step function: mixup/cutmix (timm) on the batch, then the recipe's loss."""
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        # Smoothing goes into the mixed soft targets, as timm and the official code do.
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    def train_step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        images, targets = batch.images, batch.labels
        if mixup is not None:
            images, targets = mixup(images, targets)
        return criterion(model(images), targets), {}

    return train_step


def build_model(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """The classifier the config names, freshly initialised."""
    model = fcmae.create_model(
        cfg.model,
        num_classes=num_classes,
        in_chans=cfg.in_chans,
        drop_path_rate=cfg.drop_path,
        head_init_scale=cfg.head_init_scale,
        grn=cfg.grn,
    )
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune as cfg says; returns the final epoch record (val/EMA metrics, checkpoint)."""
    weights = pretrained(cfg)
    runtime = Runtime.for_training(cfg)
    with Run.open(cfg, runtime.dist, settle_labelled(cfg, weights, runtime.dist.is_main)) as run:
        augment = train_transform(
            cfg.input_size, cfg.in_chans, run_stats(cfg), cfg.auto_augment, cfg.reprob
        )
        train_set, val_set, classes = labelled_inputs(cfg, augment)
        num_classes = len(classes)
        log_data(train_set, val_set, num_classes)
        seed_everything(cfg.seed)
        model = build_model(cfg, num_classes)
        if weights:
            load_into(model, weights)
            del weights  # copied into the model: free the checkpoint's memory for the run
        else:
            log.info("No --pretrained checkpoint: training %s from scratch.", cfg.model)
        # The EMA copies the model where it will train, so both update on one device.
        ema = Ema(model.to(runtime.device), decay=cfg.model_ema_decay) if cfg.model_ema else None
        evaluator = Evaluator(val_set, cfg.batch_size, ema)
        extra: dict[str, Any] = {"evaluator": evaluator, "classes": ClassNames(classes)}
        exports = {}
        if ema is not None:
            extra["ema"] = ema
            exports["ema"] = lambda _: {
                "model": ema.module.state_dict(),
                "classes": classes,
                "pixel_stats": cfg.pixel_stats,
            }
        result = Engine(cfg, run, runtime).fit(
            model,
            train_set,
            make_train_step(cfg, num_classes),
            collate_fn=collate,
            param_groups=layer_decay_groups(
                model, cfg.weight_decay, cfg.layer_decay, cfg.layer_decay_mode
            ),
            callbacks=[c for c in (ema, evaluator) if c is not None],
            extra_state=extra,
            exports=exports,
        )
        best = evaluator.best
        kind = "ema" if best["weights"] == "EMA" else "checkpoint"
        log.info(
            "Best top-1 %.2f%% (%s weights, epoch %d): %s",
            best["acc1"],
            best["weights"],
            best["epoch"],
            run.checkpoints.file("best", kind),
        )
        return result
