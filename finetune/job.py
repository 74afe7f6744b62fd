"""The finetune job: a pretrained (or fresh) ConvNeXt V2 becomes a classifier, trained by the
engine with the paper's recipe; model and EMA are evaluated every epoch, the best is kept.

Run directory (besides the engine's logs and numbered checkpoints):
    checkpoints/checkpoint-best.pth   full state at the best epoch (model or EMA, see the log)
    checkpoints/ema-NNNN.pth, ema-best.pth   the EMA classifier alone, under "model"
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import Dataset

import fcmae
from fcmae.data import Batch, collate
from fcmae.engine import Engine
from finetune.config import FinetuneConfig
from finetune.data import check_num_classes, eval_transform, labelled_datasets, train_transform
from finetune.evaluate import evaluate
from finetune.layer_decay import param_groups
from finetune.weights import Checkpoint, check_fits, load_weights, read_checkpoint

log = logging.getLogger("fcmae")

METRIC_PREFIX = {"model": "val", "EMA": "ema"}  # epoch records: val_acc1, ema_acc1, ...


class Ema(ModelEmaV3):
    """timm's weight EMA, updated after every optimizer step (an engine callback)."""

    def on_step_end(self, engine: Engine) -> None:
        self.update(engine.raw_model)


class Evaluator:
    """Engine callback: after each epoch, top-1/top-5 of the model and of its EMA on the
    validation set; a new best top-1 (of either) writes checkpoint-best.pth. Its state (the
    best so far) lives in checkpoints, so a resumed run keeps comparing against it."""

    def __init__(self, dataset: Dataset, batch_size: int, ema: Ema | None):
        self.dataset, self.batch_size, self.ema = dataset, batch_size, ema
        self.best = {"acc1": -1.0, "epoch": 0, "weights": ""}

    def on_epoch_end(self, engine: Engine, epoch: int) -> dict[str, Any]:
        loader = engine.make_loader(self.dataset, self.batch_size, epoch, shuffle=False,
                                    drop_last=False, collate_fn=collate)
        models = {"model": engine.raw_model, **({"EMA": self.ema.module} if self.ema else {})}
        results = evaluate(models, loader, engine.device, engine.autocast, engine.dist.rank,
                           engine.dist.world_size)
        for name, r in results.items():
            log.info("epoch %d  %-5s top-1 %.2f%%  top-5 %.2f%%  loss %.4f", epoch, name,
                     r["acc1"], r["acc5"], r["loss"])
        name, top1 = max(((n, r["acc1"]) for n, r in results.items()), key=lambda x: x[1])
        if top1 > self.best["acc1"]:
            self.best = {"acc1": top1, "epoch": epoch, "weights": name}
            engine.save_checkpoint("best")
        return {**{f"{METRIC_PREFIX[n]}_{k}": v for n, r in results.items()
                   for k, v in r.items() if k != "images"}, "best_acc1": self.best["acc1"]}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.best)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = dict(state)


def make_step(cfg: FinetuneConfig, num_classes: int) -> Callable:
    """The step function: mixup/cutmix (timm) on the batch, then the recipe's loss."""
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        # Smoothing goes into the mixed soft targets, as timm and the official code do.
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                      label_smoothing=cfg.smoothing, num_classes=num_classes)
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        criterion = nn.CrossEntropyLoss()

    def step(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        images, targets = batch.images, batch.labels
        if mixup is not None:
            images, targets = mixup(images, targets)
        return criterion(model(images), targets), {}

    return step


def read_inputs(cfg: Any, train_tf: Callable) -> tuple[Dataset, Dataset, int, Checkpoint | None]:
    """(train set, val set, class count, --pretrained checkpoint or None) of a finetune or
    linprobe config. Bad data or checkpoints fail here, before a run directory is made."""
    train_set, val_set, classes = labelled_datasets(
        cfg.data, cfg.train, cfg.val, train_tf,
        eval_transform(cfg.input_size, cfg.in_chans, cfg.crop_pct))
    num_classes = check_num_classes(cfg.num_classes, classes, cfg.train or cfg.data)
    ckpt = read_checkpoint(cfg.pretrained, "--pretrained") if cfg.pretrained else None
    if ckpt:
        check_fits(ckpt, cfg.model, cfg.in_chans)
    return train_set, val_set, num_classes, ckpt


def run(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune as cfg says; returns the final epoch record (val/EMA metrics, checkpoint)."""
    train_set, val_set, num_classes, ckpt = read_inputs(
        cfg, train_transform(cfg.input_size, cfg.in_chans, cfg.auto_augment, cfg.reprob))
    engine = Engine(cfg)
    try:
        log.info("Data: %d training and %d validation images of %d classes.", len(train_set),
                 len(val_set), num_classes)
        model = fcmae.create_model(cfg.model, num_classes=num_classes, in_chans=cfg.in_chans,
                                   drop_path_rate=cfg.drop_path,
                                   head_init_scale=cfg.head_init_scale)
        if ckpt:
            load_weights(model, ckpt)
            del ckpt  # copied into the model: free the checkpoint's memory for the run
        else:
            log.info("No --pretrained checkpoint: training %s from scratch.", cfg.model)
        # The EMA copies the model where it will train, so both update on one device.
        ema = Ema(model.to(engine.device), decay=cfg.model_ema_decay) if cfg.model_ema else None
        evaluator = Evaluator(val_set, cfg.batch_size, ema)
        extra: dict[str, Any] = {"evaluator": evaluator}
        exports = {}
        if ema is not None:
            extra["ema"] = ema
            exports["ema"] = lambda _: {"model": ema.module.state_dict()}
        result = engine.fit(model, train_set, make_step(cfg, num_classes), collate_fn=collate,
                            param_groups=param_groups(model, cfg.weight_decay, cfg.layer_decay,
                                                      cfg.layer_decay_mode),
                            callbacks=[c for c in (ema, evaluator) if c is not None],
                            extra_state=extra, exports=exports)
        best = evaluator.best
        log.info("Best top-1 %.2f%% (%s weights, epoch %d): %s", best["acc1"], best["weights"],
                 best["epoch"], engine.ckpt_dir / ("ema-best.pth" if best["weights"] == "EMA"
                                                   else "checkpoint-best.pth"))
        return result
    finally:
        engine.close()
