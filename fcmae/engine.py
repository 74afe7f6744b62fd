"""The one training loop that pretraining and fine-tuning share.

A job seeds, builds a model, a dataset and a step function, and hands them to ``Engine.fit``;
the engine owns everything else a long run needs: gradient accumulation, the per-iteration lr
schedule, AdamW, DDP, mixed precision, checkpoints and auto-resume, logging and progress. It
imports no model code and names no parameter.

    engine = Engine(cfg)                        # cfg: fcmae.config.TrainConfig (or a subclass)
    seed_everything(cfg.seed)
    model = build_model(...)
    engine.fit(model, dataset, train_step, collate_fn=collate,
               param_groups=None,               # default: fcmae.optim.param_groups(model, wd)
               callbacks=[ema, evaluator],      # Callback: on_step_end, on_epoch_end
               extra_state={"ema": ema},        # saved in and restored from checkpoints
               exports={"encoder": lambda m: {"model": m.encoder.state_dict()}})

``train_step(model, batch) -> (loss, metrics)`` runs under autocast on a batch already on the
device; loss is a scalar tensor, metrics a dict of scalars (averaged and logged). Checkpoints
hold {"model", "optimizer", "scaler", "epoch", "step", "steps_per_epoch", "rng" (one state per
rank), "config", "extra", "world_size"}, all loadable with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from fcmae import checkpoint as ckpt
from fcmae import distributed as dist
from fcmae.config import TrainConfig, write_yaml
from fcmae.errors import UserError
from fcmae.optim import lr_at
from fcmae.optim import param_groups as default_param_groups
from fcmae.runlog import (
    Meter,
    MetricsWriter,
    Progress,
    close_logging,
    format_duration,
    log_to_file,
    setup_logging,
)
from fcmae.runtime import (
    autocast,
    default_num_workers,
    pick_device,
    pick_precision,
    seed_everything,
    to_device,
)

log = logging.getLogger("fcmae")

TrainStep = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


class Callback:
    """Hooks a job gives the engine; subclass and override what you need. Called on every rank."""

    def on_step_end(self, engine: Engine) -> None:
        """After each optimizer step."""

    def on_epoch_end(self, engine: Engine, epoch: int) -> dict[str, Any] | None:
        """After each epoch (epoch: completed epochs); returned metrics join the epoch record."""
        return None


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLoss(UserError):
    """The loss became nan or inf; training stopped without saving the bad state."""

    all_ranks = True  # every rank raises it at the same step: only rank 0 need say so


@dataclass
class TrainState:
    """What a checkpoint holds and a resume restores (besides config and random states)."""

    model: nn.Module  # the plain module, not the DDP or compiled wrapper
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    extra: dict[str, Stateful] = field(default_factory=dict)
    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps
    last_checkpoint: Path | None = None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e)
    )


def _count(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    return next(_count(b) for b in items if isinstance(b, (torch.Tensor, tuple, list, dict)))


class Engine:
    """Owns a run: its directory, process group, device, precision and training loop.

    For jobs and callbacks: cfg, device, precision, dist (rank, world_size, is_main), run_dir,
    ckpt_dir, state (a TrainState once fit has begun), metrics (the main process's
    MetricsWriter, None elsewhere), make_loader (e.g. an evaluation loader
    over this rank's shard), autocast (the run's precision) and save_checkpoint("best").
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # A checkpoint named by --resume is read before anything is written: a refusal leaves
        # no run directory behind.
        self._resume_file = None
        run_dir = Path(cfg.output_dir or "runs/unnamed")
        if cfg.resume == "none" and ckpt.numbered_checkpoints(run_dir / "checkpoints"):
            raise UserError(
                f"{run_dir / 'checkpoints'} already holds checkpoints; pass --resume auto to "
                f"continue that run, or another --output-dir to start anew."
            )
        if cfg.resume not in ("auto", "none"):
            path = Path(cfg.resume)
            if not path.is_file():
                raise UserError(
                    f"--resume {path} does not exist; pass a checkpoint file, auto or none."
                )
            self._resume_file = path, ckpt.load(path, ("model", "epoch"))
        self.device = pick_device(cfg.device)
        self.dist = dist.init(self.device, cfg.dist_timeout)
        self.precision = pick_precision(cfg.precision, self.device)
        self.run_dir = run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._lock = None
        if self.dist.is_main:
            self._prepare_run_dir()
        self._log_handlers = setup_logging(
            self.run_dir if self.dist.is_main else None, self.dist.rank
        )
        if self.dist.is_main:
            write_yaml(cfg.to_dict(), self.run_dir / "config.yaml")
            ckpt.remove_leftovers(self.ckpt_dir)
        self.state: TrainState | None = None
        self._exports: dict[str, Callable[[nn.Module], Any]] = {}

    def _prepare_run_dir(self) -> None:
        """Create the run directory and lock it for this run (one run per directory)."""
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.run_dir / ".lock", "a+")  # held until close()
        except OSError as e:
            raise UserError(
                f"Cannot write to output dir {self.run_dir} ({e.strerror or e}); "
                f"pass a writable --output-dir."
            ) from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise UserError(
                f"Another run is using {self.run_dir} (process {self._lock_owner()}); wait for "
                f"it to end, or pass another --output-dir."
            ) from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(f"{socket.gethostname()}:{os.getpid()}\n")
        self._lock.flush()

    def _lock_owner(self) -> str:
        try:
            return (self.run_dir / ".lock").read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision, for work outside train_step such as evaluation."""
        return autocast(self.device, self.precision)

    def make_loader(
        self,
        dataset: Dataset,
        batch_size: int,
        epoch: int,
        shuffle: bool = True,
        drop_last: bool = True,
        collate_fn: Callable | None = None,
    ) -> DataLoader:
        """A loader over this rank's shard of dataset for one epoch.

        The shard order comes from (seed, epoch) and worker randomness from (seed, epoch, rank),
        never from state that lives across epochs, so a resumed run sees the same data. An
        IterableDataset (fcmae.shards.Shards) cuts its own part for the rank with ``for_epoch``.
        """
        sampler = None
        if isinstance(dataset, IterableDataset):
            dataset = dataset.for_epoch(
                epoch,
                self.dist.rank,
                self.dist.world_size,
                seed=self.cfg.seed,
                shuffle=shuffle,
                batch_size=batch_size,
                drop_last=drop_last,
            )
        else:
            sampler = DistributedSampler(
                dataset,
                self.dist.world_size,
                self.dist.rank,
                shuffle=shuffle,
                seed=self.cfg.seed,
                drop_last=drop_last,
            )
            sampler.set_epoch(epoch)
        seed = int(
            np.random.SeedSequence([self.cfg.seed, epoch, self.dist.rank]).generate_state(1)[0]
        )
        workers = self.cfg.num_workers
        return DataLoader(
            dataset,
            batch_size,
            sampler=sampler,
            num_workers=default_num_workers() if workers is None else workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),
        )

    # ---- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, tag: int | str | None = None) -> Path:
        """Write the full training state (all ranks must call; rank 0 writes).

        tag: None numbers the file by completed epochs and prunes to keep_last; a string such
        as "best" writes checkpoint-best.pth, which pruning never touches. Exports are written
        beside it under the same tag.
        """
        state = self.state
        rngs = dist.all_gather_object(ckpt.rng_state())
        tag = state.epoch if tag is None else tag
        path = ckpt.checkpoint_path(self.ckpt_dir, tag)
        if self.dist.is_main:
            # Exports first, the checkpoint last: a checkpoint on disk means its exports are too.
            for name, export in self._exports.items():
                ckpt.save_atomic(
                    export(state.model), ckpt.checkpoint_path(self.ckpt_dir, tag, name)
                )
            ckpt.save_atomic(
                {
                    "model": state.model.state_dict(),
                    "optimizer": state.optimizer.state_dict(),
                    "scaler": state.scaler.state_dict(),
                    "epoch": state.epoch,
                    "step": state.global_step,
                    "steps_per_epoch": state.steps_per_epoch,
                    "rng": rngs,
                    "config": self.cfg.to_dict(),
                    "extra": {name: obj.state_dict() for name, obj in state.extra.items()},
                    "world_size": self.dist.world_size,
                },
                path,
            )
            if isinstance(tag, int):
                ckpt.prune(self.ckpt_dir, self.cfg.keep_last)
        if isinstance(tag, int):
            state.last_checkpoint = path
        dist.barrier()
        return path

    def _find_resume(self) -> tuple[Path, dict] | None:
        resume = self.cfg.resume
        if resume == "none":
            return None
        if resume == "auto":
            # Rank 0 picks (and logs skipped corrupt files); the others load the same file,
            # so multi-node resume needs the output dir on a shared filesystem.
            found = (
                ckpt.newest_valid(self.ckpt_dir, ("model", "epoch")) if self.dist.is_main else None
            )
            path = dist.broadcast_object(str(found[0]) if found else None)
            if path is None:
                return None
            return Path(path), found[1] if found else ckpt.load(Path(path))
        found, self._resume_file = self._resume_file, None  # the memory goes with the model
        return found

    def _resume(self) -> None:
        found = self._find_resume()
        if found is None:
            return
        path, saved = found
        state = self.state
        try:
            state.model.load_state_dict(saved["model"])
            state.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"Checkpoint {path} does not fit this model or optimizer ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no detail'}); resume with the same "
                f"--model and settings it was written with, or pass another --output-dir."
            ) from None
        if state.scaler.is_enabled() and saved.get("scaler"):
            state.scaler.load_state_dict(saved["scaler"])
        for name, obj in state.extra.items():
            obj.load_state_dict(saved["extra"][name])
        state.epoch, state.global_step = saved["epoch"], saved["step"]
        if len(saved["rng"]) == self.dist.world_size:
            ckpt.set_rng_state(saved["rng"][self.dist.rank])
        else:
            log.warning(
                "Checkpoint was written by %d processes, this run has %d: random states "
                "are re-seeded, so the run continues but is not bit-identical.",
                len(saved["rng"]),
                self.dist.world_size,
            )
            seed_everything(self.cfg.seed, self.dist.rank, 1 + state.epoch)
        state.last_checkpoint = path
        log.info("Resumed from %s (epoch %d, step %d).", path, state.epoch, state.global_step)

    # ---- training ---------------------------------------------------------------------------

    def _accumulation(self) -> tuple[int, int]:
        """(accum_iter, effective batch): accumulation reaches cfg.effective_batch if set."""
        per_step = self.cfg.batch_size * self.dist.world_size
        if self.cfg.accum_iter is not None:
            accum = self.cfg.accum_iter
        elif self.cfg.effective_batch is not None:
            accum = max(1, round(self.cfg.effective_batch / per_step))
            if accum * per_step != self.cfg.effective_batch:
                log.warning(
                    "Effective batch %d is not a multiple of %d (batch size x processes); "
                    "using %d.",
                    self.cfg.effective_batch,
                    per_step,
                    accum * per_step,
                )
        else:
            accum = 1
        return accum, accum * per_step

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

        param_groups: AdamW groups over model's parameters; a group's "lr_scale" (e.g. layer
        decay) multiplies the scheduled lr. Default: fcmae.optim.param_groups. extra_state:
        objects kept in checkpoints. exports: name -> fn(model) -> object saved as
        <name>-NNNN.pth beside each checkpoint. Returns the final epoch record.
        """
        cfg = self.cfg
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(
            param_groups or default_param_groups(model, cfg.weight_decay),
            lr=0.0,
            betas=cfg.betas,
            fused=self.device.type == "cuda" or None,
        )
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.accum_iter, effective = self._accumulation()
        self.lr = cfg.lr if cfg.lr is not None else cfg.blr * effective / 256
        steps_per_epoch = len(self.make_loader(dataset, cfg.batch_size, 0)) // self.accum_iter
        if steps_per_epoch == 0:
            raise UserError(
                f"The dataset of {len(dataset)} images is smaller than one optimizer "
                f"step ({effective} images); lower --batch-size or --effective-batch."
            )
        self.state = state = TrainState(
            model, optimizer, scaler, steps_per_epoch, dict(extra_state or {})
        )
        self._exports = dict(exports or {})
        seed_everything(cfg.seed, self.dist.rank, 0)  # masks, dropout, in-process augmentation
        self._resume()
        if state.epoch >= cfg.epochs:
            log.info(
                "Nothing to do: the run in %s already finished %d epochs (raise --epochs to "
                "train longer).",
                self.run_dir,
                state.epoch,
            )
            return {
                "epoch": state.epoch,
                "step": state.global_step,
                "checkpoint": str(state.last_checkpoint),
            }

        wrapped = model
        if self.dist.enabled:
            # Depthwise conv weights are (C, 1, k, k); conv backward may give their gradient
            # another stride on the size-1 dim, which DDP compares literally and warns about on
            # every rank. The memory layout is the same, so the warning says nothing here.
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if cfg.compile:
            # Static shapes: the sparse backend's visible-site count is read from the mask
            # (a graph break); specialising on it compiles once, since recipe masks keep the
            # same count every step. Dynamic shapes fail in Inductor on that count.
            wrapped = torch.compile(wrapped, dynamic=False)
        log.info(
            "Device %s x %d processes, precision %s; effective batch %d = %d per device x %d "
            "processes x %d accumulation steps; lr %.3g; %d steps per epoch.",
            self.device,
            self.dist.world_size,
            self.precision,
            effective,
            cfg.batch_size,
            self.dist.world_size,
            self.accum_iter,
            self.lr,
            steps_per_epoch,
        )
        self.metrics = metrics = None
        if self.dist.is_main:
            self.metrics = metrics = MetricsWriter(
                self.run_dir, purge_step=state.global_step or None
            )
            metrics.write(
                {
                    "type": "run",
                    "step": state.global_step,
                    "world_size": self.dist.world_size,
                    "device": str(self.device),
                    "precision": self.precision,
                    "effective_batch": effective,
                    "accum_iter": self.accum_iter,
                    "lr": self.lr,
                    "steps_per_epoch": steps_per_epoch,
                }
            )
        progress = Progress(cfg.epochs, steps_per_epoch) if self.dist.is_main else None
        record: dict[str, Any] = {}
        try:
            while state.epoch < cfg.epochs:
                record = self._train_epoch(
                    wrapped, dataset, train_step, collate_fn, callbacks, metrics, progress
                )
                for callback in callbacks:
                    record.update(callback.on_epoch_end(self, state.epoch) or {})
                if metrics:
                    metrics.write(record)
                log.info(
                    "epoch %d/%d  loss %.4f  %.1f img/s  %s%s",
                    state.epoch,
                    cfg.epochs,
                    record["loss"],
                    record["img_per_s"],
                    format_duration(record["time_s"]),
                    f"  skipped {record['skipped_images']} unreadable images"
                    if record["skipped_images"]
                    else "",
                )
                if state.epoch % cfg.save_every == 0 or state.epoch == cfg.epochs:
                    self.save_checkpoint()
        except RuntimeError as e:
            if not dist.timed_out(e):
                raise
            message = (
                f"Process {self.dist.rank} waited more than {cfg.dist_timeout:g} s for the "
                f"others: one of them stalled or died (see its output). Rerun the same command "
                f"to resume from the last checkpoint; raise --dist-timeout if steps are that slow."
            )
            log_to_file(f"fcmae: error: {message}")
            raise UserError(message) from None
        except UserError as e:  # the CLI prints it on stderr; the run's log keeps it too
            log_to_file(f"fcmae: error: {e}")
            raise
        finally:
            if metrics:
                metrics.close()
        exported = "".join(
            f", {name} alone in {name}-{state.epoch:04d}.pth" for name in self._exports
        )
        log.info(
            "Done. Checkpoint: %s%s. Logs: %s/log.txt, metrics.jsonl; TensorBoard: "
            "tensorboard --logdir %s/tb",
            state.last_checkpoint,
            exported,
            self.run_dir,
            self.run_dir,
        )
        return {**record, "checkpoint": str(state.last_checkpoint)}

    def _train_epoch(
        self,
        model: nn.Module,
        dataset: Dataset,
        train_step: TrainStep,
        collate_fn: Callable | None,
        callbacks: list[Callback],
        metrics: MetricsWriter | None,
        progress: Progress | None,
    ) -> dict[str, Any]:
        """One epoch of steps_per_epoch optimizer steps; returns the epoch record."""
        cfg, state = self.cfg, self.state
        epoch, steps = state.epoch, state.steps_per_epoch
        model.train()
        batches = iter(self.make_loader(dataset, cfg.batch_size, epoch, collate_fn=collate_fn))
        meter = Meter(self.dist.world_size)
        for i in range(steps):
            lr = lr_at(epoch + i / steps, self.lr, cfg.min_lr, cfg.warmup_epochs, cfg.epochs)
            for group in state.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            try:
                stats, grad_norm = self._optimizer_step(model, batches, train_step, i)
            except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
                if _is_oom(e):
                    self._stop_oom()
                raise
            state.global_step += 1
            for callback in callbacks:
                callback.on_step_end(self)
            meter.add(stats)
            if meter.window_steps == cfg.log_every or i + 1 == steps:
                rec = {
                    "type": "step",
                    "step": state.global_step,
                    "epoch": epoch + (i + 1) / steps,
                    **meter.window(),
                    "lr": lr,
                }
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                if metrics:
                    metrics.write(rec)
                if progress:
                    left = (cfg.epochs - epoch) * steps - (i + 1)
                    progress.update(
                        epoch,
                        i,
                        rec["loss"],
                        lr,
                        rec["img_per_s"],
                        meter.elapsed() / (i + 1) * left,
                    )
        if progress:
            progress.end_epoch()
        state.epoch += 1
        return {
            "type": "epoch",
            "step": state.global_step,
            "epoch": state.epoch,
            "lr": lr,
            **meter.epoch(),
        }

    def _optimizer_step(
        self, model: nn.Module, batches: Iterator, train_step: TrainStep, i: int
    ) -> tuple[dict[str, float], float | None]:
        """accum_iter forward/backward passes, then one AdamW step.

        Returns the step's statistics averaged over ranks (loss, images and skipped files per
        rank, the step's metrics) and the gradient norm when clipping.
        """
        state = self.state
        totals: dict[str, torch.Tensor] = {}
        for micro in range(self.accum_iter):
            batch = next(batches)
            skipped = int(batch.skipped.sum()) if hasattr(batch, "skipped") else 0
            batch = to_device(batch, self.device, self.cfg.channels_last)
            # Gradients are all-reduced only on the last micro-batch of each step.
            last = micro == self.accum_iter - 1
            with contextlib.nullcontext() if last or not self.dist.enabled else model.no_sync():
                with self.autocast():
                    loss, step_metrics = train_step(model, batch)
                state.scaler.scale(loss / self.accum_iter).backward()
            mean = {"loss": loss, **step_metrics}
            values = {
                **{k: v / self.accum_iter for k, v in mean.items()},
                "images": _count(batch),
                "skipped": skipped,
            }
            for k, v in values.items():
                totals[k] = (
                    totals.get(k, 0) + torch.as_tensor(v, device=self.device).detach().double()
                )
        # One all-reduce per step: the mean loss for the log, and every rank learns at the same
        # step whether any rank saw a nan, so all stop together.
        names = sorted(totals)
        reduced = (
            dist.all_reduce_sum(torch.stack([totals[k] for k in names])) / self.dist.world_size
        )
        stats = dict(zip(names, reduced.tolist()))
        if not math.isfinite(stats["loss"]):
            self._stop_nonfinite(stats["loss"], i)
        grad_norm = None
        if self.cfg.clip_grad is not None:
            state.scaler.unscale_(state.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(
                state.model.parameters(), self.cfg.clip_grad
            ).item()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        return stats, grad_norm

    def _stop_oom(self) -> None:
        hint = (
            " or --precision bf16"
            if self.precision == "fp32" and self.device.type == "cuda"
            else ""
        )
        raise UserError(
            f"Out of memory on {self.device} at --batch-size {self.cfg.batch_size}: "
            f"lower --batch-size (set --effective-batch to keep the effective batch "
            f"and lr through gradient accumulation){hint}."
        ) from None

    def _stop_nonfinite(self, loss: float, i: int) -> None:
        where = f"epoch {self.state.epoch + 1}, step {i + 1}"
        flag, value = ("--lr", self.cfg.lr) if self.cfg.lr is not None else ("--blr", self.cfg.blr)
        lower = f"a lower {flag} (e.g. {value / 2:g})" + (
            "" if self.precision == "fp32" else " or --precision fp32"
        )
        if self.state.last_checkpoint is not None:
            fix = (
                f"The last good checkpoint is {self.state.last_checkpoint}: rerun the same "
                f"command with --resume auto and {lower}."
            )
        else:
            fix = f"No checkpoint was written yet: restart with {lower}."
        raise NonFiniteLoss(f"The loss became {loss} at {where}; stopped without saving. {fix}")

    def close(self) -> None:
        """Release the run's logging handlers and its directory lock (the process group
        outlives the run: the CLI leaves it on exit)."""
        close_logging(self._log_handlers)
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None
