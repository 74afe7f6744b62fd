"""The one training loop that pretraining and fine-tuning share.

A job builds a model, a dataset and a step function, and hands them to `Engine.fit`; the
engine owns everything else a long run needs: device, precision, gradient accumulation, the
per-iteration lr schedule, AdamW, DDP, checkpoints and auto-resume, logging and progress.
It imports no model code.

    engine = Engine(cfg)                       # cfg: fcmae.config.TrainConfig (or a subclass)
    model = build_model(...)                   # built after Engine(): same seed on every rank
    engine.fit(model, dataset, step, collate_fn=collate,
               param_groups=None,              # default: weight_decay_groups(model, wd)
               callbacks=[ema, evaluator],     # on_step_end(engine), on_epoch_end(engine, epoch)
               extra_state={"ema": ema},       # saved in and restored from checkpoints
               exports={"encoder": lambda m: {"model": m.encoder.state_dict()}})

`step(model, batch) -> (loss, metrics)` runs under autocast on a batch already on the device;
loss is a scalar tensor, metrics a dict of scalars (averaged and logged). Checkpoints hold
{"model", "optimizer", "scaler", "epoch", "step", "steps_per_epoch", "rng" (one state per
rank), "config", "extra", "world_size"}, all loadable with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fcmae import checkpoint as ckpt
from fcmae import distributed as dist
from fcmae.config import TrainConfig, write_yaml
from fcmae.errors import UserError
from fcmae.runlog import MetricsWriter, Progress, close_logging, format_duration, setup_logging

log = logging.getLogger("fcmae")

StepFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict[str, Any]]"]


class NonFiniteLoss(UserError):
    """The loss became nan or inf; training stopped without saving the bad state."""

    all_ranks = True  # every rank raises it at the same step: only rank 0 need say so


def pick_device(name: str) -> torch.device:
    """auto: cuda > mps > cpu. Under torchrun each process takes cuda:LOCAL_RANK."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device "
                        "cpu or auto.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu.")
    return device


