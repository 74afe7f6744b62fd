"""WebDataset shards as --data (pretrain) and --train / --val (finetune): written by
scripts/folder_to_shards.py, every sample read once per epoch over ranks and loader workers,
unreadable images skipped as in folders, and a pretraining and a fine-tuning epoch on them."""

import importlib.util
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_image_folder
from PIL import Image
from torch.utils.data import DataLoader

from fcmae.cli import main
from fcmae.data.images import Decoding
from fcmae.data.shards import open_shards, shard_images
from fcmae.data.sources import collate
from fcmae.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location(
    "folder_to_shards", ROOT / "scripts" / "folder_to_shards.py"
)
folder_to_shards = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(folder_to_shards)


def png(value, size=8):
    """A uniform grey PNG whose pixel value identifies it."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tar(path, samples):
    """A tar of {key: {extension: bytes}}, in order."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for extension, data in files.items():
                member = tarfile.TarInfo(f"{key}.{extension}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def pixel(image):
    """The transform of the split tests: an image's identifying value."""
    return torch.tensor(int(np.asarray(image)[0, 0]))


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """34 images numbered 0..33 in 8 shards of uneven sizes (no sizes.json: counted)."""
    root = tmp_path_factory.mktemp("numbered")
    sizes, value = [5, 3, 4, 4, 6, 2, 4, 6], 0
    for i, size in enumerate(sizes):
        samples = {f"{value + j:06d}": {"png": png(value + j)} for j in range(size)}
        write_tar(root / f"part-{i:02d}.tar", samples)
        value += size
    return str(root / "part-{00..07}.tar")


def seen(dataset, epoch, rank, workers, **part):
    """The identifying values one rank's loader yields in an epoch, batch by batch."""
    view = dataset.for_epoch(epoch, rank, 2, seed=0, batch_size=4, **part)
    loader = DataLoader(view, 4, num_workers=workers, collate_fn=collate)
    batches = [batch.images.tolist() for batch in loader]
    assert len(batches) == len(loader)
    return batches


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_is_read_once_per_epoch_over_two_ranks(numbered, workers):
    dataset = open_shards(numbered, "--data", pixel, Decoding.for_model(1))
    assert len(dataset) == 34
    orders = []
    for epoch in (0, 1):  # training: whole batches, equal steps per rank, a new order each epoch
        ranks = [seen(dataset, epoch, r, workers, shuffle=True, drop_last=True) for r in (0, 1)]
        assert [len(batches) for batches in ranks] == [4, 4]
        assert all(len(batch) == 4 for batches in ranks for batch in batches)
        values = [v for batches in ranks for batch in batches for v in batch]
        assert len(values) == len(set(values)) == 32  # 34 // (2 ranks x 4) x 8: two left out
        orders.append(values)
    assert orders[0] != orders[1]
    # evaluation: every sample exactly once, nothing left out
    ranks = [seen(dataset, 0, r, workers, shuffle=False, drop_last=False) for r in (0, 1)]
    values = [v for batches in ranks for batch in batches for v in batch]
    assert sorted(values) == list(range(34))


def test_an_unreadable_image_is_skipped_and_counted_as_in_folders(tmp_path, caplog):
    samples = {f"{i:06d}": {"png": png(i)} for i in range(4)}
    samples["000001"] = {"png": b"not a png"}
    write_tar(tmp_path / "a.tar", samples)
    dataset = open_shards(str(tmp_path / "a.tar"), "--data", pixel, Decoding.for_model(1))
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        out = [(int(image), skipped) for image, _, skipped in dataset]
    assert out == [(0, False), (0, True), (2, False), (3, False)]
    assert "Skipping unreadable image 000001" in caplog.text


def test_folder_to_shards_writes_every_image_once_with_its_class(tmp_path):
    write_image_folder(tmp_path / "images", classes=2, per_class=5, size=8)
    pattern = folder_to_shards.write_shards(tmp_path / "images", tmp_path / "shards", 4)
    assert pattern == str(tmp_path / "shards" / "{000000..000002}.tar")
    shards = tmp_path / "shards"
    assert json.loads((shards / "classes.json").read_text()) == ["class0", "class1"]
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sizes == {"000000.tar": 4, "000001.tar": 4, "000002.tar": 2}
    originals = {
        (tmp_path / "images" / f"class{c}" / f"{i}.png").read_bytes(): c
        for c in range(2)
        for i in range(5)
    }
    dataset = open_shards(pattern, "--train", np.asarray, Decoding.for_model(3), classes=["a", "b"])
    assert len(dataset) == 10
    written = {}
    for name in sizes:
        with tarfile.open(shards / name) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        for key in {n.split(".")[0] for n in files}:
            written[files[f"{key}.png"]] = int(files[f"{key}.cls"])
    assert written == originals
    assert len(list(shard_images(pattern, "--data", Decoding.for_model(3)))) == 10


def test_bad_shards_are_refused_naming_the_fix(tmp_path):
    write_tar(tmp_path / "text.tar", {"000000": {"txt": b"hello"}})
    write_tar(tmp_path / "unlabelled.tar", {"000000": {"png": png(1)}})
    (tmp_path / "broken.tar").write_bytes(b"not a tar file at all" * 40)
    cases = [
        (str(tmp_path / "none-{0..3}.tar"), {}, "No shard matches"),
        (str(tmp_path / "{text,nowhere}.tar"), {}, "1 of the 2 shards"),
        (str(tmp_path / "text.tar"), {}, "holds no images"),
        (str(tmp_path / "broken.tar"), {}, "not a readable tar file"),
        (str(tmp_path / "unlabelled.tar"), {"classes": ["a"]}, "have no .cls label"),
    ]
    for source, kwargs, says in cases:
        with pytest.raises(UserError, match=says):
            open_shards(source, "--data", pixel, "L", **kwargs)


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory):
    """train/ and val/ shards of a 3-class ImageFolder, as the script writes them."""
    root = tmp_path_factory.mktemp("labelled-shards")
    write_image_folder(root / "images" / "train", classes=3, per_class=6, seed=0)
    write_image_folder(root / "images" / "val", classes=3, per_class=2, seed=1)
    return {
        split: folder_to_shards.write_shards(root / "images" / split, root / split, 5)
        for split in ("train", "val")
    }


