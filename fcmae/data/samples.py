"""What a dataset hands the runtime: samples, the Batch they are collated into, and the
`EpochDataset` that cuts its own part of each epoch. `fcmae.data.sources` describes the contract.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

import torch
from torch.utils.data import IterableDataset


class Batch(NamedTuple):
    """A collated batch: images (N, C, H, W), labels (N,), and skipped (N,) bool: the sample's
    own file was unreadable and the next readable one stands in for it."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: torch.Tensor


def collate(samples: list[tuple[torch.Tensor, int, bool]]) -> Batch:
    """Stack (image (C, H, W), label, skipped) samples into a Batch."""
    images, labels, skipped = zip(*samples)
    return Batch(torch.stack(images), torch.tensor(labels), torch.tensor(skipped, dtype=bool))


@dataclass(frozen=True)
class EpochPart:
    """Which part of an epoch one process reads: see EpochDataset.for_epoch."""

    epoch: int = 0
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    shuffle: bool = False
    batch_size: int = 1
    drop_last: bool = False


_View = TypeVar("_View", bound="EpochDataset")


class EpochDataset(IterableDataset):
    """A dataset that streams (WebDataset shards): each epoch, each process and each loader
    worker read their own part, which ``for_epoch`` cuts (the runtime's loader calls it).
    A subclass reads its part from ``self.part``; until for_epoch, that is the whole set, in
    order, and ``len`` is the samples of the part."""

    part = EpochPart()

    def for_epoch(
        self: _View,
        epoch: int,
        rank: int,
        world_size: int,
        *,
        seed: int,
        shuffle: bool,
        batch_size: int,
        drop_last: bool,
    ) -> _View:
        """This dataset as process ``rank`` of ``world_size`` reads it in ``epoch``, in batches
        of batch_size (shuffled with seed, or in order): what a DataLoader over it yields."""
        view = copy.copy(self)
        view.part = EpochPart(epoch, rank, world_size, seed, shuffle, batch_size, drop_last)
        return view
