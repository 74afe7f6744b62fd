"""timm's names for fcmae's tensors: ``to_timm`` and ``from_timm`` map a dense state dict to
timm's ``convnextv2_<size>`` layout and back, by timm's own ``checkpoint_filter_fn``;
``infer_size`` reads the size of a state dict in either names. fcmae.weights.layouts reads timm's
files as one of its layouts; fcmae.finetune.export writes them."""

from __future__ import annotations

import functools
import re

import torch
from torch import nn

from fcmae.models import SIZES, create_model


def infer_size(state: dict[str, torch.Tensor]) -> str | None:
    """The size whose stem width and stage depths match a state dict (dense or timm names)."""
    stem = state.get("downsample_layers.0.0.weight", state.get("stem.0.weight"))
    if stem is None:
        return None
    blocks = [re.match(r"stages\.(\d)\.(?:blocks\.)?(\d+)\.", k) for k in state]
    depths = tuple(
        1 + max((int(m[2]) for m in blocks if m and int(m[1]) == i), default=-1) for i in range(4)
    )
    for name, (size_depths, dims) in SIZES.items():
        if dims[0] == stem.shape[0] and size_depths == depths:
            return name
    return None


@functools.cache
def _timm_model(size: str) -> nn.Module:
    """timm's convnextv2_<size> on the meta device: names and shapes, no memory."""
    import timm

    with torch.device("meta"):
        return timm.create_model(f"convnextv2_{size}", pretrained=False)


@functools.cache
def _names(size: str) -> dict[str, str]:
    """fcmae's dense key -> timm's, for a classifier of this size, by timm's own filter."""
    from timm.models.convnext import checkpoint_filter_fn

    with torch.device("meta"):
        ours = create_model(f"convnextv2_{size}").state_dict()
    return {
        key: next(iter(checkpoint_filter_fn({key: value}, _timm_model(size))))
        for key, value in ours.items()
    }


def to_timm(state: dict[str, torch.Tensor], size: str | None = None) -> dict[str, torch.Tensor]:
    """A dense state dict -> timm's ``convnextv2_<size>`` layout (size inferred when None)."""
    from timm.models.convnext import checkpoint_filter_fn

    return checkpoint_filter_fn(state, _timm_model(size or infer_size(state)))


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's ``convnextv2_*`` state dict -> the dense layout."""
    size = infer_size(state)
    ours = {timm_key: key for key, timm_key in _names(size).items()}
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in create_model(f"convnextv2_{size}").state_dict().items()}
    out = {}
    for key, value in state.items():
        new = ours.get(key, key)
        # timm's small sizes hold the MLP as 1x1 convs (4-d where ours are 2-d); the stem keeps
        # its own in_chans and the head its own class count.
        reshape = new in shapes and value.dim() != len(shapes[new])
        out[new] = value.reshape(shapes[new]) if reshape else value
    return out
