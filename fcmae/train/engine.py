"""The one training loop that pretraining and fine-tuning share: fit and the optimizer step.

A job seeds, builds a model, a dataset and a step function, and hands them to ``Engine.fit``;
the engine composes the rest: the run directory (fcmae.run.rundir), its checkpoints
(fcmae.run.checkpointer), device, precision, processes and loaders (fcmae.train.runtime), logs
(fcmae.run.runlog) and the sentences for what stops a run (fcmae.train.failures). It imports no
model code and names no parameter.

    engine = Engine(cfg)                        # cfg: a fcmae.config.commands.TrainConfig
    seed_everything(cfg.seed)
    engine.fit(model, dataset, train_step,
               param_groups=None,               # default: fcmae.train.optim.param_groups(model, wd)
               callbacks=[ema, evaluator],      # fcmae.train.callbacks.Callback
               extra_state={"ema": ema},        # saved in and restored from checkpoints
               exports={"encoder": lambda m: {"model": m.encoder.state_dict()}})
    engine.close()

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

from fcmae.config.commands import TrainConfig
from fcmae.data.sources import Batch
from fcmae.errors import UserError
from fcmae.run.checkpointer import Checkpointer, Stateful, TrainState
from fcmae.run.rundir import EFFECTIVE, RunDir
from fcmae.run.runlog import (
    Meter,
    MetricsWriter,
    Progress,
    close_logging,
    log_done,
    log_epoch,
    log_nothing_to_do,
    setup_logging,
)
from fcmae.train import distributed as dist
from fcmae.train.callbacks import Callback, Context
from fcmae.train.failures import as_sentences, non_finite
from fcmae.train.optim import BatchPlan, adamw, batch_arithmetic, lr_at, param_groups, plan_batches
from fcmae.train.runtime import Runtime, seed_everything, to_device

log = logging.getLogger("fcmae")

TrainStep = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


class Engine:
    """A training run: its directory, runtime and checkpoints, and the loop.

    cfg, run_dir, runtime (device, precision, dist) and checkpointer exist from the start;
    plan (the BatchPlan) and state (the TrainState) once fit has begun.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = RunDir(cfg.output_dir or "runs/unnamed")
        self.runtime = Runtime(
            cfg.device, cfg.precision, cfg.num_workers, cfg.seed, True, cfg.dist_timeout
        )
        command, values = run_settings(cfg, self.runtime.dist.world_size)
        # Reads a --resume file before the run directory is touched: a refusal leaves nothing.
        self.checkpointer = Checkpointer(
            self.run_dir, self.runtime.dist, cfg.resume, values, cfg.keep_last, cfg.seed
        )
        keys, resumed = cfg.identity_keys(), self.checkpointer.resume_settings()
        self.changes = self.run_dir.accept(command, values, keys, cfg.accepted_changes(), resumed)
        is_main = self.runtime.dist.is_main
        if is_main:
            self.run_dir.lock()
        self._log_handlers = setup_logging(self.run_dir.path if is_main else None, self.rank)
        if is_main:  # accepted: now the directory is written
            self.run_dir.record()
        self.plan: BatchPlan | None = None
        self.state: TrainState | None = None

    @property
    def rank(self) -> int:
        return self.runtime.dist.rank

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
        exports: dict[str, Callable[[nn.Module], Any]] | None = None,
    ) -> dict[str, Any]:
        """Train model on dataset for cfg.epochs, resuming as cfg.resume says.

        collate_fn: the loader's (e.g. fcmae.data.sources.collate). param_groups: AdamW groups over
        model's parameters; a group's "lr_scale" (e.g. layer decay) multiplies the scheduled
        lr; default fcmae.train.optim.param_groups. extra_state: objects kept in checkpoints.
        exports: kind -> fn(model) -> object saved as KIND-NNNN.pth beside each checkpoint.
        Returns the final epoch record with "checkpoint" and "exports" (kind -> path).
        """
        cfg, runtime = self.cfg, self.runtime
        self.plan = plan = self._plan(dataset)
        self.state = state = self._prepare(model, param_groups, extra_state)
        self.checkpointer.exports = dict(exports or {})
        if runtime.dist.is_main:
            self.run_dir.remove_leftovers(tuple(self.checkpointer.exports))
        seed_everything(cfg.seed, self.rank, 0)  # masks, dropout, in-process augmentation
        self.checkpointer.restore(state)
        if state.epoch >= cfg.epochs:
            log_nothing_to_do(self.run_dir.path, state.epoch)
            return self._result({"epoch": state.epoch, "step": state.global_step})
        metrics = (
            MetricsWriter(self.run_dir.path, state.global_step) if runtime.dist.is_main else None
        )
        ctx = Context(
            model,
            cfg.epochs,
            self.run_dir,
            runtime,
            metrics,
            self._save_tagged,
            state.epoch,
            state.global_step,
        )
        wrapped = runtime.wrap(model, cfg.compile)
        progress = Progress(cfg.epochs, plan.steps_per_epoch) if metrics else None
        record: dict[str, Any] = {}
        failures = as_sentences(
            runtime.device, runtime.precision, cfg.batch_size, self.rank, cfg.dist_timeout
        )
        with failures, metrics or contextlib.nullcontext():
            if metrics:
                metrics.write_run(runtime, plan, state.global_step, self.changes)
            while state.epoch < cfg.epochs:
                record = self._epoch(
                    wrapped, dataset, train_step, collate_fn, callbacks, ctx, progress
                )
                for callback in callbacks:
                    record.update(callback.on_epoch_end(ctx) or {})
                if metrics:
                    metrics.write(record)
                log_epoch(record, cfg.epochs)
                if state.epoch % cfg.save_every == 0 or state.epoch == cfg.epochs:
                    self.checkpointer.save(state)
        log_done(state.last_checkpoint, self._exports(), self.run_dir.path)
        return self._result(record)

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
        steps = self.plan.steps_per_epoch
        return TrainState(model, optimizer, scaler, steps, dict(extra_state or {}))

    def _epoch(
        self,
        model: nn.Module,
        dataset: Dataset,
        train_step: TrainStep,
        collate_fn: Callable | None,
        callbacks: list[Callback],
        ctx: Context,
        progress: Progress | None,
    ) -> dict[str, Any]:
        """One epoch of optimizer steps; returns the epoch record."""
        cfg, state, steps = self.cfg, self.state, self.plan.steps_per_epoch
        epoch = state.epoch
        model.train()
        loader = self.runtime.loader(dataset, cfg.batch_size, epoch, collate_fn=collate_fn)
        batches = iter(loader)
        meter = Meter(self.runtime.dist.world_size)
        for i in range(steps):
            lr = lr_at(
                epoch + i / steps, self.plan.peak_lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs
            )
            stats, grad_norm = self._step(model, batches, train_step, lr, i)
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
        return {
            "type": "epoch",
            "step": state.global_step,
            "epoch": state.epoch,
            "lr": lr,
            **meter.epoch(),
        }

    def _step(
        self, model: nn.Module, batches: Iterator, train_step: TrainStep, lr: float, i: int
    ) -> tuple[dict[str, float], float | None]:
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
            with contextlib.nullcontext() if last or not runtime.dist.enabled else model.no_sync():
                with runtime.autocast():
                    loss, metrics = train_step(model, batch)
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

    def _save_tagged(self, tag: str) -> Any:
        return self.checkpointer.save(self.state, tag)

    def _exports(self) -> dict[str, Any]:
        """kind -> path of the exports written with the last numbered checkpoint."""
        return {
            kind: self.run_dir.file(self.state.epoch, kind) for kind in self.checkpointer.exports
        }

    def _result(self, record: dict[str, Any]) -> dict[str, Any]:
        """The final record, with the last checkpoint and its exports."""
        exports = {kind: str(path) for kind, path in self._exports().items()}
        return {**record, "checkpoint": str(self.state.last_checkpoint), "exports": exports}

    def close(self) -> None:
        """Release the run's logging handlers and its directory lock (the process group
        outlives the run: the CLI leaves it on exit)."""
        close_logging(self._log_handlers)
        self.run_dir.unlock()


def run_settings(cfg: TrainConfig, world_size: int) -> tuple[str, dict[str, Any]]:
    """(command, settings) of a run: the command's name, and cfg's values as the run uses them,
    with the effective batch resolved for world_size processes (the number a resume keeps)."""
    command = f"fcmae {cfg.output_root}" if cfg.output_root else type(cfg).__name__
    _, effective, _ = batch_arithmetic(cfg, world_size)
    return command, {**cfg.to_dict(), EFFECTIVE: effective}


def _add(totals: dict[str, torch.Tensor], key: str, value: Any, device: torch.device) -> None:
    """totals[key] += value, kept on the device without a sync.

    In float32, which every device has (MPS has no float64): a step sums a few micro-batches'
    values and counts below 2**24, exact enough; the epoch's sums are kept on the CPU, in
    Python floats (runlog.Meter)."""
    value = torch.as_tensor(value, device=device).detach().float()
    totals[key] = totals[key] + value if key in totals else value


def _count(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    return next(_count(b) for b in items if isinstance(b, (torch.Tensor, tuple, list, dict)))
