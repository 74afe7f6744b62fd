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
through the `Source` it returns. Files are decoded as `fcmae.data.images.Decoding` says
(photographs, or float arrays of any channel count); `settle_stats` settles a run's
--pixel-stats request on a sample of the source.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from fcmae.data.folders import class_folder, find_images
from fcmae.data.images import Decoded, Decoding, PixelError, read_float
from fcmae.data.samples import Batch as Batch
from fcmae.data.samples import EpochDataset as EpochDataset
from fcmae.data.samples import collate as collate
from fcmae.data.shards import SHARD_SUFFIXES, open_shards, shard_classes, shard_images
from fcmae.data.stats import LEGACY, SAMPLE, PixelStats, measure, parse_stats
from fcmae.data.transforms import fixed_transform
from fcmae.errors import UserError
from fcmae.train.distributed import broadcast_object

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


def none_readable(files: list[Path]) -> UserError:
    return UserError(
        f"None of the {len(files)} images can be read (first: {files[0]}); check the files "
        f"under --data."
    )


class ImageFiles(Dataset):
    """Image files with labels, decoded as decoding says; an unreadable or truncated file is
    skipped, never a crash (a file the run cannot use, `PixelError`, stops it).

    When file i cannot be decoded, the next files are tried in turn, so batches stay full (all
    ranks of a DDP run take the same number of steps), and the sample says that its own file
    was skipped: each unreadable file counts once, on its own turn.
    """

    def __init__(
        self, files: list[Path], labels: list[int], transform: Callable, decoding: Decoding
    ):
        self.files, self.labels, self.transform = files, labels, transform
        self.decoding = decoding
        if files and not any(map(self._readable, files)):  # checked before any run begins
            raise none_readable(files)

    def _readable(self, path: Path) -> bool:
        try:
            self.decoding(path)
        except PixelError:
            raise
        except Exception:  # as in __getitem__: any failure to decode
            return False
        return True

    def __len__(self) -> int:
        return len(self.files)

    def decoded(self, i: int, warn: bool = True) -> tuple[Decoded, int, bool]:
        """(image i decoded, its label, skipped): the next readable file's when it cannot be
        read (said in the log when warn)."""
        for offset in range(len(self.files)):
            j = (i + offset) % len(self.files)
            try:
                image = self.decoding(self.files[j])
            except PixelError:
                raise
            # PIL signals broken files with OSError, SyntaxError, ValueError, its own
            # DecompressionBombError...: any failure to decode means "skip this file".
            except Exception as e:
                if offset == 0 and warn:  # said once, on the file's own turn
                    log.warning(
                        "Skipping unreadable image %s (%s: %s)", self.files[j], type(e).__name__, e
                    )
                continue
            return image, self.labels[j], offset > 0
        raise none_readable(self.files)  # all became unreadable while the run went on

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        image, label, skipped = self.decoded(i)
        return self.transform(image), label, skipped


def load_photos(decoding: Decoding) -> list[Decoded]:
    """The embedded scikit-image photographs, decoded as photographs of decoding's mode."""
    import skimage.data  # slow to import, and only the demo needs it

    if decoding.photo is None:
        raise UserError(
            f"The embedded demo photos have 3 channels, not --in-chans {decoding.in_chans}; "
            f"pass --data with {decoding.in_chans}-channel images."
        )
    photos = []
    for name in EMBEDDED_PHOTOS:
        array = getattr(skimage.data, name)()
        if isinstance(array, tuple):  # stereo_motorcycle returns (left, right, disparity)
            array = array[0]
        photos.append(decoding.photograph(array))
    return photos


class EmbeddedPhotos(Dataset):
    """`length` random crops per epoch of the embedded photos; label = photo index.

    Sample i crops photo i mod P, so every epoch sees every photo equally often.
    """

    def __init__(self, length: int, transform: Callable, decoding: Decoding):
        self.photos = load_photos(decoding)
        self.length, self.transform = length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        photo = i % len(self.photos)
        return self.transform(self.photos[photo]), photo, False


SourceKind = Literal["demo", "folder", "shards"]


