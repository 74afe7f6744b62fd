"""Start pretraining from a checkpoint: ``fcmae pretrain --init SOURCE``.

SOURCE is anything fcmae.weights.layouts.read_weights reads (fcmae's checkpoints and encoder
exports, the official ``pt_only`` encoders and ``main_pretrain`` checkpoints, timm's files, Hub
names such as "timm/convnextv2_tiny.fcmae"). The FCMAE's encoder always comes from it, its
stem adapted to the model's input channels (fcmae.weights.channels); the decoder comes from it
when it holds one, else it keeps its fresh initialisation.

    model = fcmae.create_model("fcmae_convnextv2_atto", in_chans=5)
    init_fcmae(model, "convnextv2_atto_1k_224_fcmae.pt")
"""

from __future__ import annotations

import logging

from torch import nn

from fcmae.errors import UserError, cut
from fcmae.weights.channels import PRED
from fcmae.weights.layouts import Weights, check_fits, has_grn, load_into, read_weights
from fcmae.weights.timm_names import infer_size

log = logging.getLogger("fcmae")


def init_fcmae(model: nn.Module, source: str, flag: str = "--init") -> None:
    """Load SOURCE into an FCMAE before pretraining: the encoder from the file, the decoder
    from the file when it holds one. Refuses, in one sentence naming the flag that fixes it,
    another model size, GRN kind or decoder depth/width, an incomplete encoder, and a file
    that is not a network (read_weights's refusal). flag names SOURCE's option in messages."""
    weights = read_weights(source, flag)
    ours = model.encoder.state_dict()
    check_fits(weights, f"convnextv2_{infer_size(ours)}", model.in_chans, has_grn(ours), adapt=True)
    absent = [key for key in ours if key not in weights.network]
    if absent:
        raise UserError(
            f"{flag} {weights.source} lacks encoder tensors the model needs "
            f"({cut(', '.join(absent), 120)}); pass a whole ConvNeXt V2 encoder or FCMAE "
            f"checkpoint."
        )
    _check_decoder(weights, model, flag)
    load_into(model, weights)
    log.info(
        "%s %s: %s; %s.",
        flag,
        weights.source,
        _encoder_said(weights, model),
        _decoder_said(weights, model),
    )


def _check_decoder(weights: Weights, model: nn.Module, flag: str) -> None:
    """Refuse a file's decoder of another depth or width than the model's."""
    held, ours = weights.decoder_shape, (len(model.decoder), model.mask_token.shape[1])
    if held is not None and held != ours:
        raise UserError(
            f"{flag} {weights.source} holds a decoder of depth {held[0]} and width {held[1]} "
            f"but the model's has depth {ours[0]} and width {ours[1]}; pass "
            f"--decoder-depth {held[0]} --decoder-dim {held[1]}."
        )


def _encoder_said(weights: Weights, model: nn.Module) -> str:
    adapted = f", stem adapted to {model.in_chans}" if weights.in_chans != model.in_chans else ""
    return f"encoder from the file ({weights.model}, {weights.in_chans} channels{adapted})"


def _decoder_said(weights: Weights, model: nn.Module) -> str:
    if not weights.has_decoder:
        return "decoder freshly initialised (the file holds none)"
    if weights.in_chans != model.in_chans:
        return (
            f"decoder from the file but its last layer ({', '.join(PRED)}) freshly initialised "
            f"for {model.in_chans} channels"
        )
    return "decoder from the file"
