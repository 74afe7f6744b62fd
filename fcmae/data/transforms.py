"""The pretraining transforms and the fixed view of images for pictures, on both kinds of
decoded image (fcmae.data.images): photographs (PIL) and float arrays (C, H, W) of any channel
count. The same torchvision transforms take either; photographs keep their PIL path, so an
8-bit RGB dataset is transformed exactly as before arrays existed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from fcmae.data.stats import PixelStats

BICUBIC = T.InterpolationMode.BICUBIC


class FromArray:
    """A float array (C, H, W) -> a tensor, before the geometric transforms; a photograph
    passes as it is."""

    def __call__(self, image: Image.Image | np.ndarray) -> Image.Image | torch.Tensor:
        return torch.from_numpy(image) if isinstance(image, np.ndarray) else image


class ToFloat:
    """A photograph -> a float tensor in [0, 1] (torchvision's to_tensor); a tensor passes."""

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        return TF.to_tensor(image) if isinstance(image, Image.Image) else image


def normalize(stats: PixelStats) -> T.Normalize:
    return T.Normalize(stats.mean, stats.std)


def pretrain_transform(input_size: int, stats: PixelStats) -> Callable:
    """The FCMAE recipe: RandomResizedCrop (scale 0.2-1, bicubic), flip, normalise ->
    (C, s, s)."""
    return T.Compose(
        [
            FromArray(),
            T.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=BICUBIC),
            T.RandomHorizontalFlip(),
            ToFloat(),
            normalize(stats),
        ]
    )


def fixed_transform(input_size: int, stats: PixelStats) -> Callable:
    """Resize the shorter side to input_size (bicubic), centre crop, normalise: the same view
    of an image every time."""
    return T.Compose(
        [
            FromArray(),
            T.Resize(input_size, interpolation=BICUBIC),
            T.CenterCrop(input_size),
            ToFloat(),
            normalize(stats),
        ]
    )
