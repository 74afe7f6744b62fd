"""``fcmae export``: any supported checkpoint -> timm's ``convnextv2_<size>`` layout.

The result loads in timm as
``timm.create_model("convnextv2_<size>", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
(with ``num_classes=0`` for an encoder without a classifier; a classifier of N classes other
than 1000 needs ``num_classes=N`` in both places: timm drops a pretrained head whose count
differs from the pretrained config's).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fcmae.checkpoint import writable
from fcmae.config import require
from fcmae.errors import UserError
from fcmae.finetune.config import ExportConfig
from fcmae.formats import Weights, read_weights, to_timm


def timm_state(weights: Weights) -> tuple[str, dict[str, torch.Tensor]]:
    """A checkpoint in timm's layout: (model name, state dict). An FCMAE checkpoint or a linear
    probe gives its encoder."""
    state = dict(weights.encoder)
    if (
        "norm.weight" not in state
    ):  # a bare encoder: timm's head norm starts fresh, as in a new model
        width = state["downsample_layers.3.1.weight"].shape[0]
        state["norm.weight"], state["norm.bias"] = torch.ones(width), torch.zeros(width)
    timm = to_timm(state, weights.model.removeprefix("convnextv2_"))
    return weights.model, {k: v.contiguous() for k, v in timm.items()}


def _save(state: dict[str, torch.Tensor], destination: str) -> None:
    """Written to a temporary file beside destination, then renamed over it."""
    tmp = Path(destination).with_name(f".{Path(destination).name}.tmp{os.getpid()}")
    try:
        if destination.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)
        os.replace(tmp, destination)
    except Exception as e:  # a full disk, a file vanished under us: say so, keep nothing
        raise UserError(
            f"Cannot write --output {destination} ({str(e) or type(e).__name__}); pass a path "
            f"in a writable folder with free space."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def run(cfg: ExportConfig) -> str:
    """``fcmae export``: write the file and print how timm loads it."""
    require(cfg, "checkpoint", "output")
    weights = read_weights(cfg.checkpoint, "--checkpoint")
    name, state = timm_state(weights)
    writable(cfg.output, "--output")
    _save(state, cfg.output)
    head = state.get("head.fc.weight")
    overlay, arguments = f'file="{cfg.output}"', ""
    if head is None:
        kind, arguments = "an encoder, no classifier", ", num_classes=0"
        if weights.is_probe:  # timm's head normalises the pooled features first: no match
            kind += (
                " (the linear probe's BatchNorm + Linear head has no counterpart in timm's "
                "LayerNorm + Linear head, so it is left out)"
            )
    else:
        kind = f"a {head.shape[0]}-class classifier"
        if head.shape[0] != 1000:
            # timm drops a pretrained head whose class count differs from its pretrained
            # config's (1000); the overlay gives the file's count, so the head is kept.
            arguments = f", num_classes={head.shape[0]}"
            overlay += arguments
    if state["stem.0.weight"].shape[1] != 3:
        arguments += f", in_chans={state['stem.0.weight'].shape[1]}"
    print(
        f"Wrote {cfg.output}: {name} in timm's layout, {kind}. Load it with timm.create_model("
        f'"{name}", pretrained=True{arguments}, pretrained_cfg_overlay=dict({overlay})).'
    )
    return name
