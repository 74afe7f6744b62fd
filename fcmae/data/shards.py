"""WebDataset tar shards as a dataset: `--data` given as a .tar file, a brace pattern such as
``train-{000000..000127}.tar``, or any URL webdataset's gopen reads (http(s), ``pipe:``, gs...).

A shard's sample is the files that share a key (``000123.jpg`` with ``000123.cls``, the class
index as text); beside the shards, ``classes.json`` may list the class names and ``sizes.json``
each shard's sample count (``scripts/folder_to_shards.py`` writes both). Samples are those of
`fcmae.data.samples`: (image, label, skipped); `fcmae.data.sources.data_source` tells shards
from folders.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from torch.utils.data import get_worker_info

from fcmae.data.images import IMAGE_EXTENSIONS, Decoding, PixelError
from fcmae.data.samples import EpochDataset
from fcmae.errors import UserError

log = logging.getLogger("fcmae")

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")  # a --data ending so names shards, not a folder
CLASSES_FILE = "classes.json"  # beside the shards: the class names, in label order
SIZES_FILE = "sizes.json"  # beside the shards: {shard file name: samples}, spares the count
SHUFFLE_BUFFER = 512  # encoded samples a loader worker mixes before decoding


def _local_path(url: str) -> Path | None:
    """The file a local shard URL (a path, or file:) names; None for other URLs."""
    scheme = urlparse(url).scheme
    if scheme == "file":
        return Path(url2pathname(urlparse(url).path))
    return Path(url) if scheme == "" else None


def _beside(url: str, name: str) -> str:
    """The URL of file name in the folder of a shard's URL: its last path component replaced."""
    head, slash, _ = url.rpartition("/")
    return f"{head}{slash}{name}"


def _split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a file in a shard, as webdataset groups them: the key is the path up
    to the first dot of the file name, the extension the rest, lowercased."""
    folder, slash, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}{slash}{stem}", extension.lower()) if stem and dot else None


def _image_extension(files: dict[str, bytes | None]) -> str | None:
    return next((e for e in IMAGE_EXTENSIONS if e[1:] in files), None)


@contextlib.contextmanager
def _open_tar(url: str) -> Iterator[tarfile.TarFile]:
    """A shard opened with webdataset's gopen: local files with random access (unread members
    are seeked over), other URLs as a stream."""
    import webdataset

    with webdataset.gopen(url) as stream:
        seekable = callable(getattr(stream, "seekable", None)) and stream.seekable()
        with tarfile.open(fileobj=stream, mode="r:*" if seekable else "r|*") as tar:
            yield tar


def _tar_samples(
    url: str, read: Callable[[int], bool] = lambda index: True
) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {extension: bytes}) of each sample of a shard that holds an image, in order; the
    files of sample i are read only when read(i), else their bytes are None."""
    with _open_tar(url) as tar:
        key, files, index = None, {}, 0
        for member in tar:
            name = _split_name(member.name) if member.isfile() else None
            if name is None:
                continue
            if name[0] != key:
                if _image_extension(files):
                    yield key, files
                    index += 1
                key, files = name[0], {}
            files[name[1]] = tar.extractfile(member).read() if read(index) else None
        if _image_extension(files):
            yield key, files


@contextlib.contextmanager
def _reading(url: str, flag: str) -> Iterator[None]:
    """Turn a shard that cannot be read into a UserError naming it and flag."""
    try:
        yield
    except FileNotFoundError:
        raise UserError(f"Shard {url} (from {flag}) does not exist; check the pattern.") from None
    except tarfile.TarError as e:
        raise UserError(
            f"Shard {url} (from {flag}) is not a readable tar file ({e}); pass WebDataset .tar "
            f"shards (scripts/folder_to_shards.py writes them)."
        ) from None
    except (OSError, ValueError) as e:  # gopen's transfers: curl, gsutil, pipe: commands
        raise UserError(
            f"Cannot read shard {url} (from {flag}; {type(e).__name__}: {e}); check the URL and "
            f"that the tool which fetches it works."
        ) from None


