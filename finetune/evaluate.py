"""Top-1 / top-5 evaluation: each epoch of finetune and linprobe (Evaluator), and `fcmae eval`."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fcmae.config.schema import require
from fcmae.data.folders import class_folder
from fcmae.data.sources import Batch, ImageFiles, collate
from fcmae.data.stats import LEGACY, PixelStats, parse_stats
from fcmae.errors import UserError
from fcmae.finetune.classifier import build_classifier, class_names, head_classes
from fcmae.finetune.config import EvalConfig
from fcmae.finetune.data import eval_transform, labelled_decoding
from fcmae.train import distributed as dist
from fcmae.train.callbacks import Callback, Context
from fcmae.train.runtime import Runtime
from fcmae.weights.layouts import Weights, check_fits, read_weights

log = logging.getLogger("fcmae")

METRIC_PREFIX = {"model": "val", "EMA": "ema"}  # epoch records: val_acc1, ema_acc1, ...


@torch.no_grad()
def evaluate(
    models: dict[str, nn.Module], loader: DataLoader, runtime: Runtime
) -> dict[str, dict[str, float]]:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) of each model on loader's dataset.

    Each model maps (N, C, H, W) to logits (N, classes), on runtime's device under its
    autocast; all see the same batches, so images are decoded once. Under DDP each rank
    passes a loader over its
    shard from a DistributedSampler(shuffle=False); that sampler pads the last shard with
    repeats, which are left out, so every image counts once (WebDataset shards give each rank
    its own samples, unpadded). The sums are all-reduced.
    An image whose file is unreadable is left out (the loader's stand-in for it does not
    count) and counted in "skipped".
    Returns {name: {"loss", "acc1", "acc5", "images", "skipped"}}; "acc5" only with more than
    five classes, where it means something.
    """
    device = runtime.device
    size = math.inf if isinstance(loader.dataset, IterableDataset) else len(loader.dataset)
    # Per model: top-1 hits, top-5 hits, images, unreadable images, counted in int64; and the
    # summed loss, each batch's sum in float32 on the device (MPS has no float64), added up
    # on the CPU at the end, so an epoch of batches loses no precision to the sum.
    counts = torch.zeros(len(models), 4, dtype=torch.int64, device=device)
    batch_losses: list[torch.Tensor] = []  # (models,) per batch
    for model in models.values():
        model.eval()
    seen, classes = 0, 0
    for batch in loader:
        images, labels = batch.images.to(device), batch.labels.to(device)
        real, unreadable = _counted(batch, seen, size, runtime)
        seen += len(labels)
        losses = []
        for i, model in enumerate(models.values()):
            with runtime.autocast():
                logits = model(images).float()
            classes = logits.shape[1]
            hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            losses.append(F.cross_entropy(logits, labels, reduction="none")[real].sum())
            counts[i] += torch.stack(
                [hits[real, 0].sum(), hits[real].any(1).sum(), real.sum(), unreadable.sum()]
            )
        batch_losses.append(torch.stack(losses))
    # One transfer of every batch's sums, added exactly (math.fsum) in Python floats; across
    # processes in float32 (a few terms: one rounding) on the device, the counts in int64.
    per_batch = torch.stack(batch_losses).tolist() if batch_losses else []
    summed = [math.fsum(row[i] for row in per_batch) for i in range(len(models))]
    loss_sums = dist.all_reduce_sum(torch.tensor(summed, device=device)).tolist()
    dist.all_reduce_sum(counts)
    return {
        name: {
            "loss": loss / count,
            "acc1": 100 * top1 / count,
            **({"acc5": 100 * top5 / count} if classes > 5 else {}),
            "images": count,
            "skipped": skipped,
        }
        for name, loss, (top1, top5, count, skipped) in zip(models, loss_sums, counts.tolist())
    }