def pick_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 on CPU and MPS.

    CPU autocast to bf16 is slower than fp32 on most CPUs, and the official FCMAE code ran
    in fp32 only, so CPU stays in fp32 unless asked.
    """
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise UserError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU.")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Parameters trained without weight decay: 1-D tensors (norms, biases), any bias, GRN
    gamma/beta (4-D in the dense layout) and the decoder's mask token."""
    return (param.ndim <= 1 or name.endswith(".bias") or name.endswith(("grn.gamma", "grn.beta"))
            or name.split(".")[-1] == "mask_token")


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: with weight decay, and without (see no_weight_decay)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: int) -> float:
    """Linear warmup from 0, then half-cycle cosine to min_lr; epoch is fractional."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(epochs - warmup_epochs, 1e-8)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Run the forward pass in precision (a pick_precision name) on device; fp32: no autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def default_num_workers() -> int:
    """Data-loading processes per device when --num-workers is unset."""
    # Leave a core to the process itself; with two or fewer, workers only compete with the
    # compute threads.
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(8, cores - 1) if cores > 2 else 0


def to_device(batch: Any, device: torch.device, channels_last: bool) -> Any:
    """Move the tensors of a (nested) batch to device; images (4-D float) go channels-last."""
    if isinstance(batch, torch.Tensor):
        batch = batch.to(device, non_blocking=True)
        if channels_last and batch.ndim == 4 and batch.is_floating_point():
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # NamedTuple such as data.Batch
        return type(batch)(*(to_device(b, device, channels_last) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device, channels_last) for k, v in batch.items()}
    return batch


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _count(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return len(batch)
    items = batch.values() if isinstance(batch, dict) else batch
    return next(_count(b) for b in items if isinstance(b, (torch.Tensor, tuple, list, dict)))


class Engine:
    """Owns a run: its directory, process group, device, precision and training loop.

    Public state for jobs and callbacks: cfg, device, precision, dist (rank, world_size,
    is_main), run_dir, epoch (completed epochs), step (optimizer steps), model (the wrapped
    module that step() receives), raw_model (the plain one), optimizer, lr, accum_iter.
    Methods for them: make_loader (e.g. an evaluation loader over this rank's shard), autocast
    (the run's precision) and save_checkpoint("best").
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32 runs
        self.dist = dist.init(self.device)
        self.precision = pick_precision(cfg.precision, self.device)
        self.run_dir = Path(cfg.output_dir or "runs/unnamed")
        self.ckpt_dir = self.run_dir / "checkpoints"
        if self.dist.is_main:
            self._prepare_run_dir()
        self._log_handlers = setup_logging(self.run_dir if self.dist.is_main else None,
                                           self.dist.rank)
        if self.dist.is_main:
            write_yaml(cfg.to_dict(), self.run_dir / "config.yaml")
        # The same seed on every rank, so a model built next starts identical everywhere.
        torch.manual_seed(cfg.seed)
        self.epoch = self.step = 0
        self.metrics: MetricsWriter | None = None

    def _prepare_run_dir(self) -> None:
        try:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            probe = self.run_dir / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"Cannot write to output dir {self.run_dir} ({e.strerror or e}); "
                            f"pass a writable --output-dir.") from None

    # ---- data -----------------------------------------------------------------------------

    def make_loader(self, dataset: Dataset, batch_size: int, epoch: int, shuffle: bool = True,
                    drop_last: bool = True, collate_fn: Callable | None = None) -> DataLoader:
        """A loader over this rank's shard of dataset for one epoch.

        The shard order comes from (seed, epoch) and worker randomness from (seed, epoch, rank),
        never from state that lives across epochs, so a resumed run sees the same data.
        """
        sampler = DistributedSampler(dataset, self.dist.world_size, self.dist.rank,
                                     shuffle=shuffle, seed=self.cfg.seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
        seed = int(np.random.SeedSequence([self.cfg.seed, epoch, self.dist.rank])
                   .generate_state(1)[0])
        workers = self.cfg.num_workers
        if workers is None:
            workers = default_num_workers()
        return DataLoader(dataset, batch_size, sampler=sampler, num_workers=workers,
                          collate_fn=collate_fn, pin_memory=self.device.type == "cuda",
                          drop_last=drop_last, generator=torch.Generator().manual_seed(seed))

    # ---- checkpoints ----------------------------------------------------------------------

    def save_checkpoint(self, tag: int | str | None = None) -> Path:
        """Write the full training state (all ranks must call; rank 0 writes).

        tag: None numbers the file by completed epochs and prunes to keep_last; a string such as
        "best" writes checkpoint-best.pth, which pruning never touches. Exports are written
        beside it under the same tag.
        """
        rngs = dist.all_gather_object(ckpt.rng_state())
        tag = self.epoch if tag is None else tag
        path = ckpt.checkpoint_path(self.ckpt_dir, tag)
        if self.dist.is_main:
            state = {
                "model": self.raw_model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "steps_per_epoch": self.steps_per_epoch,
                "rng": rngs,
                "config": self.cfg.to_dict(),
                "extra": {name: obj.state_dict() for name, obj in self.extra_state.items()},
                "world_size": self.dist.world_size,
            }
            ckpt.save_atomic(state, path)
            for name, export in self.exports.items():
                ckpt.save_atomic(export(self.raw_model), ckpt.checkpoint_path(self.ckpt_dir, tag, name))
            if isinstance(tag, int):
                ckpt.prune(self.ckpt_dir, self.cfg.keep_last)
        if isinstance(tag, int):
            self.last_checkpoint = path
        dist.barrier()
        return path

    def _find_resume(self) -> tuple[Path, dict] | None:
        resume = self.cfg.resume
        if resume == "none":
            if self.dist.is_main and ckpt.numbered_checkpoints(self.ckpt_dir):
                raise UserError(f"{self.ckpt_dir} already holds checkpoints; pass --resume auto "
                                f"to continue that run, or another --output-dir to start anew.")
            return None
        if resume == "auto":
            # Rank 0 picks (and logs skipped corrupt files); the others load the same file,
            # so multi-node resume needs the output dir on a shared filesystem.
            found = ckpt.newest_valid(self.ckpt_dir, ("model", "epoch")) if self.dist.is_main else None
            path = dist.broadcast_object(str(found[0]) if found else None)
            if path is None:
                return None
            return Path(path), found[1] if found else ckpt.load(Path(path))
        path = Path(resume)
        if not path.is_file():
            raise UserError(f"--resume {path} does not exist; pass a checkpoint file, auto or none.")
        return path, ckpt.load(path, ("model", "epoch"))

    def _resume(self) -> None:
        found = self._find_resume()
        if found is None:
            return
        path, state = found
        try:
            self.raw_model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"Checkpoint {path} does not fit this model or optimizer ("
                            f"{str(e).splitlines()[0]}); resume with the same --model, or pass "
                            f"another --output-dir.") from None
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for name, obj in self.extra_state.items():
            obj.load_state_dict(state["extra"][name])
        self.epoch, self.step = state["epoch"], state["step"]
        if len(state["rng"]) == self.dist.world_size:
            ckpt.set_rng_state(state["rng"][self.dist.rank])
        else:
            log.warning("Checkpoint was written by %d processes, this run has %d: random states "
                        "are re-seeded, so the run continues but is not bit-identical.",
                        len(state["rng"]), self.dist.world_size)
            self._seed(1 + self.epoch)
        self.last_checkpoint = path
        log.info("Resumed from %s (epoch %d, step %d).", path, self.epoch, self.step)

    def _seed(self, salt: int = 0) -> None:
        """Per-rank seeds for masks, dropout and in-process data augmentation."""
        seed = int(np.random.SeedSequence([self.cfg.seed, self.dist.rank, salt]).generate_state(1)[0])
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    # ---- training ---------------------------------------------------------------------------

    def _effective_batch(self) -> tuple[int, int]:
        """(accum_iter, effective batch): accumulation reaches cfg.effective_batch if set."""
        per_step = self.cfg.batch_size * self.dist.world_size
        if self.cfg.accum_iter is not None:
            accum = self.cfg.accum_iter
        elif self.cfg.effective_batch is not None:
            accum = max(1, round(self.cfg.effective_batch / per_step))
            if accum * per_step != self.cfg.effective_batch:
                log.warning("Effective batch %d is not a multiple of %d (batch size x processes); "
                            "using %d.", self.cfg.effective_batch, per_step, accum * per_step)
        else:
            accum = 1
        return accum, accum * per_step

    def fit(self, model: nn.Module, dataset: Dataset, step: StepFn, *,
            collate_fn: Callable | None = None, param_groups: list[dict] | None = None,
            callbacks: Iterable[Any] = (), extra_state: dict[str, Any] | None = None,
            exports: dict[str, Callable[[nn.Module], Any]] | None = None) -> dict[str, Any]:
        """Train model on dataset for cfg.epochs, resuming as cfg.resume says.

        param_groups: AdamW groups over model's parameters; a group's "lr_scale" (e.g. layer
        decay) multiplies the scheduled lr. Default: `weight_decay_groups(model, cfg.weight_decay)`.
        callbacks: objects with any of on_step_end(engine) (after each optimizer step) and
        on_epoch_end(engine, epoch) -> dict | None (metrics merged into the epoch record);
        called on every rank. extra_state: objects with state_dict()/load_state_dict() kept in
        checkpoints. exports: name -> fn(raw model) -> object saved as <name>-NNNN.pth beside
        each checkpoint. Returns the final epoch record.
        """
        cfg = self.cfg
        self.raw_model = model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.callbacks, self.extra_state = list(callbacks), extra_state or {}
        self.exports = exports or {}
        groups = param_groups or weight_decay_groups(model, cfg.weight_decay)
        self.optimizer = torch.optim.AdamW(groups, lr=0.0, betas=cfg.betas,
                                           fused=self.device.type == "cuda" or None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.accum_iter, effective = self._effective_batch()
        self.lr = cfg.lr if cfg.lr is not None else cfg.blr * effective / 256
        probe = self.make_loader(dataset, cfg.batch_size, 0, collate_fn=collate_fn)
        self.steps_per_epoch = len(probe) // self.accum_iter
        if self.steps_per_epoch == 0:
            raise UserError(f"The dataset of {len(dataset)} images is smaller than one optimizer "
                            f"step ({effective} images); lower --batch-size or --effective-batch.")
        self.last_checkpoint: Path | None = None
        self._seed()
        self._resume()
        if self.epoch >= cfg.epochs:
            log.info("Nothing to do: the run in %s already finished %d epochs (raise --epochs to "
                     "train longer).", self.run_dir, self.epoch)
            return {"epoch": self.epoch, "step": self.step, "checkpoint": str(self.last_checkpoint)}

        self.model = model
        if self.dist.enabled:
            self.model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            # Static shapes: the sparse backend's visible-site count is read from the mask
            # (a graph break); specialising on it compiles once, since recipe masks keep the
            # same count every step. Dynamic shapes fail in Inductor on that count.
            self.model = torch.compile(self.model, dynamic=False)
        log.info("Device %s x %d processes, precision %s; effective batch %d = %d per device x %d "
                 "processes x %d accumulation steps; lr %.3g; %d steps per epoch.", self.device,
                 self.dist.world_size, self.precision, effective, cfg.batch_size,
                 self.dist.world_size, self.accum_iter, self.lr, self.steps_per_epoch)
        if self.dist.is_main:
            self.metrics = MetricsWriter(self.run_dir, purge_step=self.step if self.step else None)
            self.metrics.write({"type": "run", "step": self.step, "world_size": self.dist.world_size,
                                "device": str(self.device), "precision": self.precision,
                                "effective_batch": effective, "accum_iter": self.accum_iter,
                                "lr": self.lr, "steps_per_epoch": self.steps_per_epoch})
        progress = Progress(cfg.epochs, self.steps_per_epoch) if self.dist.is_main else None
        record: dict[str, Any] = {}
        try:
            while self.epoch < cfg.epochs:
                record = self._train_epoch(dataset, step, collate_fn, progress)
                for cb in self.callbacks:
                    if hasattr(cb, "on_epoch_end"):
                        record.update(cb.on_epoch_end(self, self.epoch) or {})
                if self.metrics:
                    self.metrics.write(record)
                log.info("epoch %d/%d  loss %.4f  %.1f img/s  %s%s", self.epoch, cfg.epochs,
                         record["loss"], record["img_per_s"], format_duration(record["time_s"]),
                         f"  skipped {record['skipped_images']} unreadable images"
                         if record["skipped_images"] else "")
                if self.epoch % cfg.save_every == 0 or self.epoch == cfg.epochs:
                    self.save_checkpoint()
        finally:
            if self.metrics:
                self.metrics.close()
        exports = "".join(f", {name} alone in {name}-{self.epoch:04d}.pth" for name in self.exports)
        log.info("Done. Checkpoint: %s%s. Logs: %s/log.txt, metrics.jsonl; TensorBoard: "
                 "tensorboard --logdir %s/tb", self.last_checkpoint, exports, self.run_dir,
                 self.run_dir)
        return {**record, "checkpoint": str(self.last_checkpoint)}

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision, for work outside step() such as evaluation."""
        return autocast(self.device, self.precision)

    def _train_epoch(self, dataset: Dataset, step: StepFn, collate_fn: Callable | None,
                     progress: Progress | None) -> dict[str, Any]:
        """One epoch of steps_per_epoch optimizer steps; returns the epoch record."""
        cfg, epoch, world = self.cfg, self.epoch, self.dist.world_size
        self.model.train()
        batches = iter(self.make_loader(dataset, cfg.batch_size, epoch, collate_fn=collate_fn))
        start = window_start = time.perf_counter()
        loss_sum = images_sum = skipped_sum = 0.0
        window: list[float] = []  # summed [loss, images, skipped, *metrics] since the last log
        window_steps = 0
        self.optimizer.zero_grad(set_to_none=True)
        for i in range(self.steps_per_epoch):
            lr = lr_at(epoch + i / self.steps_per_epoch, self.lr, cfg.min_lr, cfg.warmup_epochs,
                       cfg.epochs)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            try:
                values, names, grad_norm = self._optimizer_step(batches, step, i)
            except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
                if _is_oom(e):
                    self._stop_oom()
                raise
            self.step += 1
            for cb in self.callbacks:
                if hasattr(cb, "on_step_end"):
                    cb.on_step_end(self)

            loss_sum += values[0]
            images_sum += values[1] * world
            skipped_sum += values[2] * world
            window = [a + b for a, b in zip(window, values)] if window else values
            window_steps += 1
            if window_steps == cfg.log_every or i + 1 == self.steps_per_epoch:
                now = time.perf_counter()
                img_per_s = window[1] * world / (now - window_start)
                rec = {"type": "step", "step": self.step,
                       "epoch": epoch + (i + 1) / self.steps_per_epoch,
                       "loss": window[0] / window_steps,
                       **{n: v / window_steps for n, v in zip(names, window[3:])},
                       "lr": lr, "img_per_s": img_per_s}
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm.item()
                if self.metrics:
                    self.metrics.write(rec)
                if progress:
                    left = (cfg.epochs - epoch) * self.steps_per_epoch - (i + 1)
                    progress.update(epoch, i, rec["loss"], lr, img_per_s,
                                    (now - start) / (i + 1) * left)
                window, window_steps, window_start = [], 0, now
        if progress:
            progress.end_epoch()
        self.epoch += 1
        elapsed = time.perf_counter() - start
        return {"type": "epoch", "step": self.step, "epoch": self.epoch,
                "loss": loss_sum / self.steps_per_epoch, "lr": lr,
                "img_per_s": images_sum / elapsed, "time_s": elapsed,
                "skipped_images": round(skipped_sum)}

    def _optimizer_step(self, batches: Iterable, step: StepFn,
                        i: int) -> tuple[list[float], list[str], torch.Tensor | None]:
        """Accumulate gradients, check the loss, clip, step the optimizer.

        Returns [mean loss, images, skipped files, *mean metrics] averaged over ranks, the
        metric names in that order, and the gradient norm when clipping.
        """
        stats, names = self._accumulate(batches, step)
        # One all-reduce per step: the mean loss for the log, and every rank learns at the
        # same step whether any rank saw a nan, so all stop together.
        values = (dist.all_reduce_sum(stats) / self.dist.world_size).tolist()
        if not math.isfinite(values[0]):
            self._stop_nonfinite(values[0], i)
        grad_norm = None
        if self.cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return values, names, grad_norm

    def _accumulate(self, batches: Iterable, step: StepFn) -> tuple[torch.Tensor, list[str]]:
        """accum_iter forward/backward passes; returns this rank's [mean loss, images, skipped
        files, *mean metrics] as a float64 tensor on the device, and the metric names."""
        total: torch.Tensor | None = None
        for micro in range(self.accum_iter):
            batch = next(batches)
            skipped = getattr(batch, "skipped", 0)
            batch = to_device(batch, self.device, self.cfg.channels_last)
            # Gradients are all-reduced only on the last micro-batch of each step.
            last = micro == self.accum_iter - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync()
            with sync:
                with self.autocast():
                    loss, metrics = step(self.model, batch)
                self.scaler.scale(loss / self.accum_iter).backward()
            names = sorted(metrics)
            scalars = [loss.detach(), _count(batch), skipped, *(metrics[k] for k in names)]
            values = torch.stack([torch.as_tensor(v, device=self.device).detach().double()
                                  for v in scalars])
            total = values if total is None else total + values
        total[0] /= self.accum_iter
        total[3:] /= self.accum_iter
        return total, names

    def _stop_oom(self) -> None:
        hint = " or --precision bf16" if self.precision == "fp32" and self.device.type == "cuda" else ""
        raise UserError(f"Out of memory on {self.device} at --batch-size {self.cfg.batch_size}: "
                        f"lower --batch-size (set --effective-batch to keep the effective batch "
                        f"and lr through gradient accumulation){hint}.") from None

    def _stop_nonfinite(self, loss: float, i: int) -> None:
        where = f"epoch {self.epoch + 1}, step {i + 1}"
        if self.last_checkpoint is not None:
            fix = (f"The last good checkpoint is {self.last_checkpoint}: rerun the same command "
                   f"with --resume auto and a lower --blr (e.g. {self.cfg.blr / 2:g}) or "
                   f"--precision fp32.")
        else:
            fix = "No checkpoint was written yet: restart with a lower --blr or --precision fp32."
        raise NonFiniteLoss(f"The loss became {loss} at {where}; stopped without saving. {fix}")

    def close(self) -> None:
        """Release logging handlers and the process group (the CLI calls this on exit)."""
        close_logging(self._log_handlers)
        dist.shutdown()
