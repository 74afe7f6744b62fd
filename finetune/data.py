"""Labelled image folders or WebDataset shards, and the fine-tuning recipe's transforms (timm's).

Samples are fcmae.data.sources's `(image (C, H, W), label, skipped)`, batched by
`fcmae.data.sources.collate`. Photographs are decoded as RGB so that timm's RGB
augmentations apply; with in_chans 1 they are first reduced to luminance (three equal
channels), normalised with the run's one-channel statistics, and one channel is kept, so a
fine-tuned model sees the same numbers its pretraining saw. Other images (arrays of any channel
count) take the same geometry, normalisation and erasing, without RandAugment.
Folders and shards are told apart, and opened, by `fcmae.data.sources.data_source`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.random_erasing import RandomErasing
from torch.utils.data import Dataset
from torchvision import transforms as T

from fcmae.data.folders import class_folder
from fcmae.data.images import Decoding
from fcmae.data.sources import data_source, run_stats, settle_stats
from fcmae.data.stats import PixelStats
from fcmae.data.transforms import BICUBIC, FromArray, normalize
from fcmae.errors import UserError
from fcmae.run.run import Settle
from fcmae.weights.layouts import Weights, check_fits, read_weights

log = logging.getLogger("fcmae")


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, where keeping 0 bits gives the black image that older Pillow gave."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _with_safe_posterize(transform: T.Compose) -> T.Compose:
    """RandAugment rand-m9-mstd0.5 draws magnitude 10 (clipped) about 2% of the time, which asks
    posterize to keep 0 bits: Pillow 13 raises there, which would stop a run mid-epoch. Swap
    the op's function in this transform's own RandAugment; timm's tables stay as they are."""
    for t in transform.transforms:
        if isinstance(t, auto_augment.RandAugment):
            for op in t.ops:
                if op.aug_fn is auto_augment.posterize:
                    op.aug_fn = _posterize
    return transform


def labelled_decoding(in_chans: int) -> Decoding:
    """Photographs decoded as RGB for timm's RGB augmentations (see the module), other images
    as arrays of in_chans channels."""
    return Decoding(in_chans, "RGB" if in_chans in (1, 3) else None)


def _rgb_stats(stats: PixelStats) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for the three RGB channels of a decoded photograph: one channel's on each
    of the three equal channels of a grey model's photograph."""
    if len(stats.mean) == 1:
        return stats.mean * 3, stats.std * 3
    return stats.mean, stats.std


