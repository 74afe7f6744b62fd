"""`fcmae visualize`: the reconstruction grid of a pretraining checkpoint, as a PNG.

The model is the one the checkpoint holds (fcmae.weights.layouts.build_model), drawn by
fcmae.pretrain.recon on fixed images of --data (the embedded photos without it), with masks
from --seed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from fcmae.config.pictures import VisualizeConfig
from fcmae.config.schema import require
from fcmae.data.images import Decoding
from fcmae.data.sources import data_source, fixed_images
from fcmae.errors import UserError
from fcmae.models.masking import check_masking
from fcmae.pretrain.recon import Display, reconstruct, save_grid
from fcmae.run.files import fcmae_png, replaceable, writable
from fcmae.train.runtime import pick_device
from fcmae.weights.layouts import build_model, read_weights

log = logging.getLogger("fcmae")


def run(cfg: VisualizeConfig) -> Path:
    """`fcmae visualize`: the grid of a checkpoint's reconstructions, written to a PNG."""
    require(cfg, "checkpoint")
    output = Path(cfg.output_file())
    weights = read_weights(cfg.checkpoint, "--checkpoint")
    if not weights.has_decoder:
        raise UserError(
            f"{weights.source} holds no decoder: reconstructions need a pretraining checkpoint "
            f"(checkpoints/checkpoint-NNNN.pth of fcmae pretrain, or an official "
            f"main_pretrain.py checkpoint), not an encoder export."
        )
    model = build_model(weights, "fcmae", mask_ratio=cfg.mask_ratio)
    size = cfg.input_size or weights.settings.get("input_size", 224)
    masked, patches = check_masking(size, model.patch_size, model.mask_ratio)
    device = pick_device(cfg.device)
    stats = weights.pixel_stats or "imagenet"  # checkpoints from before the statistics
    display = Display.for_run(stats, weights.in_chans, cfg.display_channels)
    source, decoding = data_source(cfg.data), Decoding.for_model(weights.in_chans)
    images = fixed_images(source, size, decoding, display.stats, cfg.images)
    writable(output, "--output", suffixes=(".png",))
    replaceable([Path(output)], "--output", cfg.overwrite, ours=fcmae_png)
    panels = reconstruct(
        model.to(device),
        images,
        generator=torch.Generator().manual_seed(cfg.seed),
        display=display,
    )
    save_grid(panels, output)
    log.info(
        "Wrote %s: %d images of %d px, %d of %d patches of %d px masked (mask ratio %g), seed %d.",
        output,
        len(images),
        size,
        masked,
        patches,
        model.patch_size,
        model.mask_ratio,
        cfg.seed,
    )
    return output
