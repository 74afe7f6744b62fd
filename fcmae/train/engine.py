"""The one training loop that pretraining and fine-tuning share: fit, the epoch and the step.

A job seeds, builds a model, a dataset and a step function, opens the Run (fcmae.run.run: the
directory, its checkpoints and sinks) and hands them to ``Engine.fit``; the engine is the loop
and composes the rest: device, precision, processes and loaders (fcmae.train.runtime), the
optimizer and schedule (fcmae.train.optim), what it shows (fcmae.train.progress) and the
sentences for what stops a run (fcmae.train.failures). It writes nothing itself, imports no
model code and names no parameter.

    runtime = Runtime.for_training(cfg)       # cfg: a fcmae.config.commands.TrainConfig
    with Run.open(cfg, runtime.dist) as run:
        seed_everything(cfg.seed)
        Engine(cfg, run, runtime).fit(model, dataset, train_step,
            param_groups=None,               # default: fcmae.train.optim.param_groups(model, wd)
            callbacks=[ema, evaluator],      # fcmae.train.callbacks.Callback
            extra_state={"ema": ema},        # saved in and restored from checkpoints
            exports={"encoder": lambda m: {"model": m.encoder.state_dict()}})

``train_step(model, batch) -> (loss, metrics)`` runs under autocast on a batch already on the
device; loss is a scalar tensor, metrics a dict of scalars (averaged and logged).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from fcmae.data.sources import Batch
from fcmae.errors import UserError
from fcmae.run.checkpointer import Exports, Stateful, TrainState
from fcmae.run.run import Run
from fcmae.train import distributed as dist
from fcmae.train.callbacks import Callback, Context
from fcmae.train.failures import as_sentences, non_finite
from fcmae.train.optim import BatchPlan, adamw, lr_at, param_groups, plan_batches
from fcmae.train.progress import (
    Meter,
    Progress,
    log_done,
    log_epoch,
    log_nothing_to_do,
    run_record,
)
from fcmae.train.runtime import Runtime, seed_everything, to_device

log = logging.getLogger("fcmae")

TrainStep = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


class Engine:
    """The loop of one run: cfg (a TrainConfig), the open Run, and the Runtime it runs on."""

    def __init__(self, cfg: Any, run: Run, runtime: Runtime):
        self.cfg, self.run, self.runtime = cfg, run, runtime

    def fit(
        self,
        model: nn.Module,
        dataset: Dataset,
        train_step: TrainStep,
        *,
        collate_fn: Callable | None = None,
        param_groups: list[dict] | None = None,
        callbacks: list[Callback] = (),
        extra_state: dict[str, Stateful] | None = None,
        exports: Exports | None = None,
    ) -> dict[str, Any]:
        """Train model on dataset for cfg.epochs, resuming from what the Run found.

        collate_fn: the loader's (e.g. fcmae.data.sources.collate). param_groups: AdamW groups;
        a group's "lr_scale" (layer decay) multiplies the scheduled lr; default
        fcmae.train.optim.param_groups. extra_state: objects kept in checkpoints. exports: kind
        -> fn(model) -> what KIND-NNNN.pth beside each checkpoint holds. Returns the final epoch
        record with "checkpoint" and "exports" (kind -> path)."""
        cfg, run, runtime = self.cfg, self.run, self.runtime
        exports = dict(exports or {})
        plan = self._plan(dataset)  # refuses a dataset too small before anything is written
        run.begin()
        state = self._prepare(model, plan, param_groups, extra_state)
        seed_everything(cfg.seed, runtime.dist.rank, 0)  # masks, dropout, augmentation
        run.restore(state)
        if state.epoch >= cfg.epochs:
            log_nothing_to_do(run.path, state.epoch)
            return self._result({"epoch": state.epoch, "step": state.global_step}, state, exports)
        metrics = run.open_metrics(state.global_step)
        ctx = Context(
            model,
            cfg.epochs,
            run,
            runtime,
            metrics,
            lambda tag: run.save(state, exports, tag),
            state.epoch,
            state.global_step,
        )
        loop = Loop(cfg, runtime, plan, state, runtime.wrap(model, cfg.compile), train_step)
        progress = Progress(cfg.epochs, plan.steps_per_epoch) if metrics else None
        record: dict[str, Any] = {}
        with as_sentences(
            runtime.device, runtime.precision, cfg.batch_size, runtime.dist.rank, cfg.dist_timeout
        ):
            if metrics:
                metrics.write(run_record(runtime, plan, state.global_step))
            while state.epoch < cfg.epochs:
                record = loop.epoch(dataset, collate_fn, callbacks, ctx, progress)
                for callback in callbacks:
                    record.update(callback.on_epoch_end(ctx) or {})
                if metrics:
                    metrics.write(record)
                log_epoch(record, cfg.epochs)
                if state.epoch % cfg.save_every == 0 or state.epoch == cfg.epochs:
                    run.save(state, exports)
        log_done(state.last_checkpoint, self._exports(state, exports), run.path)
        return self._result(record, state, exports)

    def _plan(self, dataset: Dataset) -> BatchPlan:
        batches = self.runtime.batches_per_epoch(dataset, self.cfg.batch_size)
        plan = plan_batches(self.cfg, self.runtime.dist.world_size, batches)
        if plan.steps_per_epoch == 0:
            raise UserError(
                f"The dataset of {len(dataset)} images is smaller than one optimizer step "
                f"({plan.effective_batch} images); lower --batch-size or --effective-batch."
            )
        return plan

    def _prepare(
        self,
        model: nn.Module,
        plan: BatchPlan,
        groups: list[dict] | None,
        extra_state: dict[str, Stateful] | None,
    ) -> TrainState:
        """Model on the device; AdamW, the fp16 loss scaler and the state they make."""
        cfg, device = self.cfg, self.runtime.device
        model.to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = adamw(groups or param_groups(model, cfg.weight_decay), cfg.betas, device)
        scaler = torch.amp.GradScaler(device.type, enabled=self.runtime.precision == "fp16")
        return TrainState(model, optimizer, scaler, plan.steps_per_epoch, dict(extra_state or {}))

    def _exports(self, state: TrainState, exports: Exports) -> dict[str, Any]:
        """kind -> path of the exports written with the last numbered checkpoint."""
        return {kind: self.run.checkpoints.file(state.epoch, kind) for kind in exports}

    def _result(
        self, record: dict[str, Any], state: TrainState, exports: Exports
    ) -> dict[str, Any]:
        """The final record, with the last checkpoint and its exports."""
        paths = {kind: str(path) for kind, path in self._exports(state, exports).items()}
        return {**record, "checkpoint": str(state.last_checkpoint), "exports": paths}


class Loop:
    """Epochs and optimizer steps over one TrainState, as the BatchPlan lays them out."""

    def __init__(
        self,
        cfg: Any,
        runtime: Runtime,
        plan: BatchPlan,
        state: TrainState,
        model: nn.Module,
        train_step: TrainStep,
    ):
        self.cfg, self.runtime, self.plan, self.state = cfg, runtime, plan, state
        self.model, self.train_step = model, train_step  # model: as it runs (DDP, compiled)

    def epoch(
        self,
        dataset: Dataset,
        collate_fn: Callable | None,
        callbacks: list[Callback],
        ctx: Context,
        progress: Progress | None,
    ) -> dict[str, Any]:
        """One epoch of optimizer steps; returns the epoch record."""
        cfg, state, steps = self.cfg, self.state, self.plan.steps_per_epoch
        epoch = state.epoch
        self.model.train()
        batches = iter(self.runtime.loader(dataset, cfg.batch_size, epoch, collate_fn=collate_fn))
        meter = Meter(self.runtime.dist.world_size)
        for i in range(steps):
            lr = lr_at(
                epoch + i / steps, self.plan.peak_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs
            )
            stats, grad_norm = self.step(batches, lr, i)
            state.global_step += 1
            ctx.step = state.global_step
            for callback in callbacks:
                callback.on_step_end(ctx)
            meter.add(stats)
            if meter.window_steps == cfg.log_every or i + 1 == steps:
                record = {
                    "type": "step",
                    "step": state.global_step,
                    "epoch": epoch + (i + 1) / steps,
                }
                record.update(meter.window(), lr=lr)
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                if ctx.metrics:
                    ctx.metrics.write(record)
                if progress:
                    left = (cfg.epochs - epoch) * steps - (i + 1)
                    progress.update(epoch, i, record, meter.elapsed() / (i + 1) * left)
        if progress:
            progress.end_epoch()
        state.epoch += 1
        ctx.epoch = state.epoch
        return {"type": "epoch", "step": state.global_step, "epoch": state.epoch, "lr": lr} | (
            meter.epoch()
        )

    def step(self, batches: Iterator, lr: float, i: int) -> tuple[dict[str, float], float | None]:
        """One optimizer step over accum_iter micro-batches. Returns the step's statistics
        averaged over processes (loss, metrics, images and unreadable files per process) and
        the gradient norm when clipping."""
        state, accum, runtime = self.state, self.plan.accum_iter, self.runtime
        for group in state.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        totals: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = next(batches)
            skipped = batch.skipped.sum() if isinstance(batch, Batch) else 0
            images = _count(batch)
            batch = to_device(batch, runtime.device, self.cfg.channels_last)
            # Gradients are all-reduced only on the last micro-batch of each step.
            last = micro == accum - 1
            sync = last or not runtime.dist.enabled
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with runtime.autocast():
                    loss, metrics = self.train_step(self.model, batch)
                state.scaler.scale(loss / accum).backward()
            for k, v in {"loss": loss, **metrics}.items():
                _add(totals, k, v / accum, runtime.device)
            _add(totals, "images", images, runtime.device)
            _add(totals, "skipped", skipped, runtime.device)
        # One all-reduce per step: the mean loss for the log, and every process learns at the
        # same step whether any saw a nan, so all stop together.
        names = sorted(totals)
        summed = dist.all_reduce_sum(torch.stack([totals[k] for k in names]))
        stats = dict(zip(names, (summed / runtime.dist.world_size).tolist()))
        if not math.isfinite(stats["loss"]):
            raise self._non_finite(stats["loss"], i)
        grad_norm = None
        if self.cfg.clip_grad is not None:
            state.scaler.unscale_(state.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(state.model.parameters(), self.cfg.clip_grad)
            grad_norm = grad_norm.item()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        return stats, grad_norm

    def _non_finite(self, loss: float, i: int) -> UserError:
        cfg = self.cfg
        flag, value = ("--lr", cfg.lr) if cfg.lr is not None else ("--blr", cfg.blr)
        where = f"epoch {self.state.epoch + 1}, step {i + 1}"
        last = self.state.last_checkpoint
        return non_finite(loss, where, flag, value, self.runtime.precision, last)


def _add(totals: dict[str, torch.Tensor], key: str, value: Any, device: torch.device) -> None:
    """totals[key] += value, kept on the device without a sync.

    In float32, which every device has (MPS has no float64): a step sums a few micro-batches'
    values and counts below 2**24, exact enough; the epoch's sums are kept on the CPU, in
    Python floats (fcmae.train.progress.Meter)."""
    value = torch.as_tensor(value, device=device).detach().float()
    totals[key] = totals[key] + value if key in totals else value


def _count(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    return next(_count(b) for b in items if isinstance(b, (torch.Tensor, tuple, list, dict)))
