"""Where and how a process computes: device, precision, seeds, data-loading workers."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch

from fcmae.errors import UserError


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
