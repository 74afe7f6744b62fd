"""The linprobe job: a linear classifier on the frozen encoder's pooled features, MAE style
(BatchNorm1d without affine, eps 1e-6, before the Linear), trained by the engine."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

import fcmae
from fcmae.data.sources import Batch, collate, run_stats
from fcmae.finetune.config import LinprobeConfig
from fcmae.finetune.data import (
    ClassNames,
    labelled_inputs,
    log_data,
    pretrained,
    settle_labelled,
    train_transform,
)
from fcmae.finetune.evaluate import Evaluator
from fcmae.finetune.probe import LinearProbe
from fcmae.run.run import Run
from fcmae.train.engine import Engine
from fcmae.train.runtime import Runtime, seed_everything
from fcmae.weights.layouts import load_into

log = logging.getLogger("fcmae")


def train_step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    return nn.functional.cross_entropy(model(batch.images), batch.labels), {}


def run(cfg: LinprobeConfig) -> dict[str, Any]:
    """Probe as cfg says; returns the final epoch record (val metrics, checkpoint)."""
    weights = pretrained(cfg)
    runtime = Runtime.for_training(cfg)
    with Run.open(cfg, runtime.dist, settle_labelled(cfg, weights, runtime.dist.is_main)) as run:
        augment = train_transform(cfg.input_size, cfg.in_chans, run_stats(cfg))
        train_set, val_set, classes = labelled_inputs(cfg, augment)
        log_data(train_set, val_set, len(classes))
        seed_everything(cfg.seed)
        encoder = fcmae.create_model(cfg.model, in_chans=cfg.in_chans, head=False, grn=cfg.grn)
        if weights:
            load_into(encoder, weights)
            del weights  # copied into the encoder: free the checkpoint's memory for the run
        else:
            log.warning(
                "No --pretrained checkpoint: probing a randomly initialised encoder (a baseline)."
            )
        model = LinearProbe(encoder, len(classes))
        evaluator = Evaluator(val_set, cfg.batch_size, ema=None)
        result = Engine(cfg, run, runtime).fit(
            model,
            train_set,
            train_step,
            collate_fn=collate,
            callbacks=[evaluator],
            extra_state={"evaluator": evaluator, "classes": ClassNames(classes)},
        )
        log.info(
            "Best top-1 %.2f%% (epoch %d): %s",
            evaluator.best["acc1"],
            evaluator.best["epoch"],
            run.checkpoints.file("best"),
        )
        return result
