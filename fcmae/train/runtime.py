"""Where and how a process computes: device, precision, process group, seeds and loaders.

``Runtime`` bundles them for a job: the training engine and the inference jobs (eval, knn,
visualize) build one from their options and ask it for loaders and autocast.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from fcmae.data.sources import EpochDataset
from fcmae.errors import UserError
from fcmae.train import distributed as dist


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
        raise UserError(
            "--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available; use --device cpu.")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")  # TF32 matmuls for fp32 runs
    return device


def pick_precision(name: str, device: torch.device) -> str:
    """auto: bf16 on CUDA GPUs that support it, fp16 on older ones, fp32 on CPU and MPS.

    CPU autocast to bf16 is slower than fp32 on most CPUs, and the official FCMAE code ran in
    fp32 only, so CPU stays in fp32 unless asked.
    """
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise UserError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU.")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Run the forward pass in precision (a pick_precision name) on device; fp32: no autocast."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(*seeds: int) -> None:
    """Seed torch, numpy and random from a sequence of integers (e.g. seed, rank, salt)."""
    seed = int(np.random.SeedSequence(list(seeds)).generate_state(1)[0])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def default_num_workers() -> int:
    """Data-loading processes per device when --num-workers is unset."""
    # Leave a core to the process itself; with two or fewer, workers only compete with the
    # compute threads.
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return min(8, cores - 1) if cores > 2 else 0


def to_device(batch: Any, device: torch.device, channels_last: bool = False) -> Any:
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


class Runtime:
    """A process's device, precision and place among the processes of a run.

    device, precision: option values ("auto" picks). distributed: join the process group that
    torchrun prepared (training jobs); inference jobs run as one process. seed: the base of
    every loader's shuffling and worker randomness.
    """

    def __init__(
        self,
        device: str = "auto",
        precision: str = "auto",
        num_workers: int | None = None,
        seed: int = 0,
        distributed: bool = False,
        dist_timeout: float = 600.0,
    ):
        self.device = pick_device(device)
        self.dist = dist.init(self.device, dist_timeout) if distributed else dist.DistInfo()
        self.precision = pick_precision(precision, self.device)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.seed = seed

    @classmethod
    def for_training(cls, cfg: Any) -> Runtime:
        """The runtime of a training run (cfg: a TrainConfig): it joins torchrun's processes."""
        return cls(cfg.device, cfg.precision, cfg.num_workers, cfg.seed, True, cfg.dist_timeout)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's mixed precision around a forward pass."""
        return autocast(self.device, self.precision)

    def loader(
        self,
        dataset: Dataset,
        batch_size: int,
        epoch: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        collate_fn: Any = None,
    ) -> DataLoader:
        """A loader over this process's share of dataset for one epoch.

        The order comes from (seed, epoch) and worker randomness from (seed, epoch, rank),
        never from state that lives across epochs, so a resumed run sees the same data. An
        EpochDataset (WebDataset shards) cuts its own share with ``for_epoch``; a map-style
        dataset is shared by a DistributedSampler (in order, unpadded, with one process and
        shuffle=False).
        """
        rank, world_size = self.dist.rank, self.dist.world_size
        sampler = None
        if isinstance(dataset, EpochDataset):
            dataset = dataset.for_epoch(
                epoch,
                rank,
                world_size,
                seed=self.seed,
                shuffle=shuffle,
                batch_size=batch_size,
                drop_last=drop_last,
            )
        else:
            sampler = DistributedSampler(
                dataset, world_size, rank, shuffle=shuffle, seed=self.seed, drop_last=drop_last
            )
            sampler.set_epoch(epoch)
        seed = int(np.random.SeedSequence([self.seed, epoch, rank]).generate_state(1)[0])
        return DataLoader(
            dataset,
            batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            drop_last=drop_last,
            generator=torch.Generator().manual_seed(seed),
        )

    def wrap(self, model: torch.nn.Module, compile: bool = False) -> torch.nn.Module:
        """model as it runs: in DDP when there are several processes, compiled if asked."""
        if self.dist.enabled:
            model = dist.data_parallel(model, self.device)
        if compile:
            # Static shapes: the sparse backend's visible-site count is read from the mask (a
            # graph break); specialising on it compiles once, since recipe masks keep the same
            # count every step. Dynamic shapes fail in Inductor on that count.
            model = torch.compile(model, dynamic=False)
        return model

    def batches_per_epoch(self, dataset: Dataset, batch_size: int) -> int:
        """Whole batches each process gets per epoch from loader(..., drop_last=True)."""
        return len(dataset) // self.dist.world_size // batch_size