def shard_urls(source: str, flag: str) -> list[str]:
    """The shards a pattern names (brace-expanded as webdataset does); local ones must exist."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(source)
    missing = [u for u in urls if _local_path(u) and not _local_path(u).is_file()]
    if len(missing) == len(urls):
        raise UserError(
            f"No shard matches {flag} {source} ({missing[0]} does not exist); check the pattern."
        )
    if missing:
        raise UserError(
            f"{len(missing)} of the {len(urls)} shards of {flag} {source} do not exist (first: "
            f"{missing[0]}); check the pattern's range."
        )
    return urls


def _read_beside(url: str, name: str) -> object | None:
    """The JSON file name beside a shard, or None where there is none (or the shard comes from
    a ``pipe:`` command, from which no other file's command can be told)."""
    import webdataset

    where = _beside(url, name)
    if url.startswith("pipe:") or (_local_path(where) and not _local_path(where).is_file()):
        return None
    try:
        with webdataset.gopen(where) as stream:
            return json.load(stream)
    except (OSError, ValueError):  # not there, or not JSON
        return None


def shard_classes(source: str, flag: str) -> list[str] | None:
    """The class names in the classes.json beside a pattern's shards, or None."""
    url = shard_urls(source, flag)[0]
    names = _read_beside(url, CLASSES_FILE)
    if names is not None and not (
        isinstance(names, list) and names and all(isinstance(n, str) for n in names)
    ):
        raise UserError(
            f"{_beside(url, CLASSES_FILE)} must hold a list of class names; write it as "
            f"scripts/folder_to_shards.py does."
        )
    return names


@dataclass(frozen=True)
class Shard:
    """One tar shard: where it is and how many images it holds."""

    url: str
    samples: int


def _count(url: str, flag: str, labelled: bool) -> int:
    """Images in a shard, read from its member headers; refuses a shard without images, or a
    labelled one with images that have no .cls."""
    with _reading(url, flag):
        samples = [files for _, files in _tar_samples(url, read=lambda index: False)]
    if not samples:
        raise UserError(
            f"Shard {url} (from {flag}) holds no images ({', '.join(IMAGE_EXTENSIONS)} files "
            f"grouped by key, e.g. 000123.jpg); write shards with scripts/folder_to_shards.py "
            f"or leave this one out of the pattern."
        )
    unlabelled = sum("cls" not in files for files in samples)
    if labelled and unlabelled:
        raise UserError(
            f"{unlabelled} of the {len(samples)} images of shard {url} (from {flag}) have no "
            f".cls label; give each image a KEY.cls holding its class index."
        )
    return len(samples)


class Shards(EpochDataset):
    """Images from WebDataset tar shards; labels from each sample's .cls when classes are
    given, else -1.

    Every process reads its own part of an epoch (see for_epoch): the shards, in an order drawn
    from (seed, epoch), are laid end to end and cut into one contiguous range of samples per
    rank (equal lengths, whole batches with drop_last, so every rank takes the same steps), and
    that range into one per loader worker (whole batches). Every sample is read once per epoch
    by one worker of one rank; with drop_last, fewer than world_size x batch_size are left out.
    A worker mixes its samples in a shuffle buffer. An unreadable image is skipped as
    ImageFiles skips it: a readable one of the same worker stands in, marked skipped.
    """

    def __init__(
        self,
        shards: list[Shard],
        transform: Callable,
        decoding: Decoding,
        classes: list[str] | None = None,
        flag: str = "--data",
    ):
        self.shards, self.transform, self.classes, self.flag = shards, transform, classes, flag
        self.decoding = decoding

    def __len__(self) -> int:
        """Samples this part reads."""
        start, end = self._rank_range()
        return end - start

    def _rank_range(self) -> tuple[int, int]:
        part, total = self.part, sum(s.samples for s in self.shards)
        if part.drop_last:
            each = total // part.world_size // part.batch_size * part.batch_size
            return part.rank * each, (part.rank + 1) * each
        return part.rank * total // part.world_size, (part.rank + 1) * total // part.world_size

    def _worker_range(self, worker: int, workers: int) -> tuple[int, int]:
        start, end = self._rank_range()
        size = self.part.batch_size
        batches = -(-(end - start) // size)
        first, last = worker * batches // workers, (worker + 1) * batches // workers
        return start + first * size, min(start + last * size, end)

    def _epoch_order(self) -> list[Shard]:
        if not self.part.shuffle:
            return self.shards
        rng = np.random.default_rng([self.part.seed, self.part.epoch])
        return [self.shards[i] for i in rng.permutation(len(self.shards))]

    def _encoded(self, start: int, end: int) -> Iterator[tuple[str, str, bytes, int]]:
        """(image file name, shard URL, image bytes, label) of samples start..end-1 of the
        epoch's order."""
        offset = 0
        for shard in self._epoch_order():
            skip, stop = max(start - offset, 0), min(end - offset, shard.samples)
            if skip < stop:
                yield from self._read(shard, skip, stop)
            offset += shard.samples
            if offset >= end:
                return

    def _read(self, shard: Shard, skip: int, stop: int) -> Iterator[tuple[str, str, bytes, int]]:
        """Samples skip..stop-1 of a shard; the samples before skip are passed over unread."""
        seen = 0
        samples = _tar_samples(shard.url, read=lambda index: index >= skip)
        with _reading(shard.url, self.flag), contextlib.closing(samples):
            for key, files in itertools.islice(samples, skip, stop):
                seen += 1
                extension = _image_extension(files)
                label = self._label(key, shard, files)
                yield key + extension, shard.url, files[extension[1:]], label
        if seen < stop - skip:
            raise UserError(
                f"Shard {shard.url} holds {skip + seen} images, not the {shard.samples} its "
                f"{SIZES_FILE} gives; correct or delete that file."
            )

    def _label(self, key: str, shard: Shard, files: dict[str, bytes | None]) -> int:
        if self.classes is None:
            return -1
        try:
            label = int(files["cls"])
        except (KeyError, ValueError):
            label = -1
        if not 0 <= label < len(self.classes):
            raise UserError(
                f"Sample {key} of shard {shard.url} has label {files.get('cls')!r}, not a class "
                f"index below {len(self.classes)}; write KEY.cls as the index into the class list."
            )
        return label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, bool]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        samples = self._encoded(*self._worker_range(worker, workers))
        if self.part.shuffle:
            part = self.part
            rng = np.random.default_rng([part.seed, part.epoch, part.rank, worker])
            samples = _shuffled(samples, SHUFFLE_BUFFER, rng)
        return self._decoded(samples)

    def _decoded(
        self, samples: Iterator[tuple[str, str, bytes, int]]
    ) -> Iterator[tuple[torch.Tensor, int, bool]]:
        """Decoded, transformed samples; an unreadable image is replaced by the last readable
        one (or, before there is one, the next), marked skipped."""
        last, waiting = None, 0
        for name, url, data, label in samples:
            try:
                image = self.decoding(io.BytesIO(data), f"{url}:{name}")
            except PixelError:
                raise
            except Exception as e:  # as in ImageFiles: any failure to decode means "skip it"
                log.warning(
                    "Skipping unreadable image %s of %s (%s: %s)", name, url, type(e).__name__, e
                )
                if last is None:
                    waiting += 1
                else:
                    yield self.transform(last[0]), last[1], True
                continue
            for _ in range(waiting):
                yield self.transform(image), label, True
            last, waiting = (image, label), 0
            yield self.transform(image), label, False
        if waiting:
            raise UserError(
                f"None of the {waiting} images one loader worker read from the shards can be "
                f"read; check the shards."
            )


def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """items in a random order that looks at most size items ahead (a shuffle buffer)."""
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.integers(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def open_shards(
    source: str,
    flag: str,
    transform: Callable,
    decoding: Decoding,
    classes: list[str] | None = None,
) -> Shards:
    """The Shards a pattern names, each one's images counted once from the tar headers (or taken
    from the sizes.json beside them); with classes, every image must have a .cls label. Bad
    shards are refused here, before a run starts."""
    urls = shard_urls(source, flag)
    sizes = _read_beside(urls[0], SIZES_FILE)
    sizes = sizes if isinstance(sizes, dict) else {}

    def known(url: str) -> int | None:
        size = sizes.get(url.rpartition("/")[2])
        return size if isinstance(size, int) and size > 0 else None

    with ThreadPoolExecutor(min(8, len(urls))) as pool:  # reading headers waits on I/O
        counts = list(pool.map(lambda u: known(u) or _count(u, flag, bool(classes)), urls))
    return Shards([Shard(u, n) for u, n in zip(urls, counts)], transform, decoding, classes, flag)


def shard_images(source: str, flag: str, decoding: Decoding, seed: int | None = None) -> Iterator:
    """The readable images of a pattern's shards, decoded one at a time, without counting them:
    in order, or (with seed) of the shards in an order drawn from seed. UserError when none of
    them can be read."""
    found = False
    urls = shard_urls(source, flag)
    if seed is not None:
        urls = [urls[i] for i in np.random.default_rng(seed).permutation(len(urls))]
    for url in urls:
        with _reading(url, flag), contextlib.closing(_tar_samples(url)) as samples:
            for key, files in samples:
                extension = _image_extension(files)
                data = io.BytesIO(files[extension[1:]])
                try:
                    image = decoding(data, f"{url}:{key}{extension}")
                except PixelError:
                    raise
                except Exception:  # unreadable: take the next one
                    continue
                found = True
                yield image
    if not found:
        raise UserError(f"None of the images of {flag} {source} can be read; check the shards.")
