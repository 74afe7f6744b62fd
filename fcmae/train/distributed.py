"""torch.distributed set-up for runs launched by torchrun (one node or many, same launcher).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them the run is a single process and
every helper here is a no-op, so the engine has one code path.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: rank of world_size processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device, timeout_s: float = 600) -> DistInfo:
    """Join the process group torchrun prepared: nccl for CUDA devices, gloo otherwise. A
    collective that waits longer than timeout_s for another process fails (see timed_out)."""
    if not launched_by_torchrun():
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            device_id=device if device.type == "cuda" else None,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    return info


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """model wrapped in DistributedDataParallel for this process's device."""
    # Depthwise conv weights are (C, 1, k, k); conv backward may give their gradient another
    # stride on the size-1 dim, which DDP compares literally and warns about on every rank. The
    # memory layout is the same, so the warning says nothing here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def timed_out(error: BaseException) -> bool:
    """Whether error is a collective that gave up waiting for another process."""
    return dist.is_initialized() and "timed out" in str(error).lower()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (in place) and return it."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's obj, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
