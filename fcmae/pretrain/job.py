"""The pretrain job: builds the FCMAE model and data, and hands a step function to the engine."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fcmae
from fcmae.config.commands import PretrainConfig
from fcmae.data.sources import Batch, collate, fixed_images, pretrain_dataset
from fcmae.models.masking import check_masking
from fcmae.pretrain.recon import Reconstructions
from fcmae.run.run import Run
from fcmae.train.callbacks import Callback
from fcmae.train.engine import Engine
from fcmae.train.optim import param_groups
from fcmae.train.runtime import Runtime, seed_everything

log = logging.getLogger("fcmae")

RECON_IMAGES = 8  # rows of the reconstruction pictures written during pretraining


def build_model(cfg: PretrainConfig) -> nn.Module:
    """The FCMAE model (encoder + decoder) the config names."""
    model = fcmae.create_model(
        f"fcmae_{cfg.model}",
        in_chans=cfg.in_chans,
        patch_size=cfg.patch_size,
        mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.norm_pix_loss,
        backend=cfg.backend,
        decoder_depth=cfg.decoder_depth,
        decoder_dim=cfg.decoder_dim,
        grn=cfg.grn,
    )
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def train_step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mask, encode, decode; the loss is the reconstruction error on masked patches."""
    loss, _, _ = model(batch.images)
    return loss, {}


def export_encoder(model: nn.Module) -> dict[str, Any]:
    """The encoder alone in the official dense layout, under "model" as the released FCMAE
    encoders are: what fine-tuning loads."""
    return {"model": model.encoder.state_dict()}


def run(cfg: PretrainConfig, callbacks: list[Callback] = ()) -> dict[str, Any]:
    """Pretrain as cfg says; returns the final epoch record (with the checkpoint path)."""
    # The data is checked before the run directory is made: a refusal leaves nothing behind.
    dataset, description = pretrain_dataset(cfg.data, cfg.input_size, cfg.in_chans, cfg.demo_images)
    runtime = Runtime.for_training(cfg)
    with Run.open(cfg, runtime.dist) as run:
        log.info(description)
        seed_everything(cfg.seed)
        model = build_model(cfg)
        log_model(cfg, model, run.path)
        callbacks = list(callbacks)
        if cfg.recon_every:
            images = fixed_images(cfg.data, cfg.input_size, cfg.in_chans, RECON_IMAGES)
            callbacks.append(Reconstructions(images, cfg.recon_every, cfg.seed))
        return Engine(cfg, run, runtime).fit(
            model,
            dataset,
            train_step,
            collate_fn=collate,
            param_groups=param_groups(model, cfg.weight_decay, skip_declared=not cfg.decay_grn),
            callbacks=callbacks,
            exports={"encoder": export_encoder},
        )


def log_model(cfg: PretrainConfig, model: nn.Module, run_dir: Path) -> None:
    """Say what is trained where, and how many patches the mask ratio really masks."""
    log.info(
        "Model fcmae_%s%s: %.2fM parameters, %dx%d px, patch %d, mask ratio %g, %s "
        "backend; run directory %s.",
        cfg.model,
        "" if cfg.grn else " without GRN",
        sum(p.numel() for p in model.parameters()) / 1e6,
        cfg.input_size,
        cfg.input_size,
        cfg.patch_size,
        cfg.mask_ratio,
        cfg.backend,
        run_dir,
    )
    masked, patches = check_masking(cfg.input_size, cfg.patch_size, cfg.mask_ratio)
    if abs(masked / patches - cfg.mask_ratio) > 0.02:
        log.info(
            "Mask ratio %g masks %d of the %d patches per image, a share of %.3g: the "
            "kept count is rounded down (more patches, from a larger --input-size or a "
            "smaller --patch-size, come closer).",
            cfg.mask_ratio,
            masked,
            patches,
            masked / patches,
        )
