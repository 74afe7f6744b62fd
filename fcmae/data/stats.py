"""The per-channel statistics images are normalised with (--pixel-stats): ImageNet's, the
user's numbers, or the data's own, measured once per run on a seeded sample. Torch-free.

A run records the statistics it trained with as the value of its ``pixel_stats`` setting:
"imagenet", or "MEAN1,...:STD1,..." (each number as Python writes it, so it reads back
exactly); "auto" and "data" are requests that a run settles before it trains
(fcmae.data.sources.settle_stats).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fcmae.errors import ConfigError, UserError, cut

log = logging.getLogger("fcmae")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REQUESTS = ("auto", "data")  # settled per run into "imagenet" or numbers
LEGACY = "imagenet"  # what every run did before --pixel-stats existed
SAMPLE = 2000  # images --pixel-stats data reads at most
# Images are normalised in float32: beyond these sizes normalised pixels overflow the network.
LOW, HIGH = 1e-12, 1e12
HELP = (
    "per-channel statistics the images are normalised with: imagenet, data (measured on a "
    f"seeded sample of at most {SAMPLE} training images), or MEAN1,...:STD1,... (one of each "
    "per channel, pixels scaled as the README says); auto: imagenet for 3-channel 8-bit "
    "images, data otherwise"
)


@dataclass(frozen=True)
class PixelStats:
    """Mean and standard deviation of each input channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __str__(self) -> str:
        """As a run records it: "MEAN1,...:STD1,..."."""
        return f"{','.join(map(repr, self.mean))}:{','.join(map(repr, self.std))}"


def imagenet(in_chans: int) -> PixelStats:
    """ImageNet's statistics; for one channel, the mean of its three channels'."""
    if in_chans == 3:
        return PixelStats(IMAGENET_MEAN, IMAGENET_STD)
    return PixelStats((sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,))


def parse_stats(text: str, in_chans: int) -> PixelStats | None:
    """The statistics text names for in_chans channels; None for a request (auto, data).
    ConfigError naming --pixel-stats for anything else."""
    if text in REQUESTS:
        return None
    if text == "imagenet":
        if in_chans not in (1, 3):
            raise ConfigError(
                f"--pixel-stats imagenet holds statistics of 3 (or 1) channels, not of "
                f"--in-chans {in_chans}; pass --pixel-stats data or MEAN1,...:STD1,...."
            )
        return imagenet(in_chans)
    mean, colon, std = text.partition(":")
    try:
        values = [tuple(float(v) for v in part.split(",")) for part in (mean, std)]
    except ValueError:
        values = []
    if not colon or not values:
        raise ConfigError(
            f"--pixel-stats must be auto, imagenet, data or MEAN1,...:STD1,... (numbers), got "
            f"{cut(text, 60)!r}."
        )
    for what, numbers in zip(("means", "standard deviations"), values):
        if len(numbers) != in_chans:
            raise ConfigError(
                f"--pixel-stats gives {len(numbers)} {what} for --in-chans {in_chans}; give one "
                f"per channel."
            )
    stats = PixelStats(*values)
    check_std(stats, "--pixel-stats")
    if not all(abs(v) <= HIGH for v in stats.mean):
        raise ConfigError(
            f"--pixel-stats means must lie within +-{HIGH:g} (larger ones overflow the network "
            f"in float32), got {cut(mean, 60)}."
        )
    return stats


def check_std(stats: PixelStats, where: str) -> None:
    """Refuse a channel whose standard deviation is not a positive number: normalising would
    divide by it."""
    for channel, std in enumerate(stats.std, 1):
        if not LOW <= std <= HIGH:  # false for nan too
            raise ConfigError(
                f"Channel {channel} has standard deviation {std!r} in {where}, so it cannot be "
                f"normalised in float32; drop that channel from the images, or pass "
                f"--pixel-stats MEAN1,...:STD1,... with a std between {LOW:g} and {HIGH:g} "
                f"for it."
            )


class Moments:
    """Per-channel mean and variance of the pixels of many images, in float64 (images of
    different sizes count by their pixels; images combined as Chan et al. combine groups)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, None, None

    def add(self, image: np.ndarray) -> None:
        """One image (C, H, W)."""
        pixels = image.reshape(image.shape[0], -1).astype(np.float64)
        n, mean = pixels.shape[1], pixels.mean(axis=1)
        m2 = ((pixels - mean[:, None]) ** 2).sum(axis=1)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
        self.count = total

    def stats(self) -> PixelStats:
        std = np.sqrt(self.m2 / self.count)
        return PixelStats(tuple(map(float, self.mean)), tuple(map(float, std)))


def measure(images: Iterable[np.ndarray], most: int, where: str) -> tuple[PixelStats, int]:
    """(the statistics of images (float (C, H, W), at most most of them), how many were read),
    with progress in the log; ConfigError for a channel that does not vary."""
    moments, shown, done = Moments(), 0, 0
    for done, image in enumerate(images, 1):
        moments.add(image)
        if done * 10 // most > shown:
            shown = done * 10 // most
            log.info("Pixel statistics of %s: %d of at most %d images read.", where, done, most)
    if moments.mean is None:
        raise UserError(f"None of the images of {where} can be read; check them.")
    stats = moments.stats()
    check_std(stats, f"the images of {where}")
    return stats, done
