"""``fcmae export``: any supported checkpoint -> timm's ``convnextv2_<size>`` layout.

The result loads in timm as
``timm.create_model("convnextv2_<size>", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
(with ``num_classes=0`` for an encoder without a classifier; a classifier of N classes other
than 1000 needs ``num_classes=N`` in both places: timm drops a pretrained head whose count
differs from the pretrained config's).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fcmae.config import require
from fcmae.finetune.config import ExportConfig
from fcmae.formats import read_weights, to_timm


def timm_state(source: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``source`` (a checkpoint path) in timm's layout: (model name, state dict). An FCMAE
    checkpoint gives its encoder."""
    weights = read_weights(source, "--checkpoint")
    state = dict(weights.encoder)
    if (
        "norm.weight" not in state
    ):  # a bare encoder: timm's head norm starts fresh, as in a new model
        width = state["downsample_layers.3.1.weight"].shape[0]
        state["norm.weight"], state["norm.bias"] = torch.ones(width), torch.zeros(width)
    timm = to_timm(state, weights.model.removeprefix("convnextv2_"))
    return weights.model, {k: v.contiguous() for k, v in timm.items()}


def _save(state: dict[str, torch.Tensor], destination: str | Path) -> None:
    if str(destination).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(destination))
    else:
        torch.save(state, destination)


def run(cfg: ExportConfig) -> str:
    """``fcmae export``: write the file and print how timm loads it."""
    require(cfg, "checkpoint", "output")
    name, state = timm_state(cfg.checkpoint)
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    _save(state, cfg.output)
    head = state.get("head.fc.weight")
    overlay, arguments = f'file="{cfg.output}"', ""
    if head is None:
        kind, arguments = "an encoder, no classifier", ", num_classes=0"
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
