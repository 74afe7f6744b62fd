"""Quality watched while pretraining: `fcmae pretrain --monitor-data LABELLED --monitor-every K`.

Every K epochs and at the end, the encoder as it stands is scored by kNN on a labelled folder
(train/ and val/ ImageFolders) exactly as `fcmae knn --pretrained` scores the encoder's export
(fcmae.finetune.knn.classify: k 20, or every train image when there are fewer; temperature
0.07; the evaluation crop at the pretraining size; the run's pixel statistics), and the top-1
joins the epoch record as knn_acc1 (with more than five classes, the top-5 as knn_acc5):
metrics.jsonl, TensorBoard, the trackers, fcmae plot.
The main process measures, on the run's device, with the random state set aside, so that a
monitored run trains exactly as an unmonitored one; under torchrun the others wait for it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

import fcmae
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.data.sources import run_stats
from fcmae.finetune.config import KnnConfig
from fcmae.finetune.data import check_labelled, eval_transform, labelled_datasets
from fcmae.finetune.knn import classify
from fcmae.pretrain import job
from fcmae.train.callbacks import Callback, Context
from fcmae.train.runtime import Runtime

log = logging.getLogger("fcmae")


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """`fcmae pretrain`: the pretraining job (fcmae.pretrain.job.run), watched by a KnnMonitor
    when cfg.monitor_data is given; returns the final epoch record."""
    return job.run(cfg, [KnnMonitor(cfg)] if cfg.monitor_data else [])


class KnnMonitor(Callback):
    """The pretraining callback of the module's docstring. Its folder is checked when it is
    made, before the run writes anything; its images are read when it first measures, once
    the run's pixel statistics are settled."""

    def __init__(self, cfg: PretrainConfig):
        check_labelled(cfg.monitor_data, "--monitor-data", cfg.data)
        self.cfg = cfg
        self.knn = resolve(KnnConfig, flags={"data": cfg.monitor_data, "model": cfg.model})
        self.sets: tuple | None = None  # (train set, val set, classes)
        self.runtime: Runtime | None = None
        self.dense: torch.nn.Module | None = None

    def on_epoch_end(self, ctx: Context) -> dict[str, Any] | None:
        epoch, every = ctx.epoch, self.cfg.monitor_every
        if not ctx.runtime.dist.is_main or (epoch % every and epoch != ctx.epochs):
            return None
        start = time.perf_counter()
        cuda = [ctx.runtime.device] if ctx.runtime.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            results = self.measure(ctx.model.encoder, ctx.runtime)
        log.info(
            "kNN monitor after epoch %d: top-1 %.2f%% on the %d val images of %s (%.1f s).",
            epoch,
            results["acc1"],
            results["images"],
            self.cfg.monitor_data,
            time.perf_counter() - start,
        )
        return {f"knn_{key}": results[key] for key in ("acc1", "acc5") if key in results}

    def measure(self, encoder: torch.nn.Module, runtime: Runtime) -> dict[str, Any]:
        """fcmae.finetune.knn.classify's results for the encoder's weights, loaded into a
        dense encoder (what `fcmae knn` builds from an export of them)."""
        cfg = self.cfg
        if self.sets is None:  # once: the images, the runtime, the dense encoder
            transform = eval_transform(
                cfg.input_size, cfg.in_chans, run_stats(cfg), self.knn.crop_pct
            )
            self.sets = labelled_datasets(
                cfg.monitor_data, None, None, transform, transform, cfg.in_chans
            )
            train = len(self.sets[0])
            if train < self.knn.k:
                log.warning(
                    "The kNN monitor's %d train images all vote (fewer than k=%d).",
                    train,
                    self.knn.k,
                )
                self.knn.k = train
            self.runtime = Runtime(str(runtime.device), runtime.precision, runtime.num_workers)
            self.dense = fcmae.create_model(
                cfg.model, in_chans=cfg.in_chans, grn=cfg.grn, head=False
            )
        self.dense.load_state_dict(encoder.state_dict())
        return classify(self.dense, *self.sets, self.knn, self.runtime)
