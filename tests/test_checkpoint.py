"""Checkpoint files: atomic writes, pruning, corrupt-file fallback, RNG states."""

import logging
import random
import struct

import numpy as np
import pytest
import torch

from fcmae import checkpoint as ckpt
from fcmae.errors import UserError


def write_run(directory, epochs):
    for epoch in epochs:
        ckpt.save_atomic(
            {"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch},
            ckpt.checkpoint_path(directory, epoch),
        )
        ckpt.save_atomic({"model": {}}, ckpt.checkpoint_path(directory, epoch, "encoder"))


def test_a_crash_while_saving_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-0001.pth"
    ckpt.save_atomic({"epoch": 1}, path)

    def crash(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"epoch": 2}, path)
    assert ckpt.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_prune_keeps_the_newest_k_with_their_exports_and_tagged_files(tmp_path):
    write_run(tmp_path, [1, 2, 3, 10])
    ckpt.save_atomic({"epoch": 2}, ckpt.checkpoint_path(tmp_path, "best"))
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-0003.pth",
        "checkpoint-0010.pth",
        "checkpoint-best.pth",
        "encoder-0003.pth",
        "encoder-0010.pth",
    ]
    assert [e for e, _ in ckpt.numbered_checkpoints(tmp_path)] == [10, 3]


def test_newest_valid_skips_corrupt_files_and_says_so(tmp_path, caplog):
    write_run(tmp_path, [1, 2, 3])
    newest = ckpt.checkpoint_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    ckpt.checkpoint_path(tmp_path, 2).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        path, state = ckpt.newest_valid(tmp_path, ("model", "epoch"))
    assert path.name == "checkpoint-0001.pth" and state["epoch"] == 1
    assert "checkpoint-0003.pth cannot be read" in caplog.text
    assert "checkpoint-0002.pth" in caplog.text


def test_newest_valid_rejects_a_file_missing_required_keys(tmp_path):
    write_run(tmp_path, [1])
    torch.save({"model": {}}, ckpt.checkpoint_path(tmp_path, 2))  # no "epoch"
    path, _ = ckpt.newest_valid(tmp_path, ("model", "epoch"))
    assert path.name == "checkpoint-0001.pth"


def test_no_checkpoint_is_none_but_only_corrupt_ones_is_an_error(tmp_path):
    assert ckpt.newest_valid(tmp_path) is None
    assert ckpt.newest_valid(tmp_path / "missing") is None
    ckpt.checkpoint_path(tmp_path, 4).write_bytes(b"garbage")
    with pytest.raises(UserError, match="No readable checkpoint"):
        ckpt.newest_valid(tmp_path)


class Foreign:
    """Stands for any class a pickle could run code from."""


def test_a_pickled_class_is_refused_by_weights_only_loading(tmp_path):
    path = tmp_path / "checkpoint-0001.pth"
    torch.save({"model": {}, "epoch": 1, "evil": Foreign()}, path)
    with pytest.raises(ckpt.CorruptCheckpoint) as e:
        ckpt.load(path)
    assert "weights_only=False" not in str(e.value)  # never advise running the pickle


def test_bytes_damaged_inside_a_checkpoint_are_detected_and_skipped(tmp_path, caplog):
    write_run(tmp_path, [1, 2])
    newest = ckpt.checkpoint_path(tmp_path, 2)
    data = bytearray(newest.read_bytes())
    at = data.index(struct.pack("<2f", 2.0, 2.0))  # the tensor's storage, not the pickle
    data[at : at + 8] = b"\xff" * 8  # same size, still a valid zip
    newest.write_bytes(bytes(data))
    assert torch.load(newest, weights_only=True)["model"]["w"].isnan().all()  # loads silently
    with pytest.raises(ckpt.CorruptCheckpoint, match="damaged after it was written"):
        ckpt.load(newest)
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        path, state = ckpt.newest_valid(tmp_path, ("model", "epoch"))
    assert path.name == "checkpoint-0001.pth" and "digest" not in state


def test_leftovers_of_interrupted_saves_are_removed(tmp_path):
    write_run(tmp_path, [1])
    (tmp_path / ".checkpoint-0002.pth.tmp123").write_bytes(b"half")
    ckpt.save_atomic({"model": {}}, ckpt.checkpoint_path(tmp_path, 2, "encoder"))  # no checkpoint
    ckpt.remove_leftovers(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-0001.pth",
        "encoder-0001.pth",
    ]


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "r.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    ckpt.set_rng_state(torch.load(tmp_path / "r.pth", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
