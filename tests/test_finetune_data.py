"""Labelled folders, their errors, and the recipe's transforms (timm's)."""

import re

import numpy as np
import pytest
import torch
from helpers import write_image_folder
from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from fcmae.data.stats import imagenet
from fcmae.data.transforms import normalize
from fcmae.errors import UserError
from fcmae.finetune.data import (
    check_num_classes,
    eval_transform,
    labelled_datasets,
    train_transform,
)


def photo(width=90, height=60, seed=0, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def test_eval_resizes_the_shorter_side_to_size_over_crop_pct_then_centre_crops():
    image = photo()
    ours = eval_transform(64, 3, imagenet(3), crop_pct=0.875)(image)
    resized = T.Resize(73, interpolation=T.InterpolationMode.BICUBIC)(image)  # 64 / 0.875
    expected = normalize(imagenet(3))(T.ToTensor()(T.CenterCrop(64)(resized)))
    assert ours.shape == (3, 64, 64)
    assert torch.allclose(ours, expected, atol=1e-6)


@pytest.mark.parametrize("stored", ["L", "RGB"])
def test_grayscale_sees_the_numbers_pretraining_saw(stored):
    image = photo(mode=stored)  # a colour photo too: pretraining decodes it as luminance ("L")
    ours = eval_transform(32, 1, imagenet(1), crop_pct=1.0)(image.convert("RGB"))
    resized = T.Resize(32, interpolation=T.InterpolationMode.BICUBIC)(image.convert("L"))
    expected = normalize(imagenet(1))(T.ToTensor()(T.CenterCrop(32)(resized)))
    assert ours.shape == (1, 32, 32)
    assert torch.allclose(ours, expected, atol=1e-6)


def test_train_transform_is_timms_randaugment_and_random_erasing():
    transform = train_transform(
        48, 3, imagenet(3), auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25
    )
    steps = {type(t): t for t in transform.photo.transforms}
    augment, erasing = steps[RandAugment], steps[RandomErasing]
    assert augment.num_layers == 2 and augment.ops[0].magnitude == 9
    assert augment.ops[0].magnitude_std == 0.5 and augment.ops[0].hparams["interpolation"]
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    assert transform(photo()).shape == (3, 48, 48)
    assert train_transform(48, 1, imagenet(1))(photo()).shape == (1, 48, 48)


def test_randaugment_at_full_magnitude_posterizes_to_black_instead_of_failing():
    # Pillow 13 refuses to keep 0 bits, which rand-m9-mstd0.5 asks for about 2% of the time.
    transform = train_transform(48, 3, imagenet(3), auto_augment="rand-m9-mstd0.5-inc1")
    augment = next(t for t in transform.photo.transforms if isinstance(t, RandAugment))
    posterize = next(op for op in augment.ops if op.name == "PosterizeIncreasing")
    full = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)
    full.aug_fn = posterize.aug_fn
    assert np.asarray(full(photo())).max() == 0
    with pytest.raises(ValueError):  # timm's own table is left as it is
        AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(photo())


def identity(image):
    return image


def test_train_and_val_folders_give_labelled_datasets(tmp_path):
    write_image_folder(tmp_path / "train", classes=3, per_class=2)
    write_image_folder(tmp_path / "val", classes=3, per_class=1)
    train, val, classes = labelled_datasets(str(tmp_path), None, None, identity, identity, 3)
    assert classes == ["class0", "class1", "class2"]
    assert (len(train), len(val)) == (6, 3) and [val[i][1] for i in range(3)] == [0, 1, 2]
    assert val[0][0].mode == "RGB"  # decoded as RGB whatever in_chans is


@pytest.mark.parametrize(
    "case, message",
    [
        ("no data", "pass --data DIR"),
        ("no val", "labelled/val (from --data) is not a folder"),
        ("other classes", "only in train: class2; only in val: none"),
        ("empty class", "class1 has no images; add images to it or remove it"),
        ("flat", "holds images directly; put them in one subfolder per class"),
    ],
)
def test_bad_folders_are_one_clear_error(tmp_path, case, message):
    root = tmp_path / "labelled"
    write_image_folder(root / "train", classes=3, per_class=1)
    if case == "other classes":
        write_image_folder(root / "val", classes=2, per_class=1)
    elif case == "empty class":
        write_image_folder(root / "val", classes=3, per_class=1)
        for image in (root / "val" / "class1").iterdir():
            image.unlink()
    elif case == "flat":
        write_image_folder(root / "val", classes=1, per_class=1)
        (root / "val" / "class0" / "0.png").rename(root / "val" / "0.png")
    data = None if case == "no data" else str(root)
    with pytest.raises(UserError, match=re.escape(message)):
        labelled_datasets(data, None, None, identity, identity, 3)


def test_a_head_size_that_disagrees_with_the_data_is_refused():
    assert check_num_classes(None, ["a", "b"], "d") == 2
    assert check_num_classes(2, ["a", "b"], "d") == 2
    with pytest.raises(UserError, match="--num-classes 5 disagrees with the 2 class folders"):
        check_num_classes(5, ["a", "b"], "d")
