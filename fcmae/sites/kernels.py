"""Conv weights in MinkowskiEngine's kernel layout and back: torch only, no MinkowskiEngine.

The ``minkowski`` backend runs the network's own conv weights through MinkowskiEngine's layers,
and the official pretraining checkpoint stores its sparse encoder's convs in that layout; both
use these two functions. The layout is the one the official code's ``remap_checkpoint_keys``
(facebookresearch/ConvNeXt-V2, ``utils.py``) undoes: kernel offsets run column-major.
"""

from __future__ import annotations

import torch


def to_me_kernel(weight: torch.Tensor, depthwise: bool) -> torch.Tensor:
    """A square conv weight -> MinkowskiEngine's kernel: (k*k, C) for a depthwise conv weight
    (C, 1, k, k), else (k*k, in, out). Kernel offsets run column-major: offset (dy, dx) is row
    dx * k + dy."""
    k = weight.shape[-1]
    if depthwise:
        kernel = weight.transpose(3, 2).reshape(weight.shape[0], k * k).permute(1, 0)
    else:
        kernel = weight.transpose(3, 2).reshape(*weight.shape[:2], k * k).permute(2, 1, 0)
    return kernel.contiguous()


def from_me_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """The inverse of ``to_me_kernel``: (k*k, C) -> (C, 1, k, k), (k*k, in, out) -> (out, in,
    k, k)."""
    k = round(kernel.shape[0] ** 0.5)
    if kernel.dim() == 2:
        return kernel.permute(1, 0).reshape(kernel.shape[1], 1, k, k).transpose(3, 2)
    return kernel.permute(2, 1, 0).reshape(kernel.shape[2], kernel.shape[1], k, k).transpose(3, 2)