class FirstChannel:
    """(3, H, W) -> (1, H, W): a grayscale image decoded as RGB has three equal channels."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1]


class ByKind:
    """One transform for both kinds of decoded image: photographs through timm's RGB
    transform, arrays (C, H, W) through the channel-agnostic one."""

    def __init__(self, photo: Callable, array: Callable):
        self.photo, self.array = photo, array

    def __call__(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        return self.photo(image) if isinstance(image, Image.Image) else self.array(image)


def _channels(transform: Callable, in_chans: int) -> Callable:
    # Luminance first (PIL "L", as pretraining decodes grayscale), replicated to three
    # equal channels for timm's RGB augmentations; one is kept at the end.
    return T.Compose([T.Grayscale(3), transform, FirstChannel()]) if in_chans == 1 else transform


def train_transform(
    input_size: int,
    in_chans: int,
    stats: PixelStats,
    auto_augment: str | None = None,
    reprob: float = 0.0,
) -> Callable:
    """-> (in_chans, s, s): RandomResizedCrop (bicubic), flip, RandAugment, normalise, random
    erasing (per-pixel noise) as timm builds them for photographs; arrays get the same but
    RandAugment, whose operations are defined on RGB (the README says so). Without
    auto_augment and reprob it is the linear probe's crop and flip alone."""
    mean, std = _rgb_stats(stats)
    photo = create_transform(
        input_size,
        is_training=True,
        auto_augment=auto_augment,
        color_jitter=None,
        interpolation="bicubic",
        re_prob=reprob,
        re_mode="pixel",
        re_count=1,
        mean=mean,
        std=std,
    )
    array = [
        FromArray(),
        T.RandomResizedCrop(input_size, interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
        normalize(stats),
    ]
    if reprob > 0:
        array.append(RandomErasing(reprob, mode="pixel", max_count=1, device="cpu"))
    return ByKind(_channels(_with_safe_posterize(photo), in_chans), T.Compose(array))


def eval_transform(
    input_size: int, in_chans: int, stats: PixelStats, crop_pct: float = 0.875
) -> Callable:
    """-> (in_chans, s, s): resize the shorter side to s / crop_pct (bicubic), centre crop s,
    normalise (224 px: resize to 256, crop 224)."""
    mean, std = _rgb_stats(stats)
    photo = create_transform(
        input_size,
        is_training=False,
        interpolation="bicubic",
        crop_pct=crop_pct,
        crop_mode="center",
        mean=mean,
        std=std,
    )
    array = T.Compose(
        [
            FromArray(),
            T.Resize(math.floor(input_size / crop_pct), interpolation=BICUBIC),
            T.CenterCrop(input_size),
            normalize(stats),
        ]
    )
    return ByKind(_channels(photo, in_chans), array)


def train_val_sources(
    data: str | None, train: str | None, val: str | None
) -> tuple[tuple[str, str], tuple[str, str]]:
    """((train folder or shards, its flag), (val folder or shards, its flag)) from --data and/or
    --train / --val."""
    if data is None and (train is None or val is None):
        raise UserError(
            "No labelled data: pass --data DIR (holding train/ and val/), or --train and --val "
            "(each a folder or WebDataset shards)."
        )
    if data_source(data).kind == "shards":
        raise UserError(
            f"--data {data} names shards, but --data is a folder holding train/ and val/; pass "
            f"shards as --train TRAIN_SHARDS --val VAL_SHARDS."
        )
    return (
        (train, "--train") if train else (str(Path(data) / "train"), "--data"),
        (val, "--val") if val else (str(Path(data) / "val"), "--data"),
    )


def labelled_set(
    source: str, flag: str, transform: Callable, in_chans: int, num_classes: int | None = None
) -> tuple[Dataset, list[str]]:
    """(dataset, class names) of an ImageFolder tree, or of WebDataset shards whose .cls files
    index the names in the classes.json beside them (without one, --num-classes numbers them).
    Photographs are decoded as RGB: see the module docstring."""
    decoding = labelled_decoding(in_chans)
    return data_source(source, flag).labelled(transform, decoding, num_classes)


def labelled_datasets(
    data: str | None,
    train: str | None,
    val: str | None,
    train_tf: Callable,
    val_tf: Callable,
    in_chans: int,
    num_classes: int | None = None,
) -> tuple[Dataset, Dataset, list[str]]:
    """(train set, val set, class names); the two must hold the same classes."""
    (train_dir, train_flag), (val_dir, val_flag) = train_val_sources(data, train, val)
    train_set, classes = labelled_set(train_dir, train_flag, train_tf, in_chans, num_classes)
    val_set, val_classes = labelled_set(val_dir, val_flag, val_tf, in_chans, num_classes)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes)) or ["none"]
        only_val = sorted(set(val_classes) - set(classes)) or ["none"]
        raise UserError(
            f"The classes of {val_dir} differ from those of {train_dir} "
            f"(only in train: {', '.join(only_train[:5])}; only in val: "
            f"{', '.join(only_val[:5])}); give both the same classes."
        )
    return train_set, val_set, classes


def check_num_classes(num_classes: int | None, classes: list[str], where: Path | str) -> int:
    """The head size: num_classes if given, which must equal the class folders' count."""
    if num_classes is not None and num_classes != len(classes):
        kind = "classes" if data_source(str(where)).kind == "shards" else "class folders"
        raise UserError(
            f"--num-classes {num_classes} disagrees with the {len(classes)} {kind} of {where}; "
            f"drop --num-classes or fix the data."
        )
    return len(classes)


def log_data(train_set: Dataset, val_set: Dataset, num_classes: int) -> None:
    log.info(
        "Data: %d training and %d validation images of %d classes.",
        len(train_set),
        len(val_set),
        num_classes,
    )


