"""``fcmae export``: any supported checkpoint -> timm's ``convnextv2_<size>`` layout.

The result loads in timm as
``timm.create_model("convnextv2_<size>", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
(with ``num_classes=0`` for an encoder without a classifier; a classifier of N classes other
than 1000 needs ``num_classes=N`` in both places: timm drops a pretrained head whose count
differs from the pretrained config's).
"""

from __future__ import annotations

import logging
from typing import BinaryIO

import torch

from fcmae.config import require
from fcmae.finetune.config import ExportConfig
from fcmae.finetune.probe import is_probe
from fcmae.io import writable, write_atomic
from fcmae.weights import Weights, read_weights, to_timm

log = logging.getLogger("fcmae")


def timm_state(weights: Weights) -> tuple[str, dict[str, torch.Tensor]]:
    """A checkpoint in timm's layout: (model name, state dict). An FCMAE checkpoint or a linear
    probe gives its encoder."""
    state = dict(weights.network)
    if "norm.weight" not in state:  # a bare encoder: timm's head norm starts fresh, as new
        width = state["downsample_layers.3.1.weight"].shape[0]
        state["norm.weight"], state["norm.bias"] = torch.ones(width), torch.zeros(width)
    timm = to_timm(state, weights.model.removeprefix("convnextv2_"))
    return weights.model, {k: v.contiguous() for k, v in timm.items()}


def _save(state: dict[str, torch.Tensor], destination: str) -> None:
    """safetensors for a .safetensors name, else torch.save; through fcmae.io.write_atomic."""

    def write(f: BinaryIO) -> None:
        if destination.endswith(".safetensors"):
            from safetensors.torch import save

            f.write(save(state))
        else:
            torch.save(state, f)

    write_atomic(destination, write, "--output")


def run(cfg: ExportConfig) -> str:
    """``fcmae export``: write the file and say how timm loads it."""
    require(cfg, "checkpoint", "output")
    weights = read_weights(cfg.checkpoint, "--checkpoint")
    name, state = timm_state(weights)
    writable(cfg.output, "--output")
    _save(state, cfg.output)
    head = state.get("head.fc.weight")
    overlay, arguments = f'file="{cfg.output}"', ""
    if head is None:
        kind, arguments = "an encoder, no classifier", ", num_classes=0"
        if is_probe(weights):  # timm's head normalises the pooled features first: no match
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
    log.info(
        "Wrote %s: %s in timm's layout, %s. Load it with timm.create_model("
        '"%s", pretrained=True%s, pretrained_cfg_overlay=dict(%s)).',
        cfg.output,
        name,
        kind,
        name,
        arguments,
        overlay,
    )
    return name
