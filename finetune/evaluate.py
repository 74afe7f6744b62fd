"""Top-1 / top-5 evaluation: each epoch of finetune and linprobe, and `fcmae eval`."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fcmae
from fcmae import distributed as dist
from fcmae.data import ImageFiles, collate
from fcmae.engine import autocast, default_num_workers, pick_device, pick_precision
from fcmae.errors import UserError
from fcmae.runlog import close_logging, setup_logging
from finetune.config import EvalConfig, require
from finetune.data import class_folder, eval_transform
from finetune.weights import check_fits, load_weights, read_checkpoint

log = logging.getLogger("fcmae")


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], loader: DataLoader, device: torch.device,
             mixed_precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             rank: int = 0, world_size: int = 1) -> dict[str, dict[str, float]]:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) of each model on loader's dataset.

    Each model maps (N, C, H, W) to logits (N, classes), under mixed_precision(); all see the
    same batches, so images are decoded once. Under DDP each rank passes a loader over its
    shard from a DistributedSampler(shuffle=False); that sampler pads the last shard with
    repeats, which are left out, so every image counts once. The sums are all-reduced.
    Returns {name: {"loss", "acc1", "acc5", "images"}}.
    """
    size = len(loader.dataset)
    # Per model: summed loss, top-1 hits, top-5 hits, images.
    totals = torch.zeros(len(models), 4, dtype=torch.float64, device=device)
    for model in models.values():
        model.eval()
    seen = 0
    for batch in loader:
        images, labels = batch.images.to(device), batch.labels.to(device)
        # Sample j of this rank's shard is image rank + world_size * j of the padded list.
        positions = rank + world_size * (seen + torch.arange(len(labels), device=device))
        real = positions < size
        seen += len(labels)
        for i, model in enumerate(models.values()):
            with mixed_precision():
                logits = model(images).float()
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            loss = F.cross_entropy(logits, labels, reduction="none")
            totals[i] += torch.stack([loss[real].sum(), hits[real, 0].sum(),
                                      hits[real].any(1).sum(), real.sum()]).double()
    dist.all_reduce_sum(totals)
    return {name: {"loss": loss / count, "acc1": 100 * top1 / count, "acc5": 100 * top5 / count,
                   "images": int(count)}
            for name, (loss, top1, top5, count) in zip(models, totals.tolist())}


def run(cfg: EvalConfig) -> dict[str, Any]:
    """`fcmae eval`: a classifier checkpoint on an ImageFolder; returns evaluate()'s dict."""
    handlers = setup_logging(None, 0)
    try:
        require(cfg, "checkpoint", "data")
        ckpt = read_checkpoint(cfg.checkpoint, "--checkpoint")
        if ckpt.num_classes is None:
            raise UserError(f"{cfg.checkpoint} has no classifier head; fine-tune it first "
                            f"(fcmae finetune), or evaluate its features with fcmae knn or "
                            f"fcmae linprobe.")
        check_fits(ckpt, cfg.model or ckpt.model, cfg.in_chans or ckpt.in_chans)
        files, labels, classes = class_folder(cfg.data, "--data")
        if len(classes) != ckpt.num_classes:
            raise UserError(f"The head of {cfg.checkpoint} has {ckpt.num_classes} classes but "
                            f"{cfg.data} has {len(classes)} class folders; evaluate on a folder "
                            f"of the classes it was trained on.")
        device = pick_device(cfg.device)
        precision = pick_precision(cfg.precision, device)
        model = fcmae.create_model(ckpt.model, num_classes=ckpt.num_classes,
                                   in_chans=ckpt.in_chans)
        load_weights(model, ckpt)
        dataset = ImageFiles(files, labels, eval_transform(
            cfg.input_size, ckpt.in_chans, cfg.crop_pct), in_chans=3)
        workers = default_num_workers() if cfg.num_workers is None else cfg.num_workers
        loader = DataLoader(dataset, cfg.batch_size, num_workers=workers, collate_fn=collate)
        results = evaluate({"model": model.to(device)}, loader, device,
                           lambda: autocast(device, precision))["model"]
        log.info("%s on %s: top-1 %.2f%%  top-5 %.2f%%  loss %.4f  (%d images, %d classes, %d "
                 "px)", cfg.checkpoint, cfg.data, results["acc1"], results["acc5"],
                 results["loss"], results["images"], len(classes), cfg.input_size)
        return results
    finally:
        close_logging(handlers)
