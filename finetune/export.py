"""``fcmae export``: any supported checkpoint -> timm's ``convnextv2_<size>`` layout, as one file
(--output) or as a Hugging Face Hub model folder (--hub-dir, see fcmae.finetune.hub_folder).

The result loads in timm as
``timm.create_model("convnextv2_<size>", pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
(with ``num_classes=0`` for an encoder without a classifier; a classifier of N classes other
than 1000 needs ``num_classes=N`` in both places: timm drops a pretrained head whose count
differs from the pretrained config's).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import torch

from fcmae.config.schema import require
from fcmae.data.stats import parse_stats
from fcmae.errors import ConfigError, UserError
from fcmae.finetune import hub_folder
from fcmae.finetune.classifier import class_names
from fcmae.finetune.config import ExportConfig
from fcmae.finetune.probe import is_probe
from fcmae.run.files import replaceable, writable, write_atomic
from fcmae.weights.layouts import Weights, read_weights
from fcmae.weights.timm_names import to_timm

log = logging.getLogger("fcmae")


def timm_state(weights: Weights) -> tuple[str, dict[str, torch.Tensor]]:
    """A checkpoint in timm's layout: (model name, state dict). An FCMAE checkpoint or a linear
    probe gives its encoder."""
    if not weights.grn:
        raise UserError(
            f"{weights.source} holds blocks without GRN (trained with --no-grn), which timm's "
            f"convnextv2 models cannot hold; use it with fcmae, which reads it as it is."
        )
    state = dict(weights.network)
    if "norm.weight" not in state:  # a bare encoder: timm's head norm starts fresh, as new
        width = state["downsample_layers.3.1.weight"].shape[0]
        state["norm.weight"], state["norm.bias"] = torch.ones(width), torch.zeros(width)
    timm = to_timm(state, weights.model.removeprefix("convnextv2_"))
    return weights.model, {k: v.contiguous() for k, v in timm.items()}


def _save(state: dict[str, torch.Tensor], destination: str, stats: str | None) -> None:
    """safetensors for a .safetensors name (stats, the run's pixel statistics, in its
    metadata), else torch.save of the state dict alone; written atomically."""

    def write(f: BinaryIO) -> None:
        if destination.endswith(".safetensors"):
            from safetensors.torch import save

            f.write(save(state, metadata={"pixel_stats": stats} if stats else None))
        else:
            torch.save(state, f)

    write_atomic(destination, write)


def _kind(weights: Weights, state: dict[str, torch.Tensor]) -> str:
    """What the export holds, as the log and the model card say it."""
    head = state.get("head.fc.weight")
    if head is not None:
        return f"a {head.shape[0]}-class classifier"
    kind = "an encoder, no classifier"
    if is_probe(weights):  # timm's head normalises the pooled features first: no match
        kind += (
            " (the linear probe's BatchNorm + Linear head has no counterpart in timm's "
            "LayerNorm + Linear head, so it is left out)"
        )
    return kind


def _refuse_replacing(cfg: ExportConfig) -> None:
    """A command never replaces a file it did not write: without --overwrite, refuse an
    --output file, or a file of the --hub-dir folder, that already exists."""
    if cfg.hub_dir is not None:
        replaceable([Path(cfg.hub_dir, n) for n in hub_folder.FILES], "--hub-dir", cfg.overwrite)
    else:
        replaceable([Path(cfg.output)], "--output", cfg.overwrite)


def _write_hub_folder(cfg: ExportConfig) -> str:
    """--hub-dir: config.json, model.safetensors and README.md for timm and the Hub."""
    weights = read_weights(cfg.checkpoint, "--checkpoint")
    name, state = timm_state(weights)
    writable(cfg.hub_dir, "--hub-dir", folder=True)
    kind = _kind(weights, state)
    hub_folder.write_folder(
        weights, name, state, kind, cfg.hub_dir, cfg.checkpoint, class_names(weights)
    )
    log.info(
        'Wrote %s: %s (%s) as a Hub model folder. timm.create_model("local-dir:%s", '
        'pretrained=True) loads it; huggingface_hub.upload_folder(repo_id="USER/NAME", '
        'folder_path="%s") publishes it (set the licence in its README.md first).',
        cfg.hub_dir,
        name,
        kind,
        cfg.hub_dir,
        cfg.hub_dir,
    )
    return name


def run(cfg: ExportConfig) -> str:
    """``fcmae export``: write the file (or the Hub folder) and say how timm loads it."""
    require(cfg, "checkpoint")
    if cfg.output is None and cfg.hub_dir is None:
        raise ConfigError("--output or --hub-dir is required; see --help.")
    _refuse_replacing(cfg)
    if cfg.hub_dir is not None:
        return _write_hub_folder(cfg)
    weights = read_weights(cfg.checkpoint, "--checkpoint")
    name, state = timm_state(weights)
    writable(cfg.output, "--output")
    stats = hub_folder.run_record(weights, cfg.checkpoint).settings.get("pixel_stats")
    _save(state, cfg.output, stats)
    head = state.get("head.fc.weight")
    overlay, arguments = f'file="{cfg.output}"', ""
    if head is None:
        arguments = ", num_classes=0"
    elif head.shape[0] != 1000:
        # timm drops a pretrained head whose class count differs from its pretrained
        # config's (1000); the overlay gives the file's count, so the head is kept.
        arguments = f", num_classes={head.shape[0]}"
        overlay += arguments
    in_chans = state["stem.0.weight"].shape[1]
    if in_chans != 3:
        arguments += f", in_chans={in_chans}"
    if stats and stats != "imagenet":  # timm's data config would assume ImageNet's
        numbers = parse_stats(stats, in_chans)
        overlay += f", mean={numbers.mean}, std={numbers.std}"
    log.info(
        "Wrote %s: %s in timm's layout, %s. Load it with timm.create_model("
        '"%s", pretrained=True%s, pretrained_cfg_overlay=dict(%s)).',
        cfg.output,
        name,
        _kind(weights, state),
        name,
        arguments,
        overlay,
    )
    return name
