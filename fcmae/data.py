"""Datasets and transforms for pretraining (and fine-tuning's image folders).

Samples are `(image (C, H, W) float tensor, label int, skipped bool)`, where skipped says that
the sample's own file was unreadable and another stands in for it; `collate` turns a list of
them into a `Batch` so that the engine can count skipped files without knowing the dataset.
Images come from a folder (`ImageFiles`), the embedded photos, or WebDataset tar shards
(`fcmae.shards`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from fcmae.errors import UserError

log = logging.getLogger("fcmae")

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

# Real photographs that ship inside scikit-image (public domain / CC0), no download needed.
# Grayscale ones are textures and scenes; all are used as RGB or L as in_chans asks.
EMBEDDED_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "immunohistochemistry",
    "retina",
    "rocket",
    "hubble_deep_field",
    "stereo_motorcycle",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
    "clock",
)


class Batch(NamedTuple):
    """A collated batch: images (N, C, H, W), labels (N,), and skipped (N,) bool: the sample's
    own file was unreadable and the next readable one stands in for it."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: torch.Tensor


def collate(samples: list[tuple[torch.Tensor, int, bool]]) -> Batch:
    """Stack samples from the datasets below into a Batch."""
    images, labels, skipped = zip(*samples)
    return Batch(torch.stack(images), torch.tensor(labels), torch.tensor(skipped, dtype=bool))


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


def pil_mode(in_chans: int) -> str:
    return {1: "L", 3: "RGB"}[in_chans]


def normalize(in_chans: int) -> T.Normalize:
    """ImageNet statistics; grayscale uses their channel mean."""
    if in_chans == 1:
        return T.Normalize([sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])
    return T.Normalize(IMAGENET_MEAN, IMAGENET_STD)


def pretrain_transform(input_size: int, in_chans: int = 3) -> Callable:
    """The FCMAE recipe: RandomResizedCrop(scale 0.2-1, bicubic), flip, normalise -> (C, s, s)."""
    return T.Compose(
        [
            T.RandomResizedCrop(
                input_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC
            ),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize(in_chans),
        ]
    )


def find_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Image files under root, searched recursively and sorted, with ImageFolder labels.

    If root holds only subdirectories, each one is a class (label = its sorted index);
    otherwise the folder is flat and every label is -1. Returns (files, labels, classes).
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"Data dir {root} does not exist; check the --data path.")
    if not root.is_dir():
        raise UserError(f"--data {root} is a file, not a folder; pass the folder of images.")
    if not any(root.iterdir()):
        raise UserError(f"Data dir {root} is empty; put images in it or pass another --data.")
    files = sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(root, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
        raise UserError(
            f"No images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}; "
            f"pass a folder that contains some."
        )
    top = [f.relative_to(root).parts for f in files]
    if any(len(parts) == 1 for parts in top):
        return files, [-1] * len(files), []
    classes = sorted({parts[0] for parts in top})
    index = {c: i for i, c in enumerate(classes)}
    return files, [index[parts[0]] for parts in top], classes


class ImageFiles(Dataset):
    """Image files with labels; an unreadable or truncated file is skipped, never a crash.

    When file i cannot be decoded, the next files are tried in turn, so batches stay full (all
    ranks of a DDP run take the same number of steps), and the sample says that its own file
    was skipped: each unreadable file counts once, on its own turn.
    """

    def __init__(self, files: list[Path], labels: list[int], transform: Callable, in_chans: int):
        self.files, self.labels, self.transform = files, labels, transform
        self.mode = pil_mode(in_chans)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        for offset in range(len(self.files)):
            j = (i + offset) % len(self.files)
            try:
                image = open_image(self.files[j], self.mode)
            # PIL signals broken files with OSError, SyntaxError, ValueError, its own
            # DecompressionBombError...: any failure to decode means "skip this file".
            except Exception as e:
                if offset == 0:  # said once, on the file's own turn
                    log.warning(
                        "Skipping unreadable image %s (%s: %s)", self.files[j], type(e).__name__, e
                    )
                continue
            return self.transform(image), self.labels[j], offset > 0
        raise UserError(
            f"None of the {len(self.files)} images can be read (first: "
            f"{self.files[0]}); check the files under --data."
        )


def load_photos(in_chans: int = 3) -> list[Image.Image]:
    """The embedded scikit-image photographs as PIL images in RGB or L."""
    import skimage.data

    photos = []
    for name in EMBEDDED_PHOTOS:
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle returns (left, right, disparity)
            array = array[0]
        photos.append(Image.fromarray(array).convert(pil_mode(in_chans)))
    return photos


class EmbeddedPhotos(Dataset):
    """`length` random crops per epoch of the embedded photos; label = photo index.

    Sample i crops photo i mod P, so every epoch sees every photo equally often.
    """

    def __init__(self, length: int, transform: Callable, in_chans: int = 3):
        self.photos = load_photos(in_chans)
        self.length, self.transform = length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        photo = i % len(self.photos)
        return self.transform(self.photos[photo]), photo, False


def pretrain_dataset(
    data: str | None, input_size: int, in_chans: int, demo_images: int
) -> tuple[Dataset, str]:
    """The pretraining dataset and a one-line description of it for the log."""
    transform = pretrain_transform(input_size, in_chans)
    if data is None:
        dataset = EmbeddedPhotos(demo_images, transform, in_chans)
        return dataset, (
            f"No --data given: pretraining on the embedded demo set, {demo_images} "
            f"random crops per epoch of {len(dataset.photos)} scikit-image photos."
        )
    from fcmae.shards import is_shards, open_shards  # fcmae.shards builds on this module

    if is_shards(data):
        shards = open_shards(data, "--data", transform, in_chans)
        return shards, (
            f"Data: {len(shards)} images in {len(shards.shards)} WebDataset shards {data} "
            f"(labels unused)."
        )
    files, labels, classes = find_images(data)
    layout = f"{len(classes)} class folders" if classes else "a flat folder"
    return (
        ImageFiles(files, labels, transform, in_chans),
        f"Data: {len(files)} images in {data} ({layout}; labels unused).",
    )


def fixed_images(data: str | None, input_size: int, in_chans: int, count: int) -> torch.Tensor:
    """``count`` images of --data, evenly spaced in path order so that an ImageFolder shows
    every class (the first ones of shards; the embedded photos without --data), resized and
    centre-cropped to input_size and normalised: (count, C, s, s). The same images every time,
    for pictures that compare epochs or checkpoints."""
    transform = T.Compose(
        [
            T.Resize(input_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(input_size),
            T.ToTensor(),
            normalize(in_chans),
        ]
    )
    from fcmae.shards import first_shard_images, is_shards

    if data is None:
        photos = load_photos(in_chans)[:count]
    elif is_shards(data):
        photos = first_shard_images(data, "--data", count, in_chans)
    else:
        files = find_images(data)[0]
        dataset = ImageFiles(files, [0] * len(files), lambda image: image, in_chans)
        picks = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
        photos = [dataset[i][0] for i in picks]
    return torch.stack([transform(photo) for photo in photos])
