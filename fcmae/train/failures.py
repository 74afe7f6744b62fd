"""What stops a training run, each as one sentence that names the fix: out of memory, a
process that stalled at a collective, a loss that became nan or inf. Disk errors become
sentences where files are written (fcmae.run.files)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from fcmae.errors import UserError
from fcmae.run.logs import log_to_file
from fcmae.train import distributed as dist


class NonFiniteLoss(UserError):
    """The loss became nan or inf; training stopped without saving the bad state."""

    all_ranks = True  # every rank raises it at the same step: only rank 0 need say so


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's or MPS's failure (a RuntimeError,
    "MPS backend out of memory ...")."""
    said = str(error)
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError)
        and ("can't allocate memory" in said or "MPS backend out of memory" in said)
    )


def out_of_memory(device: torch.device, precision: str, batch_size: int) -> UserError:
    hint = " or --precision bf16" if precision == "fp32" and device.type == "cuda" else ""
    return UserError(
        f"Out of memory on {device} at --batch-size {batch_size}: lower --batch-size (set "
        f"--effective-batch to keep the effective batch and lr through gradient "
        f"accumulation){hint}."
    )


def stalled(rank: int, timeout_s: float) -> UserError:
    return UserError(
        f"Process {rank} waited more than {timeout_s:g} s for the others: one of them stalled "
        f"or died (see its output). Rerun the same command to resume from the last checkpoint; "
        f"raise --dist-timeout if steps are that slow."
    )


def non_finite(
    loss: float,
    where: str,
    lr_flag: str,
    lr_value: float,
    precision: str,
    last_checkpoint: Path | None,
) -> NonFiniteLoss:
    """where: e.g. "epoch 3, step 12"; lr_flag/lr_value: the option that set the lr."""
    lower = f"a lower {lr_flag} (e.g. {lr_value / 2:g})" + (
        "" if precision == "fp32" else " or --precision fp32"
    )
    if last_checkpoint is not None:
        fix = (
            f"The last good checkpoint is {last_checkpoint}: rerun the same command with "
            f"--resume auto and {lower}."
        )
    else:
        fix = f"No checkpoint was written yet: restart with {lower}."
    return NonFiniteLoss(f"The loss became {loss} at {where}; stopped without saving. {fix}")


@contextlib.contextmanager
def as_sentences(
    device: torch.device, precision: str, batch_size: int, rank: int, timeout_s: float
) -> Iterator[None]:
    """Around a training loop: out-of-memory and collective timeouts become UserErrors, and
    every UserError is also written to the run's log.txt (the CLI prints it on stderr)."""
    try:
        yield
    except UserError as e:
        log_to_file(f"fcmae: error: {e}")
        raise
    except RuntimeError as e:  # torch.OutOfMemoryError is a RuntimeError
        if is_out_of_memory(e):
            error = out_of_memory(device, precision, batch_size)
        elif dist.timed_out(e):
            error = stalled(rank, timeout_s)
        else:
            raise
        log_to_file(f"fcmae: error: {error}")
        raise error from None
