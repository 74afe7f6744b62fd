"""The memory a command needs, estimated from its settings before anything is built, and the
refusal of what clearly cannot fit (``Config.validate`` calls ``check_fits``). Torch-free.

The estimate is a lower bound, so that a refusal never hits a run that would fit:

- parameters: 8 d^2 per block of width d (its two pointwise layers, nearly all its weights),
  plus the stem, the downsampling layers and the 1x1 layers of the decoder or the head;
- float32 throughout: a trained parameter takes 16 bytes on its device (the weight, its
  gradient, AdamW's two moments), a frozen one 4;
- one batch: its images, and in training the 4 d wide hidden features that each block keeps for
  the backward pass (none under --grad-checkpointing, none in a frozen encoder);
- an evaluation image resized to input_size / crop_pct before its centre crop (uint8), and the
  demo's shuffled order of images (8 bytes each).

Host memory (physical RAM) holds, whatever the device, the model as it is built (4 bytes a
parameter, before it moves), the collated batch and what the loaders prepare; with --device cpu
(or mps, which shares it) it holds everything above. A GPU's memory is checked when the run
allocates there: torch's out-of-memory error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from fcmae.errors import ConfigError
from fcmae.models import SIZES
from fcmae.models.masking import STRIDE

FLOAT = 4  # bytes of a float32
TRAINED = 4 * FLOAT  # a trained parameter: weight, gradient, AdamW's exp_avg and exp_avg_sq
_LOWER_BATCH = "lower --batch-size or --input-size"
_MODEL = "pick a smaller --model"
_BATCH = "one batch: its images and what the network keeps of them"


@dataclass(frozen=True)
class Need:
    """A part of what a command needs: bytes, what they hold, the options that set them (the
    message shows their values) and the fix."""

    bytes: float
    what: str
    keys: tuple[str, ...]
    fix: str


def physical_memory() -> int | None:
    """Bytes of RAM in this machine; None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows), or no such name
        return None


def check_fits(cfg: Any, needs: list[Need]) -> None:
    """Raise ConfigError when needs together exceed this machine's RAM, naming the options
    of the largest part."""
    memory, total = physical_memory(), sum(need.bytes for need in needs)
    if memory is None or total <= memory:
        return
    largest = max(needs, key=lambda need: need.bytes)
    shown = " and ".join(f"--{key.replace('_', '-')} {getattr(cfg, key)}" for key in largest.keys)
    raise ConfigError(
        f"{shown} need{'s' if len(largest.keys) == 1 else ''} about {total:.1e} bytes "
        f"({largest.what}), more than this machine's {memory / 2**30:.3g} GiB of memory; "
        f"{largest.fix}."
    )


def pretraining(cfg: Any) -> list[Need]:
    """What an FCMAE pretraining run of cfg (a PretrainConfig) needs."""
    on_host = _on_host(cfg.device)
    _, dims = _size(cfg.model)
    width, size = cfg.decoder_dim, cfg.input_size
    decoder = cfg.decoder_depth * 8 * width * width + width * (dims[-1] + STRIDE**2 * cfg.in_chans)
    batch = _images(cfg.batch_size, cfg.in_chans, size)
    if on_host:  # the decoder runs on every site of the final grid; the encoder on visible ones
        batch += cfg.decoder_depth * cfg.batch_size * (size / STRIDE) ** 2 * 4 * width * FLOAT
        if not cfg.grad_checkpointing:
            visible = max(1 - cfg.mask_ratio, 0)
            batch += _hidden(cfg.model, cfg.batch_size * visible, size)
    demo = 8 * cfg.demo_images if cfg.data is None else 0
    return [
        _parameters(_encoder(cfg.model, cfg.in_chans), on_host, ("model",), _MODEL),
        _parameters(
            decoder,
            on_host,
            ("decoder_dim", "decoder_depth"),
            "lower --decoder-dim or --decoder-depth",
        ),
        Need(batch, _BATCH, ("batch_size", "input_size"), _LOWER_BATCH),
        Need(demo, "the demo's order of images", ("demo_images",), "lower --demo-images"),
    ]


