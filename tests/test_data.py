"""Datasets and transforms: folder layouts, bad files, embedded photos, input sizes, the source
switch and the fixed images of pictures."""

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fcmae.data.folders import find_images
from fcmae.data.images import Decoding
from fcmae.data.sources import (
    EmbeddedPhotos,
    ImageFiles,
    collate,
    data_source,
    fixed_images,
)
from fcmae.data.stats import imagenet
from fcmae.data.transforms import pretrain_transform
from fcmae.errors import UserError

RGB = Decoding.for_model(3)


def save_image(path, size=(40, 30), seed=0, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def truncated_jpeg(path):
    save_image(path.with_suffix(".tmp.jpg"), size=(64, 64))
    data = path.with_suffix(".tmp.jpg").read_bytes()
    path.with_suffix(".tmp.jpg").unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_flat_folder_is_searched_recursively_and_unlabelled(tmp_path):
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "deep" / "er" / "b.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    files, labels, classes = find_images(tmp_path)
    assert [f.name for f in files] == ["a.png", "b.JPG"] and labels == [-1, -1] and classes == []


def test_an_imagefolder_tree_gives_class_labels(tmp_path):
    save_image(tmp_path / "dog" / "1.png")
    save_image(tmp_path / "cat" / "x" / "2.png")
    save_image(tmp_path / "cat" / "3.png")
    files, labels, classes = find_images(tmp_path)
    assert classes == ["cat", "dog"]
    assert dict(zip((f.name for f in files), labels)) == {"2.png": 0, "3.png": 0, "1.png": 1}


def make_bad_dir(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "missing"
    if kind == "file":
        (tmp_path / "f.png").write_bytes(b"")
        return tmp_path / "f.png"
    if kind == "no images":
        (tmp_path / "a.txt").write_text("x")
    return tmp_path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("file", "is a file"),
        ("empty", "is empty"),
        ("no images", "No images"),
    ],
)
def test_unusable_data_dirs_are_one_clear_error(tmp_path, kind, message):
    with pytest.raises(UserError, match=message):
        find_images(make_bad_dir(tmp_path, kind))


def test_unreadable_and_truncated_images_are_skipped_and_counted(tmp_path, caplog):
    good = [save_image(tmp_path / f"{i}.png", seed=i) for i in (0, 3)]
    bad = [truncated_jpeg(tmp_path / "1.jpg"), tmp_path / "2.png"]
    bad[1].write_bytes(b"not a png at all")
    files, labels, _ = find_images(tmp_path)
    dataset = ImageFiles(files, labels, pretrain_transform(32, imagenet(3)), RGB)
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        samples = [dataset[i] for i in range(len(dataset))]
    # files 1 and 2 fall through to file 3; each counts once, on its own turn
    assert [s[2] for s in samples] == [False, True, True, False]
    batch = collate(samples)
    assert batch.images.shape == (4, 3, 32, 32) and batch.skipped.sum() == 2
    assert caplog.text.count("Skipping unreadable image") == 2  # once a file
    assert "1.jpg" in caplog.text and "2.png" in caplog.text
    assert str(good[0]) not in caplog.text


def test_16_bit_and_float_images_keep_their_values(tmp_path):
    ramp = np.linspace(0, 1, 32 * 32).reshape(32, 32)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "a16.png")
    Image.fromarray(ramp.astype(np.float32)).save(tmp_path / "b.tif")
    Image.fromarray((ramp * 1000).astype(np.float32)).save(tmp_path / "c.tif")  # not [0, 1]
    files, labels, _ = find_images(tmp_path)
    dataset = ImageFiles(files, labels, lambda image: image, Decoding.for_model(1))
    (a16, _, _), (b, _, _), (c, _, _) = (dataset[i] for i in range(3))
    assert np.array_equal(a16[0], ((ramp * 65535).astype(np.uint16) / 65535).astype(np.float32))
    assert np.array_equal(b[0], ramp.astype(np.float32))  # floats as they are, not rescaled
    assert np.array_equal(c[0], (ramp * 1000).astype(np.float32))