class Source:
    """What a --data string (the value of `flag`) names, and the ways the jobs open it.
    `data_source` picks the kind; nothing is read until a method is called. decoding says
    how its files become images (fcmae.data.images.Decoding)."""

    kind: SourceKind

    def __init__(self, data: str | None, flag: str):
        self.data, self.flag = data, flag

    def unlabelled(
        self, transform: Callable, decoding: Decoding, demo_images: int
    ) -> tuple[Dataset, str]:
        """The pretraining dataset (labels unused) and a line for the log that describes it."""
        raise NotImplementedError

    def fixed_images(self, count: int, decoding: Decoding) -> list[Decoded]:
        """Up to count of its images, the same ones every time."""
        raise NotImplementedError

    def sample(self, count: int, seed: int, decoding: Decoding) -> Iterator[Decoded]:
        """Up to count of its readable images, drawn with seed, decoded one at a time (a
        sample for statistics need not fit in memory at once)."""
        raise NotImplementedError

    def labelled(
        self, transform: Callable, decoding: Decoding, num_classes: int | None
    ) -> tuple[Dataset, list[str]]:
        """(dataset, class names); num_classes numbers the classes where no names are given.
        Here: a source without labels (the demo photos) is refused."""
        raise UserError(
            f"{self.flag} names no labelled images; pass a folder with one subfolder of images "
            f"per class, or WebDataset shards with .cls labels."
        )

    def describe(self) -> str:
        return f"{self.flag} {self.data}" if self.data else "the embedded demo photos"


class DemoSource(Source):
    """No --data: the embedded scikit-image photos."""

    kind = "demo"

    def unlabelled(
        self, transform: Callable, decoding: Decoding, demo_images: int
    ) -> tuple[Dataset, str]:
        dataset = EmbeddedPhotos(demo_images, transform, decoding)
        return dataset, (
            f"No --data given: pretraining on the embedded demo set, {demo_images} "
            f"random crops per epoch of {len(dataset.photos)} scikit-image photos."
        )

    def fixed_images(self, count: int, decoding: Decoding) -> list[Decoded]:
        """The first count photos."""
        return load_photos(decoding)[:count]

    def sample(self, count: int, seed: int, decoding: Decoding) -> Iterator[Decoded]:
        return iter(load_photos(decoding)[:count])


class FolderSource(Source):
    """A folder of images: an ImageFolder tree (one subfolder per class) or a flat folder."""

    kind = "folder"

    @functools.cached_property
    def found(self) -> tuple[list[Path], list[int], list[str]]:
        """find_images of the folder, searched once however many ways the job opens it."""
        return find_images(self.data)

    def unlabelled(
        self, transform: Callable, decoding: Decoding, demo_images: int
    ) -> tuple[Dataset, str]:
        files, labels, classes = self.found
        layout = f"{len(classes)} class folders" if classes else "a flat folder"
        return (
            ImageFiles(files, labels, transform, decoding),
            f"Data: {len(files)} images in {self.data} ({layout}; labels unused).",
        )

    def fixed_images(self, count: int, decoding: Decoding) -> list[Decoded]:
        """count images evenly spaced in path order, so that an ImageFolder shows every class
        (an unreadable one: the next readable; training says which files it skips)."""
        files = self.found[0]
        dataset = ImageFiles(files, [0] * len(files), lambda image: image, decoding)
        picks = np.linspace(0, len(files) - 1, min(count, len(files))).round()
        return [dataset.decoded(int(i), warn=False)[0] for i in picks]

    def sample(self, count: int, seed: int, decoding: Decoding) -> Iterator[Decoded]:
        """count of its readable files in an order drawn with seed (unreadable ones left out:
        training skips them, and says so); UserError when none can be read."""
        files, read = self.found[0], 0
        for i in np.random.default_rng(seed).permutation(len(files)):
            try:
                image = decoding(files[i])
            except PixelError:
                raise
            except Exception:
                continue
            yield image
            read += 1
            if read == count:
                return
        if not read:
            raise none_readable(files)

    def labelled(
        self, transform: Callable, decoding: Decoding, num_classes: int | None
    ) -> tuple[Dataset, list[str]]:
        """An ImageFolder tree's images and its class folders' names."""
        files, labels, classes = class_folder(self.data, self.flag)
        return ImageFiles(files, labels, transform, decoding), classes