def _counted(
    batch: Batch, seen: int, size: float, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which images of a batch of this rank's shard count, (real, unreadable) on the device:
    real, neither the sampler's padding (past size images) nor an unreadable file's stand-in;
    unreadable, the stand-ins. seen: the images of the shard before this batch."""
    rank, world_size = runtime.dist.rank, runtime.dist.world_size
    # Sample j of this rank's shard is image rank + world_size * j of the padded list.
    positions = rank + world_size * (seen + torch.arange(len(batch.labels), device=runtime.device))
    real = positions < size
    unreadable = real & batch.skipped.to(runtime.device)
    return real & ~unreadable, unreadable


def accuracy_text(result: dict[str, float]) -> str:
    """Top-1, top-5 where there are more than five classes, and the unreadable images left
    out, if any, as the logs print them."""
    top5 = f"  top-5 {result['acc5']:.2f}%" if "acc5" in result else ""
    skipped = result.get("skipped", 0)
    left_out = f"  ({skipped} unreadable images left out)" if skipped else ""
    return f"top-1 {result['acc1']:.2f}%{top5}{left_out}"


class Evaluator(Callback):
    """Engine callback: after each epoch, top-1/top-5 of the model and of its EMA on the
    validation set; a new best top-1 (of either) writes checkpoint-best.pth. Its state (the
    best so far) lives in checkpoints, so a resumed run keeps comparing against it."""

    def __init__(self, dataset: Dataset, batch_size: int, ema: ModelEmaV3 | None):
        self.dataset, self.batch_size, self.ema = dataset, batch_size, ema
        self.best = {"acc1": -1.0, "epoch": 0, "weights": ""}

    def on_epoch_end(self, ctx: Context) -> dict[str, Any]:
        epoch, runtime = ctx.epoch, ctx.runtime
        loader = runtime.loader(
            self.dataset, self.batch_size, epoch, shuffle=False, drop_last=False, collate_fn=collate
        )
        models = {"model": ctx.model, **({"EMA": self.ema.module} if self.ema else {})}
        results = evaluate(models, loader, runtime)
        for name, r in results.items():
            log.info("epoch %d  %-5s %s  loss %.4f", epoch, name, accuracy_text(r), r["loss"])
        name, top1 = max(((n, r["acc1"]) for n, r in results.items()), key=lambda x: x[1])
        if top1 > self.best["acc1"]:
            self.best = {"acc1": top1, "epoch": epoch, "weights": name}
            ctx.save_checkpoint("best")
        return {
            **{
                f"{METRIC_PREFIX[n]}_{k}": v
                for n, r in results.items()
                for k, v in r.items()
                if k != "images"
            },
            "best_acc1": self.best["acc1"],
        }

    def state_dict(self) -> dict[str, Any]:
        return dict(self.best)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state)


def trained_stats(weights: Weights) -> PixelStats:
    """The statistics a classifier was trained with, as its file records them; ImageNet's for
    a file from before they were recorded."""
    if weights.pixel_stats is None and weights.in_chans not in (1, 3):
        raise UserError(
            f"{weights.source} records no pixel statistics, and ImageNet's hold 1 or 3 channels, "
            f"not {weights.in_chans}; evaluate the fcmae checkpoint it was exported from."
        )
    return parse_stats(weights.pixel_stats or LEGACY, weights.in_chans)


def run(cfg: EvalConfig) -> dict[str, Any]:
    """`fcmae eval`: a classifier checkpoint on an ImageFolder; returns evaluate()'s dict."""
    require(cfg, "checkpoint", "data")
    weights = read_weights(cfg.checkpoint, "--checkpoint")
    num_classes, trained_on = head_classes(weights), class_names(weights)
    if num_classes is None:
        raise UserError(
            f"{cfg.checkpoint} has no classifier head; fine-tune it first "
            f"(fcmae finetune), or evaluate its features with fcmae knn or "
            f"fcmae linprobe."
        )
    model, in_chans = cfg.model or weights.model, cfg.in_chans or weights.in_chans
    check_fits(weights, model, in_chans, weights.grn)
    files, labels, classes = class_folder(cfg.data, "--data")
    if len(classes) != num_classes:
        raise UserError(
            f"The head of {cfg.checkpoint} has {num_classes} classes but "
            f"{cfg.data} has {len(classes)} class folders; evaluate on a folder "
            f"of the classes it was trained on."
        )
    if trained_on is not None and trained_on != classes:
        differ = [f"{a} -> {b}" for a, b in zip(trained_on, classes) if a != b]
        raise UserError(
            f"The class folders of {cfg.data} are not those {cfg.checkpoint} was trained "
            f"on ({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}); name "
            f"them as in training, in the same order."
        )
    runtime = Runtime(cfg.device, cfg.precision, cfg.num_workers)
    model = build_classifier(weights)
    transform = eval_transform(cfg.input_size, in_chans, trained_stats(weights), cfg.crop_pct)
    dataset = ImageFiles(files, labels, transform, labelled_decoding(in_chans))
    loader = runtime.loader(
        dataset, cfg.batch_size, shuffle=False, drop_last=False, collate_fn=collate
    )
    results = evaluate({"model": model.to(runtime.device)}, loader, runtime)["model"]
    log.info(
        "%s on %s: %s  loss %.4f  (%d images, %d classes, %d px)",
        cfg.checkpoint,
        cfg.data,
        accuracy_text(results),
        results["loss"],
        results["images"],
        len(classes),
        cfg.input_size,
    )
    return results
