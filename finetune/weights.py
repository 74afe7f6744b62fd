"""Checkpoints into the fine-tuning stage's models, with errors that name the flag to fix.

`fcmae.formats.load_into` detects the layout and loads; this module reads a file once, tells
what it holds (size, input channels, head), checks it against the command's flags, and logs
the keys that were not loaded by name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from fcmae.errors import UserError
from fcmae.formats import infer_size, load_into, read, to_fcmae_layout

log = logging.getLogger("fcmae")


@dataclass
class Checkpoint:
    """A checkpoint read into fcmae's names: `state`, and what it holds."""

    path: str
    state: dict
    model: str            # e.g. "convnextv2_atto"
    in_chans: int
    num_classes: int | None  # None: no classifier head (an encoder)


def read_checkpoint(path: str, flag: str) -> Checkpoint:
    """Read a checkpoint file of any supported layout; flag names it in errors."""
    state = to_fcmae_layout(read(path))
    # An FCMAE checkpoint holds the encoder under "encoder." beside the decoder.
    dense = {k.removeprefix("encoder."): v for k, v in state.items()}
    size = infer_size(dense)
    if size is None:
        raise UserError(f"{path} (from {flag}) holds no ConvNeXt V2 weights of a known size; pass "
                        f"an fcmae, official or timm ConvNeXt V2 checkpoint.")
    head = dense.get("head.weight")
    return Checkpoint(path, state, f"convnextv2_{size}",
                      dense["downsample_layers.0.0.weight"].shape[1],
                      None if head is None else head.shape[0])


def check_fits(ckpt: Checkpoint, model: str, in_chans: int) -> None:
    """Refuse a checkpoint of another size or input channels, naming the flag that fixes it."""
    if ckpt.model != model:
        raise UserError(f"{ckpt.path} is a {ckpt.model} checkpoint but --model is {model}; pass "
                        f"--model {ckpt.model}.")
    if ckpt.in_chans != in_chans:
        raise UserError(f"{ckpt.path} takes {ckpt.in_chans}-channel images but --in-chans is "
                        f"{in_chans}; pass --in-chans {ckpt.in_chans}.")


def load_weights(model: nn.Module, ckpt: Checkpoint) -> tuple[list[str], list[str]]:
    """Load ckpt into model and log what was not loaded, by name; returns (missing, unexpected)."""
    head = getattr(model, "head", None)
    if ckpt.num_classes is not None and isinstance(head, nn.Linear) \
            and head.out_features != ckpt.num_classes:
        log.info("The checkpoint's head has %d classes and this model %d: the head starts fresh.",
                 ckpt.num_classes, head.out_features)
    missing, unexpected = load_into(model, ckpt.state)
    log.info("Loaded %s (%s).", ckpt.path, ckpt.model)
    if missing:
        log.info("Not in the checkpoint, initialised fresh: %s.", ", ".join(missing))
    if unexpected:
        log.info("In the checkpoint but not used: %s.", ", ".join(unexpected))
    return missing, unexpected
