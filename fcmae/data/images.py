"""Image files as pixels: which files are images, and how one is decoded. Shared by every kind
of data source (folders, shards, the embedded photos); torch-free.

A file becomes one of two things (`Decoding`):

- a photograph: an 8-bit image of 1, 3 or 4 channels (JPEG, PNG, ... of any Pillow mode, or an
  8-bit TIFF or .npy), converted by Pillow to the mode the model is fed from ("RGB" for
  --in-chans 3, "L" for 1) and transformed as a PIL image: the path of every photograph
  dataset, unchanged, so grey and CMYK JPEGs in a colour dataset (ImageNet has both) load as
  they always did;
- an array: everything else, as float32 (C, H, W) at its full precision: unsigned 8- and 16-bit
  integers divided by 255 and 65535 (so they lie in [0, 1], as photographs do), any other
  type (signed or wider integers, floats) as it is. Its channel count must equal --in-chans:
  a file that holds another is refused (`PixelError`), as is a float array with NaN or inf.

Readers: Pillow for the common formats; tifffile for TIFF (any bit depth, any number of
channels and pages, LZW/deflate/zstd compression through imagecodecs; Pillow reads TIFFs of a
few photographic modes only), numpy for .npy, imagecodecs for 16-bit colour PNG (Pillow reduces
it to 8 bits). Every axis of a file but height and width is a channel: a TIFF's samples, its
pages (a stack of one-channel pages is a multi-channel image), a .npy's first or last axis
((C, H, W) or (H, W, C): the one of --in-chans elements).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from fcmae.errors import UserError

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
    ".npy",
)
PHOTO_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV")
MAX_VALUES = 2 * Image.MAX_IMAGE_PIXELS * 4  # what Pillow decodes at most, for 4 channels
SCALES = {1: 255.0, 2: 65535.0}  # unsigned integers of 1 and 2 bytes, to [0, 1]

Decoded = Image.Image | np.ndarray  # a photograph, or float32 (C, H, W)


class PixelError(UserError):
    """A file that can be read but not used as the run's data (other channel count, NaN or inf
    pixels): refused, never skipped, since a dataset that mixes them is a data error."""


def photo_mode(in_chans: int) -> str | None:
    """The Pillow mode a model of in_chans channels is fed photographs in: "L" (1), "RGB"
    (3); None for other channel counts, whose images are all arrays."""
    return {1: "L", 3: "RGB"}.get(in_chans)


@dataclass(frozen=True)
class Decoding:
    """How a run's files are decoded: in_chans channels; photographs as Pillow mode photo
    ("RGB" or "L"; None: every file as an array)."""

    in_chans: int
    photo: str | None

    @classmethod
    def for_model(cls, in_chans: int) -> Decoding:
        """Photographs in the mode of the model's channels (pretraining, kNN, pictures)."""
        return cls(in_chans, photo_mode(in_chans))

    def __call__(self, source: Path | BinaryIO, name: str | Path | None = None) -> Decoded:
        """The image in source (a path, or a file's bytes; name: how messages name it, ending
        in the file's extension, e.g. "SHARD.tar:KEY.tif"). Raises PixelError for a file the
        run cannot use, anything else for a file that cannot be read (a dataset skips those)."""
        name = str(name if name is not None else source)
        suffix = os.path.splitext(name)[1].lower()
        if suffix == ".npy":
            return self._array(_npy(source, name, self.in_chans), name)
        if suffix in (".tif", ".tiff"):
            return self._array(_tiff(source), name)
        with Image.open(source) as image:
            if self.photo and image.mode in PHOTO_MODES and not _is_16_bit(image):
                return image.convert(self.photo)  # every photograph's path, as it always was
            return self._array(_pillow_array(image), name)

    def photograph(self, array: np.ndarray) -> Image.Image:
        """An 8-bit (H, W) or (H, W, C) array as a photograph of mode photo."""
        return Image.fromarray(array).convert(self.photo)

    def _array(self, array: np.ndarray, name: str) -> Decoded:
        """array (C, H, W) as the run takes it: a photograph, or float32 of in_chans channels."""
        channels, height, width = array.shape
        if array.size == 0:
            raise PixelError(f"{name} holds no pixels; remove it.")
        if self.photo and array.dtype == np.uint8 and channels in (1, 3, 4):
            bands = array[0] if channels == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))
            return self.photograph(bands)
        if channels != self.in_chans:
            raise PixelError(
                f"{name} holds {_count(channels, 'channel')} ({array.dtype}, {height}x{width}) "
                f"but --in-chans is {self.in_chans}; give every image "
                f"{_count(self.in_chans, 'channel')}, or pass --in-chans {channels} if all have "
                f"{channels}."
            )
        return to_float(array, name)