def classifier(cfg: Any, trains_encoder: bool) -> list[Need]:
    """What fine-tuning (trains_encoder) or a linear probe of cfg needs."""
    on_host = _on_host(cfg.device)
    _, dims = _size(cfg.model)
    batch = _images(cfg.batch_size, cfg.in_chans, cfg.input_size)
    if on_host and trains_encoder and not cfg.grad_checkpointing:
        batch += _hidden(cfg.model, cfg.batch_size, cfg.input_size)
    encoder = _encoder(cfg.model, cfg.in_chans)
    head = dims[-1] * (cfg.num_classes or 0)
    return [
        _parameters(encoder, on_host and trains_encoder, ("model",), _MODEL),
        _parameters(head, on_host, ("num_classes",), "lower --num-classes"),
        Need(batch, _BATCH, ("batch_size", "input_size"), _LOWER_BATCH),
        _resized(cfg),
    ]


def inference(cfg: Any) -> list[Need]:
    """What a forward-only command of cfg needs (eval, knn): the network, when --model names
    it (else the checkpoint's, known later), one batch and one resized image."""
    encoder = _encoder(cfg.model, cfg.in_chans or 1) if cfg.model else 0
    return [
        _parameters(encoder, False, ("model",), _MODEL),
        Need(
            _images(cfg.batch_size, cfg.in_chans or 1, cfg.input_size),
            _BATCH,
            ("batch_size", "input_size"),
            _LOWER_BATCH,
        ),
        _resized(cfg),
    ]


def scoring(cfg: Any) -> list[Need]:
    """What a sweep of cfg (a SweepConfig) needs to score each encoder after pretraining it:
    the fine-tune's (or the probe's) encoder and a batch of --eval-batch-size."""
    on_host, trains = _on_host(cfg.device), bool(cfg.finetune_epochs)
    batch = _images(cfg.eval_batch_size, cfg.in_chans, cfg.input_size)
    if on_host and trains:
        batch += _hidden(cfg.model, cfg.eval_batch_size, cfg.input_size)
    return [
        _parameters(_encoder(cfg.model, cfg.in_chans), on_host and trains, ("model",), _MODEL),
        Need(
            batch,
            _BATCH,
            ("eval_batch_size", "input_size"),
            "lower --eval-batch-size or --input-size",
        ),
    ]


def one_image(cfg: Any) -> list[Need]:
    """What a command that shows images at cfg.input_size needs at least: one image."""
    size = cfg.input_size or 0
    return [Need(_images(1, 1, size), "one image", ("input_size",), "lower --input-size")]


def _on_host(device: str) -> bool:
    """Whether the device computes in host memory."""
    return device in ("cpu", "mps")


def _size(model: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return SIZES[model.removeprefix("convnextv2_")]


def _encoder(model: str, in_chans: int) -> int:
    """Parameters of the encoder (a lower bound)."""
    depths, dims = _size(model)
    stem = 16 * in_chans * dims[0]  # a 4x4 convolution
    downsampling = sum(4 * a * b for a, b in zip(dims, dims[1:]))  # 2x2 convolutions
    return stem + downsampling + sum(d * 8 * dim * dim for d, dim in zip(depths, dims))


def _hidden(model: str, batch: float, size: int) -> float:
    """Bytes of the 4 d wide hidden features that the encoder's blocks keep for the backward
    pass: stage i has (size / 2^(i+2))^2 sites."""
    depths, dims = _size(model)
    return sum(
        depth * batch * (size / 2 ** (i + 2)) ** 2 * 4 * dim * FLOAT
        for i, (depth, dim) in enumerate(zip(depths, dims))
    )


def _images(batch: int, in_chans: int, size: int) -> float:
    """Bytes of a batch of float32 images."""
    return float(batch) * in_chans * size * size * FLOAT


def _parameters(count: int, trained: bool, keys: tuple[str, ...], fix: str) -> Need:
    """count parameters: trained on the host (16 bytes each) or only built there (4)."""
    if trained:
        return Need(count * TRAINED, "parameters, gradients and AdamW's state", keys, fix)
    return Need(count * FLOAT, "parameters, built in host memory", keys, fix)


def _resized(cfg: Any) -> Need:
    """An evaluation image resized to input_size / crop_pct, before its centre crop."""
    side = cfg.input_size / cfg.crop_pct
    return Need(
        (cfg.in_chans or 1) * side * side,
        "an image resized before its centre crop",
        ("input_size", "crop_pct"),
        "lower --input-size or raise --crop-pct",
    )