class ClassNames:
    """A run's class folder names, kept in its checkpoints (extra state): evaluation checks a
    folder against them, and a resume with other class folders is refused."""

    def __init__(self, names: list[str]):
        self.names = list(names)

    def state_dict(self) -> dict[str, Any]:
        return {"names": self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["names"] != self.names:
            raise UserError(
                f"The checkpoint was trained on the classes {state['names']}, the data now "
                f"holds {self.names}; resume with the same data, or pass another --output-dir."
            )


def pretrained(cfg: Any) -> Weights | None:
    """The --pretrained checkpoint of a finetune or linprobe config, checked against its
    network (another channel count is adapted when loaded: fcmae.weights.channels)."""
    if not cfg.pretrained:
        return None
    weights = read_weights(cfg.pretrained, "--pretrained")
    check_fits(weights, cfg.model, cfg.in_chans, cfg.grn, adapt=True)
    return weights


def settle_labelled(cfg: Any, weights: Weights | None, main: bool) -> Settle:
    """How a labelled run settles --pixel-stats auto (fcmae.run.run.Run.open): the statistics
    its --pretrained encoder was pretrained with, when it records them for this channel count;
    otherwise as pretraining settles it, on the training images."""

    def settle(recorded: dict[str, Any] | None) -> None:
        inherited = weights.pixel_stats if weights and weights.in_chans == cfg.in_chans else None
        if cfg.pixel_stats == "auto" and recorded is None and inherited:
            cfg.pixel_stats = inherited
            log.info("Pixel statistics of the pretraining (%s): %s.", weights.source, inherited)
            return
        (train, flag), _ = train_val_sources(cfg.data, cfg.train, cfg.val)
        # measured on what the network sees: a grey model's photographs as luminance
        decoding = Decoding.for_model(cfg.in_chans)
        settle_stats(cfg, data_source(train, flag), decoding, recorded, main)

    return settle


def labelled_inputs(cfg: Any, train_tf: Callable) -> tuple[Dataset, Dataset, list[str]]:
    """(train set, val set, class names) of a finetune or linprobe config whose pixel
    statistics are settled."""
    stats = run_stats(cfg)
    train_set, val_set, classes = labelled_datasets(
        cfg.data,
        cfg.train,
        cfg.val,
        train_tf,
        eval_transform(cfg.input_size, cfg.in_chans, stats, cfg.crop_pct),
        cfg.in_chans,
        cfg.num_classes,
    )
    check_num_classes(cfg.num_classes, classes, cfg.train or cfg.data)
    return train_set, val_set, classes


LABELLED = "a folder holding train/ and val/, each with one subfolder of images per class"


def check_labelled(folder: str, flag: str, pretraining: str | None) -> list[Path]:
    """The train/ images of folder, the value of flag that scores encoders (the sweep's
    --eval-data, the pretraining monitor's --monitor-data); UserError unless it holds train/
    and val/ ImageFolders of the same two or more classes, val/ apart from the pretraining
    images (--data, pretraining's folder; None: the demo photos)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {root} is not a folder; pass {LABELLED}.")
    files, classes = {}, {}
    for part in ("train", "val"):
        if not (root / part).is_dir() or not any((root / part).iterdir()):
            raise UserError(f"{flag} {root} has no {part}/ folder of images; pass {LABELLED}.")
        files[part], _, classes[part] = class_folder(root / part, flag)
    if classes["train"] != classes["val"]:
        raise UserError(
            f"The class folders of {root / 'val'} differ from those of {root / 'train'}; give "
            f"{flag} the same classes in both."
        )
    if len(classes["train"]) < 2:
        raise UserError(
            f"{flag} {root} holds one class ({classes['train'][0]}), on which every encoder "
            f"scores 100%; give its train/ and val/ two or more class folders."
        )
    val = (root / "val").resolve()
    if data_source(pretraining).kind == "folder":
        data = Path(pretraining).expanduser().resolve()
        if data == val or data in val.parents or val in data.parents:
            raise UserError(
                f"--data {pretraining} holds the {flag} images {val} that score the encoder, "
                f"so pretraining would see them; pretrain on others, e.g. --data {root / 'train'}."
            )
    return files["train"]