def to_float(array: np.ndarray, name: str) -> np.ndarray:
    """array as float32: unsigned 8/16-bit integers scaled to [0, 1], other types as they are;
    PixelError if it holds NaN or inf (a float array, or a float64 beyond float32)."""
    scale = SCALES.get(array.dtype.itemsize) if array.dtype.kind == "u" else None
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused below
        pixels = array.astype(np.float32) / scale if scale else array.astype(np.float32)
    if not np.isfinite(pixels).all():
        bad = np.isnan(pixels).sum(), np.isinf(pixels).sum()
        kind = "float32" if array.dtype == np.float32 else f"{array.dtype}, as float32"
        raise PixelError(
            f"{name} holds {bad[0]} NaN and {bad[1]} infinite pixel values ({kind}); replace "
            f"them with numbers (e.g. numpy.nan_to_num) or remove the file."
        )
    return pixels


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _is_16_bit(image: Image.Image) -> bool:
    """A PNG of 16 bits a channel that Pillow would read as 8 (colour; grey is mode I;16)."""
    return any(";16" in str(tile.args) for tile in image.tile) and not image.mode.startswith("I")


def _pillow_array(image: Image.Image) -> np.ndarray:
    """(C, H, W) pixels of a Pillow image at their depth: 16-bit grey as uint16, mode I as
    int32, F as float32, 16-bit colour PNG through imagecodecs, 8-bit modes as their bands."""
    if _is_16_bit(image):
        import imagecodecs

        image.fp.seek(0)
        array = imagecodecs.png_decode(image.fp.read())
    elif image.mode.startswith("I;16"):
        array = np.asarray(image).astype(np.uint16)
    elif image.mode in ("I", "F"):
        array = np.asarray(image)
    else:
        mode = {"1": "L", "P": "RGBA" if "transparency" in image.info else "RGB", "PA": "RGBA"}
        array = np.asarray(image.convert(mode.get(image.mode, image.mode)))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _npy(source: Path | BinaryIO, name: str, in_chans: int) -> np.ndarray:
    """(C, H, W) of a .npy array of 2 (H, W) or 3 ((C, H, W) or (H, W, C)) dimensions: the
    channel axis is the first or last that has in_chans elements, else the smaller of the two
    (the count a refusal names)."""
    array = np.load(source, allow_pickle=False)
    if array.dtype.kind not in "uif" or array.ndim not in (2, 3):
        raise PixelError(
            f"{name} holds a {array.dtype} array of shape {array.shape}; save images as numbers "
            f"of shape (H, W), (C, H, W) or (H, W, C)."
        )
    if array.ndim == 2:
        return array[None]
    first, last = array.shape[0], array.shape[-1]
    if first == last:
        raise PixelError(
            f"{name} has shape {array.shape}, so which axis holds its channels is unclear; save "
            f"it as (C, H, W) with another count of channels than of columns."
        )
    chw = first == in_chans if in_chans in (first, last) else first < last
    return array if chw else array.transpose(2, 0, 1)


def _tiff(source: Path | BinaryIO) -> np.ndarray:
    """(C, H, W) of a TIFF: its main image (tifffile's first series) or, when every page has
    that image's shape, all pages stacked; every axis but height and width is a channel."""
    import tifffile

    with tifffile.TiffFile(source) as tif:
        series, pages = tif.series[0], tif.pages
        first = series.keyframe
        stack = len(pages) > len(series.pages) and all(
            getattr(p, "shape", None) == first.shape and p.dtype == first.dtype for p in pages
        )
        values = len(pages) * first.size if stack else series.size
        if values > MAX_VALUES:
            raise ValueError(
                f"{values} values exceed the limit against decompression bombs ({MAX_VALUES}: "
                f"Pillow's for a 4-channel image)"
            )
        if stack:
            array, axes = tif.asarray(key=range(len(pages))), "I" + first.axes
        else:
            array, axes = series.asarray(), series.axes
    height, width = axes.index("Y"), axes.index("X")
    array = np.moveaxis(array, (height, width), (-2, -1))
    return array.reshape(math.prod(array.shape[:-2]), *array.shape[-2:])


def read_float(decoded: Decoded) -> np.ndarray:
    """A decoded image as float (C, H, W): a photograph's 8 bits scaled to [0, 1]."""
    if isinstance(decoded, Image.Image):
        array = np.asarray(decoded, dtype=np.float32) / 255.0
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return decoded
