"""Where the jobs get their images: one switch between the kinds of data source, the folder and
demo datasets, and the pretraining transforms (a folder's files are found by fcmae.data.folders).

The contract with the runtime (defined in `fcmae.data.samples`, importable from here): a dataset is
either

- a map-style torch ``Dataset`` whose item i is a sample ``(image (C, H, W) float tensor,
  label int, skipped bool)`` (`ImageFiles`, `EmbeddedPhotos`); the runtime shares it out over
  processes with a DistributedSampler; or
- an `EpochDataset`: an ``IterableDataset`` of the same samples that cuts its own part of each
  epoch with ``for_epoch(epoch, rank, world_size, *, seed, shuffle, batch_size, drop_last)``
  (`fcmae.data.shards.Shards`, WebDataset tar shards).

skipped says that the sample's own file was unreadable and another stands in for it; `collate`
turns a list of samples into a `Batch` (images, labels, skipped), so that the engine counts
skipped files without knowing the dataset.

`data_source` tells what a --data string names (nothing: the embedded demo photos; WebDataset
shards; a folder of images) and is the one place that decides it: every job opens its data
through the `Source` it returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from fcmae.data.folders import class_folder, find_images
from fcmae.data.images import decode_mode, open_image, pixel_stats
from fcmae.data.samples import Batch as Batch
from fcmae.data.samples import EpochDataset as EpochDataset
from fcmae.data.samples import collate as collate
from fcmae.data.shards import SHARD_SUFFIXES, first_shard_images, open_shards, shard_classes
from fcmae.errors import UserError

log = logging.getLogger("fcmae")

# Real photographs that ship inside scikit-image (public domain / CC0), no download needed.
# Grayscale ones are textures and scenes; all are decoded as RGB or L as the model asks.
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


def normalize(in_chans: int) -> T.Normalize:
    """ImageNet statistics; grayscale uses their channel mean (`fcmae.data.images.pixel_stats`)."""
    mean, std = pixel_stats(in_chans)
    return T.Normalize(mean, std)


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


class ImageFiles(Dataset):
    """Image files with labels, decoded in mode ("RGB" or "L"); an unreadable or truncated
    file is skipped, never a crash.

    When file i cannot be decoded, the next files are tried in turn, so batches stay full (all
    ranks of a DDP run take the same number of steps), and the sample says that its own file
    was skipped: each unreadable file counts once, on its own turn.
    """

    def __init__(self, files: list[Path], labels: list[int], transform: Callable, mode: str):
        self.files, self.labels, self.transform, self.mode = files, labels, transform, mode
        if files and not any(map(self._readable, files)):  # checked before any run begins
            raise self._none_readable()

    def _readable(self, path: Path) -> bool:
        try:
            open_image(path, self.mode)
        except Exception:  # as in __getitem__: any failure to decode
            return False
        return True

    def _none_readable(self) -> UserError:
        return UserError(
            f"None of the {len(self.files)} images can be read (first: {self.files[0]}); check "
            f"the files under --data."
        )

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
        raise self._none_readable()  # all became unreadable while the run went on


def load_photos(mode: str = "RGB") -> list[Image.Image]:
    """The embedded scikit-image photographs as PIL images in mode ("RGB" or "L")."""
    import skimage.data  # slow to import, and only the demo needs it

    photos = []
    for name in EMBEDDED_PHOTOS:
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle returns (left, right, disparity)
            array = array[0]
        photos.append(Image.fromarray(array).convert(mode))
    return photos


class EmbeddedPhotos(Dataset):
    """`length` random crops per epoch of the embedded photos; label = photo index.

    Sample i crops photo i mod P, so every epoch sees every photo equally often.
    """

    def __init__(self, length: int, transform: Callable, mode: str = "RGB"):
        self.photos = load_photos(mode)
        self.length, self.transform = length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        photo = i % len(self.photos)
        return self.transform(self.photos[photo]), photo, False


SourceKind = Literal["demo", "folder", "shards"]


class Source:
    """What a --data string (the value of `flag`) names, and the ways the jobs open it.
    `data_source` picks the kind; nothing is read until a method is called. mode is what the
    images are decoded as, "RGB" or "L"."""

    kind: SourceKind

    def __init__(self, data: str | None, flag: str):
        self.data, self.flag = data, flag

    def unlabelled(self, transform: Callable, mode: str, demo_images: int) -> tuple[Dataset, str]:
        """The pretraining dataset (labels unused) and a line for the log that describes it."""
        raise NotImplementedError

    def fixed_images(self, count: int, mode: str) -> list[Image.Image]:
        """Up to count of its images, the same ones every time."""
        raise NotImplementedError

    def labelled(
        self, transform: Callable, mode: str, num_classes: int | None
    ) -> tuple[Dataset, list[str]]:
        """(dataset, class names); num_classes numbers the classes where no names are given.
        Here: a source without labels (the demo photos) is refused."""
        raise UserError(
            f"{self.flag} names no labelled images; pass a folder with one subfolder of images "
            f"per class, or WebDataset shards with .cls labels."
        )


class DemoSource(Source):
    """No --data: the embedded scikit-image photos."""

    kind = "demo"

    def unlabelled(self, transform: Callable, mode: str, demo_images: int) -> tuple[Dataset, str]:
        dataset = EmbeddedPhotos(demo_images, transform, mode)
        return dataset, (
            f"No --data given: pretraining on the embedded demo set, {demo_images} "
            f"random crops per epoch of {len(dataset.photos)} scikit-image photos."
        )

    def fixed_images(self, count: int, mode: str) -> list[Image.Image]:
        """The first count photos."""
        return load_photos(mode)[:count]


class FolderSource(Source):
    """A folder of images: an ImageFolder tree (one subfolder per class) or a flat folder."""

    kind = "folder"

    def unlabelled(self, transform: Callable, mode: str, demo_images: int) -> tuple[Dataset, str]:
        files, labels, classes = find_images(self.data)
        layout = f"{len(classes)} class folders" if classes else "a flat folder"
        return (
            ImageFiles(files, labels, transform, mode),
            f"Data: {len(files)} images in {self.data} ({layout}; labels unused).",
        )

    def fixed_images(self, count: int, mode: str) -> list[Image.Image]:
        """count images evenly spaced in path order, so that an ImageFolder shows every class."""
        files = find_images(self.data)[0]
        dataset = ImageFiles(files, [0] * len(files), lambda image: image, mode)
        picks = np.linspace(0, len(files) - 1, min(count, len(files))).round().astype(int)
        return [dataset[i][0] for i in picks]

    def labelled(
        self, transform: Callable, mode: str, num_classes: int | None
    ) -> tuple[Dataset, list[str]]:
        """An ImageFolder tree's images and its class folders' names."""
        files, labels, classes = class_folder(self.data, self.flag)
        return ImageFiles(files, labels, transform, mode), classes


class ShardSource(Source):
    """WebDataset tar shards: a .tar file, a brace pattern or URL of them (`fcmae.data.shards`)."""

    kind = "shards"

    def unlabelled(self, transform: Callable, mode: str, demo_images: int) -> tuple[Dataset, str]:
        shards = open_shards(self.data, self.flag, transform, mode)
        return shards, (
            f"Data: {len(shards)} images in {len(shards.shards)} WebDataset shards {self.data} "
            f"(labels unused)."
        )

    def fixed_images(self, count: int, mode: str) -> list[Image.Image]:
        """The first count readable images, without counting the shards."""
        return first_shard_images(self.data, self.flag, count, mode)

    def labelled(
        self, transform: Callable, mode: str, num_classes: int | None
    ) -> tuple[Dataset, list[str]]:
        """Images whose .cls files index the names in the classes.json beside the shards;
        without one, num_classes numbers them."""
        classes = shard_classes(self.data, self.flag)
        if classes is None and num_classes is None:
            raise UserError(
                f"The shards of {self.flag} {self.data} have no classes.json beside them; write "
                f"one (a list of class names in label order), or pass --num-classes."
            )
        classes = classes or [str(i) for i in range(num_classes)]
        return open_shards(self.data, self.flag, transform, mode, classes), classes


def data_source(data: str | None, flag: str = "--data") -> Source:
    """What data, the value of flag, names: nothing (the embedded demo photos), WebDataset tar
    shards (a .tar file, a brace pattern or URL of them) or a folder of images."""
    if data is None:
        return DemoSource(data, flag)
    if data.endswith(SHARD_SUFFIXES):
        return ShardSource(data, flag)
    return FolderSource(data, flag)


def pretrain_dataset(
    data: str | None, input_size: int, in_chans: int, demo_images: int
) -> tuple[Dataset, str]:
    """The pretraining dataset and a one-line description of it for the log."""
    transform = pretrain_transform(input_size, in_chans)
    return data_source(data).unlabelled(transform, decode_mode(in_chans), demo_images)


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
    photos = data_source(data).fixed_images(count, decode_mode(in_chans))
    return torch.stack([transform(photo) for photo in photos])
