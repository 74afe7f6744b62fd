"""Image files as pixels: which files are images, how one is decoded, and the statistics its
pixels are normalised with. Shared by every kind of data source (folders, shards, the embedded
photos); torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".gif",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_mode(in_chans: int) -> str:
    """The PIL mode a model of in_chans input channels is fed from: "L" (1) or "RGB" (3)."""
    return {1: "L", 3: "RGB"}[in_chans]


def pixel_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per input channel, in_chans values each: ImageNet's statistics, and their
    channel mean for grayscale (in_chans 1)."""
    if in_chans == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    return IMAGENET_MEAN, IMAGENET_STD


def open_image(path: Path | BinaryIO, mode: str) -> Image.Image:
    """An image file (a path, or its bytes as a file object) in mode ("RGB" or "L"), 8 bits a
    channel. 16-bit images are scaled down (65535 -> 255), float images must lie in [0, 1];
    PIL's own conversion would saturate the first to white and turn the second black. Raises
    what PIL raises, or ValueError."""
    with Image.open(path) as im:
        if im.mode.startswith("I;16") or im.mode == "I":
            pixels = np.asarray(im, dtype=np.float64)
            if im.mode.startswith("I;16") or pixels.max() > 255:
                pixels = pixels / 257
            im = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
        elif im.mode == "F":
            pixels = np.asarray(im, dtype=np.float64)
            if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1):
                raise ValueError(
                    f"float pixels span [{pixels.min():g}, {pixels.max():g}], not [0, 1]; "
                    f"save it with 8 or 16 bits"
                )
            im = Image.fromarray((pixels * 255).round().astype(np.uint8))
        return im.convert(mode)
