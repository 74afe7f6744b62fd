"""The pretrain job: builds the FCMAE model and data, and hands a step function to the engine."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fcmae
from fcmae.config.commands import PretrainConfig
from fcmae.data.images import Decoding
from fcmae.data.sources import Batch, collate, data_source, fixed_images, run_stats, settle_stats
from fcmae.data.transforms import pretrain_transform
from fcmae.models.masking import check_masking
from fcmae.pretrain.recon import Display, Reconstructions
from fcmae.run.run import Run
from fcmae.train.callbacks import Callback
from fcmae.train.engine import Engine
from fcmae.train.optim import param_groups
from fcmae.train.runtime import Runtime, seed_everything
from fcmae.weights.init import init_fcmae

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


def encoder_export(cfg: PretrainConfig) -> Callable[[nn.Module], dict[str, Any]]:
    """The encoder alone in the official dense layout, under "model" as the released FCMAE
    encoders are (what fine-tuning loads), with the pixel statistics it was pretrained on."""
    return lambda model: {"model": model.encoder.state_dict(), "pixel_stats": cfg.pixel_stats}


def run(cfg: PretrainConfig, callbacks: list[Callback] = ()) -> dict[str, Any]:
    """Pretrain as cfg says; returns the final epoch record (with the checkpoint path)."""
    source, decoding = data_source(cfg.data), Decoding.for_model(cfg.in_chans)
    runtime = Runtime.for_training(cfg)

    def settle(recorded: dict[str, Any] | None) -> None:
        settle_stats(cfg, source, decoding, recorded, runtime.dist.is_main)

    # Nothing is written until the engine begins the run: a refused input leaves nothing.
    with Run.open(cfg, runtime.dist, settle) as run:
        stats = run_stats(cfg)
        transform = pretrain_transform(cfg.input_size, stats)
        dataset, description = source.unlabelled(transform, decoding, cfg.demo_images)
        log.info(description)
        seed_everything(cfg.seed)
        model = build_model(cfg)
        if cfg.init and run.resumed is None:
            init_fcmae(model, cfg.init)
        log_model(cfg, model, run.path)
        callbacks = list(callbacks)
        if cfg.recon_every:
            images = fixed_images(source, cfg.input_size, decoding, stats, RECON_IMAGES)
            display = Display.for_run(cfg.pixel_stats, cfg.in_chans, cfg.display_channels)
            callbacks.append(Reconstructions(images, cfg.recon_every, display, cfg.seed))
        return Engine(cfg, run, runtime).fit(
            model,
            dataset,
            train_step,
            collate_fn=collate,
            param_groups=param_groups(model, cfg.weight_decay, skip_declared=not cfg.decay_grn),
            callbacks=callbacks,
            exports={"encoder": encoder_export(cfg)},
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