class ShardSource(Source):
    """WebDataset tar shards: a .tar file, a brace pattern or URL of them (`fcmae.data.shards`)."""

    kind = "shards"

    def unlabelled(
        self, transform: Callable, decoding: Decoding, demo_images: int
    ) -> tuple[Dataset, str]:
        shards = open_shards(self.data, self.flag, transform, decoding)
        return shards, (
            f"Data: {len(shards)} images in {len(shards.shards)} WebDataset shards {self.data} "
            f"(labels unused)."
        )

    def fixed_images(self, count: int, decoding: Decoding) -> list[Decoded]:
        """The first count readable images, without counting the shards."""
        return list(itertools.islice(shard_images(self.data, self.flag, decoding), count))

    def sample(self, count: int, seed: int, decoding: Decoding) -> Iterator[Decoded]:
        """The first count readable images of the shards in an order drawn from seed."""
        return itertools.islice(shard_images(self.data, self.flag, decoding, seed), count)

    def labelled(
        self, transform: Callable, decoding: Decoding, num_classes: int | None
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
        return open_shards(self.data, self.flag, transform, decoding, classes), classes


def data_source(data: str | None, flag: str = "--data") -> Source:
    """What data, the value of flag, names: nothing (the embedded demo photos), WebDataset tar
    shards (a .tar file, a brace pattern or URL of them) or a folder of images."""
    if data is None:
        return DemoSource(data, flag)
    if data.endswith(SHARD_SUFFIXES):
        return ShardSource(data, flag)
    return FolderSource(data, flag)


def settle_stats(
    cfg: Any, source: Source, decoding: Decoding, recorded: dict[str, Any] | None, main: bool
) -> None:
    """Settle cfg.pixel_stats when it is a request (auto, data) into what the run records:
    the run's own value when it continues (recorded: its checkpoint's settings), "imagenet"
    for auto on 3-channel photographs, else the statistics of a seeded sample of source
    (read by the main process, main, and shared with the others)."""
    if parse_stats(cfg.pixel_stats, cfg.in_chans) is not None:
        log.info("Pixel statistics as given: %s.", cfg.pixel_stats)
        return
    accepted = "pixel_stats" in getattr(cfg, "accepted_changes", tuple)()
    if recorded is not None and not (cfg.pixel_stats == "data" and accepted):
        cfg.pixel_stats = str(recorded.get("pixel_stats", LEGACY))
        said = "recorded them" if "pixel_stats" in recorded else "was trained (before the option)"
        log.info("Pixel statistics as the run %s: %s.", said, cfg.pixel_stats)
        return
    if cfg.pixel_stats == "auto" and cfg.in_chans == 3:
        first = next(source.sample(1, getattr(cfg, "seed", 0), decoding), None)
        if first is not None and not isinstance(first, np.ndarray):
            cfg.pixel_stats = "imagenet"
            log.info("Pixel statistics: ImageNet's (3-channel 8-bit images).")
            return
    stats = None
    if main:
        images = source.sample(SAMPLE, getattr(cfg, "seed", 0), decoding)
        stats, read = measure(map(read_float, images), SAMPLE, source.describe())
        log.info(
            "Pixel statistics of %s (%d images): mean %s, std %s.",
            source.describe(),
            read,
            ", ".join(f"{v:.4g}" for v in stats.mean),
            ", ".join(f"{v:.4g}" for v in stats.std),
        )
    cfg.pixel_stats = str(broadcast_object(stats))


def run_stats(cfg: Any) -> PixelStats:
    """The statistics of a run whose pixel_stats is settled."""
    return parse_stats(cfg.pixel_stats, cfg.in_chans)


def fixed_images(
    source: Source, input_size: int, decoding: Decoding, stats: PixelStats, count: int
) -> torch.Tensor:
    """``count`` images of the source, evenly spaced in path order so that an ImageFolder shows
    every class (the first ones of shards; the embedded photos without --data), resized and
    centre-cropped to input_size and normalised: (count, C, s, s). The same images every time,
    for pictures that compare epochs or checkpoints."""
    transform = fixed_transform(input_size, stats)
    return torch.stack([transform(image) for image in source.fixed_images(count, decoding)])