def test_a_folder_of_only_broken_files_is_an_error_not_a_hang(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    files, labels, _ = find_images(tmp_path)
    with pytest.raises(UserError, match="None of the 1 images"):
        ImageFiles(files, labels, pretrain_transform(32, imagenet(3)), RGB)[0]


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_any_stored_mode_becomes_in_chans_channels(tmp_path, in_chans, mode):
    save_image(tmp_path / "a.png", size=(50, 20), mode=mode)
    transform = pretrain_transform(64, imagenet(in_chans))
    dataset, _ = data_source(str(tmp_path)).unlabelled(transform, Decoding.for_model(in_chans), 1)
    image, _, _ = dataset[0]
    assert image.shape == (in_chans, 64, 64) and image.dtype == torch.float32


def test_transform_normalises_to_roughly_unit_scale():
    mean = np.array([124, 116, 104], np.uint8)  # the ImageNet mean colour
    out = pretrain_transform(32, imagenet(3))(Image.fromarray(np.tile(mean, (80, 80, 1))))
    assert out.abs().max() < 0.01


@pytest.mark.parametrize("in_chans", [1, 3])
def test_embedded_photos_need_no_download_and_are_real_photographs(in_chans):
    transform = pretrain_transform(64, imagenet(in_chans))
    dataset = EmbeddedPhotos(20, transform, Decoding.for_model(in_chans))
    assert len(dataset) == 20 and len(dataset.photos) >= 10
    assert all(min(p.size) >= 150 for p in dataset.photos)
    images = torch.stack([dataset[i][0] for i in range(len(dataset.photos))])
    assert images.shape == (len(dataset.photos), in_chans, 64, 64)
    # real photos: distinct content, not constant noise
    assert images.flatten(1).std(1).min() > 0.05
    assert (images[0] - images[1]).abs().mean() > 0.1


def test_no_data_means_the_embedded_set_with_a_line_saying_so():
    transform = pretrain_transform(64, imagenet(3))
    dataset, line = data_source(None).unlabelled(transform, RGB, demo_images=8)
    assert isinstance(dataset, EmbeddedPhotos) and len(dataset) == 8
    assert "No --data given" in line and "embedded" in line


@pytest.mark.parametrize(
    "data, kind",
    [
        (None, "demo"),
        ("no/such/folder", "folder"),
        ("shards/train-{000000..000127}.tar", "shards"),
        ("one.tar.gz", "shards"),
        ("pipe:curl -s https://example.com/a.tar", "shards"),
    ],
)
def test_the_one_switch_tells_demo_folders_and_shards_apart_without_reading(data, kind):
    assert data_source(data).kind == kind


def test_fixed_images_are_spread_over_the_folder_so_every_class_shows(tmp_path):
    for i, value in enumerate([0, 1, 2, 100, 101, 102]):
        path = tmp_path / ("a" if i < 3 else "b") / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.full((40, 40), value, np.uint8)).save(path)
    images = fixed_images(data_source(str(tmp_path)), 32, Decoding.for_model(1), imagenet(1), 2)
    mean, std = imagenet(1).mean, imagenet(1).std
    pixels = (images * std[0] + mean[0]) * 255
    assert images.shape == (2, 1, 32, 32)
    assert torch.allclose(pixels.mean((1, 2, 3)), torch.tensor([0.0, 102.0]), atol=0.5)
    demo = fixed_images(data_source(None), 32, RGB, imagenet(3), 2)
    assert demo.shape == (2, 3, 32, 32) and not torch.equal(demo[0], demo[1])


def test_image_decoding_needs_no_torch_and_shards_need_no_fcmae_data():
    # the modules import one way: images <- shards <- data (no cycle)
    code = (
        "import sys; import fcmae.data.images; assert 'torch' not in sys.modules; "
        "import fcmae.data.shards; assert 'fcmae.data.sources' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
