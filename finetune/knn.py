"""`fcmae knn`: k-nearest-neighbour classification on an encoder's frozen features (cosine
similarity, votes weighted by exp(similarity / temperature), as in DINO's evaluation); the
features can be written to disk for other tools."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import fcmae
from fcmae.data.sources import ImageFiles, collate, data_source, run_stats
from fcmae.errors import UserError
from fcmae.finetune.config import KnnConfig
from fcmae.finetune.data import eval_transform, labelled_datasets, settle_labelled
from fcmae.finetune.evaluate import accuracy_text
from fcmae.run.checkpoint import save_atomic
from fcmae.run.files import replaceable, writable
from fcmae.train.runtime import Runtime
from fcmae.weights.layouts import build_model, check_fits, read_weights

log = logging.getLogger("fcmae")


@torch.no_grad()
def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """train_features (M, D), train_labels (M,), features (N, D) -> class scores (N, classes).

    Each of the k nearest (cosine) train features votes for its class with weight
    exp(similarity / temperature), taken relative to the nearest one's so that no temperature
    overflows; scores are the votes' sums (their order is what counts). k <= M."""
    train_features = F.normalize(train_features.float(), dim=1)
    scores = []
    for part in F.normalize(features.float(), dim=1).split(chunk):
        similarity, nearest = (part @ train_features.T).topk(k, dim=1)
        weights = ((similarity - similarity[:, :1]) / temperature).exp()  # the nearest: 1
        votes = F.one_hot(train_labels[nearest], num_classes).float()
        scores.append((votes * weights.unsqueeze(-1)).sum(1))
    return torch.cat(scores)


@torch.no_grad()
def extract(
    encoder: nn.Module, loader: DataLoader, runtime: Runtime
) -> tuple[torch.Tensor, torch.Tensor]:
    """Globally average-pooled last-stage features (N, D) float32 and labels (N,), on the CPU,
    in the loader's order: what the linear probe sees."""
    encoder.eval()
    features, labels = [], []
    for batch in loader:
        with runtime.autocast():
            pooled = encoder.forward_features(batch.images.to(runtime.device)).mean(dim=(2, 3))
        features.append(pooled.float().cpu())
        labels.append(batch.labels)
    return torch.cat(features), torch.cat(labels)


def feature_files(cfg: KnnConfig) -> dict[str, Path]:
    """Where --save-features writes, by split (FOLDER/train.pt and val.pt), checked writable
    and not over a file of the user's."""
    writable(cfg.save_features, "--save-features", folder=True)
    files = {split: Path(cfg.save_features, f"{split}.pt") for split in ("train", "val")}
    replaceable(list(files.values()), "--save-features", cfg.overwrite)
    return files


def save_features(
    path: Path,
    features: torch.Tensor,
    labels: torch.Tensor,
    dataset: ImageFiles,
    classes: list[str],
) -> None:
    """{features (N, D), labels (N,), classes, files} at path, readable with weights_only."""
    save_atomic(
        {
            "features": features,
            "labels": labels,
            "classes": classes,
            "files": [str(f) for f in dataset.files],
        },
        path,
    )


def run(cfg: KnnConfig) -> dict[str, Any]:
    """`fcmae knn`: classify val/ by its k nearest train/ features; returns top-1/top-5 (%)."""
    given = (cfg.data, cfg.train, cfg.val)
    shards = next((p for p in given if data_source(p).kind == "shards"), None)
    if shards:
        raise UserError(
            f"fcmae knn reads image folders, and {shards} names WebDataset shards; pass "
            f"--data DIR (holding train/ and val/), or --train DIR and --val DIR."
        )
    weights = read_weights(cfg.pretrained, "--pretrained") if cfg.pretrained else None
    model = cfg.model or (weights.model if weights else "convnextv2_atto")
    cfg.in_chans = in_chans = cfg.in_chans or (weights.in_chans if weights else 3)
    if weights:  # another channel count is adapted, as fine-tuning adapts it
        check_fits(weights, model, in_chans, weights.grn, adapt=True)
    settle_labelled(cfg, weights, main=True)(None)  # the encoder's statistics, by default
    transform = eval_transform(cfg.input_size, in_chans, run_stats(cfg), cfg.crop_pct)
    train_set, val_set, classes = labelled_datasets(
        cfg.data, cfg.train, cfg.val, transform, transform, in_chans
    )
    files = feature_files(cfg) if cfg.save_features else {}  # checked before the long part
    if weights:
        encoder = build_model(weights, "encoder", in_chans=in_chans)
    else:
        encoder = fcmae.create_model(model, in_chans=in_chans, head=False)
        log.warning(
            "No --pretrained checkpoint: features of a randomly initialised encoder (a baseline)."
        )
    runtime = Runtime(cfg.device, cfg.precision, cfg.num_workers)
    results = classify(encoder, train_set, val_set, classes, cfg, runtime, files)
    log.info(
        "kNN (k=%d, T=%g) on %d-dim features: %s  (%d val images, %d train images, %d classes)%s",
        results.pop("k"),
        cfg.temperature,
        results.pop("dims"),
        accuracy_text(results),
        len(val_set),
        len(train_set),
        len(classes),
        f"; features in {cfg.save_features}" if cfg.save_features else "",
    )
    return results


def classify(
    encoder: nn.Module,
    train_set: ImageFiles,
    val_set: ImageFiles,
    classes: list[str],
    cfg: KnnConfig,
    runtime: Runtime,
    files: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """val_set classified by its cfg.k nearest train_set features (cfg.temperature,
    cfg.batch_size): {"acc1", "acc5" (more than five classes), "images", "k" (as used), "dims"};
    files: where to save each split's features. The encoder's mode and device change."""
    encoder.to(runtime.device)
    features = {}
    for name, dataset in (("train", train_set), ("val", val_set)):
        loader = runtime.loader(
            dataset, cfg.batch_size, shuffle=False, drop_last=False, collate_fn=collate
        )
        features[name] = extract(encoder, loader, runtime)
        if files:
            save_features(files[name], *features[name], dataset, classes)
    (train_x, train_y), (val_x, val_y) = features["train"], features["val"]
    k = min(cfg.k, len(train_y))
    if k < cfg.k:
        log.warning("--k %d exceeds the %d train images: using k=%d.", cfg.k, len(train_y), k)
    scores = knn_predict(train_x, train_y, val_x, len(classes), k, cfg.temperature)
    hits = scores.topk(min(5, len(classes)), dim=1).indices == val_y[:, None]
    return {
        "acc1": 100 * hits[:, 0].float().mean().item(),
        **({"acc5": 100 * hits.any(1).float().mean().item()} if len(classes) > 5 else {}),
        "images": len(val_y),
        "k": k,
        "dims": train_x.shape[1],
    }