FAST = ["--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--effective-batch"]
FAST += ["none", "--num-workers", "0", "--device", "cpu"]


def epoch_record(run_dir):
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["type"]: r for r in records}


def test_a_pretraining_epoch_runs_on_shards(labelled_shards, tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--data", labelled_shards["train"], "--output-dir", str(out)]
    assert main([*args, "--input-size", "64", "--recon-every", "1", *FAST]) == 0
    records = epoch_record(out)
    assert records["run"]["steps_per_epoch"] == 18 // 8
    assert records["epoch"]["epoch"] == 1 and records["epoch"]["skipped_images"] == 0
    assert "18 images in 4 WebDataset shards" in (out / "log.txt").read_text()
    assert (out / "checkpoints" / "encoder-0001.pth").is_file()
    assert any((out / "recon").iterdir())


def test_a_fine_tuning_epoch_runs_on_train_and_val_shards(labelled_shards, tmp_path):
    out = tmp_path / "run"
    args = ["finetune", "--train", labelled_shards["train"], "--val", labelled_shards["val"]]
    assert main([*args, "--output-dir", str(out), "--input-size", "32", *FAST]) == 0
    records = epoch_record(out)
    assert records["run"]["steps_per_epoch"] == 18 // 8
    assert 0 <= records["epoch"]["val_acc1"] <= 100 and records["epoch"]["val_skipped"] == 0
    saved = torch.load(out / "checkpoints" / "checkpoint-0001.pth", weights_only=True)
    assert saved["extra"]["classes"]["names"] == ["class0", "class1", "class2"]
