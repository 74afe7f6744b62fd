"""Checkpoint files and a run's checkpoints: atomic writes, digests, pruning, corrupt-file
fallback, clean-up of leftovers, RNG states."""

import logging
import random
import struct

import numpy as np
import pytest
import torch

from fcmae.errors import UserError
from fcmae.run import checkpoint as ckpt
from fcmae.run.checkpointer import Checkpointer, rng_state, set_rng_state
from fcmae.run.files import temporary_name
from fcmae.run.rundir import RunDir
from fcmae.train.distributed import DistInfo


def write_run(run, epochs):
    for epoch in epochs:
        ckpt.save_atomic(
            {"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}, run.file(epoch)
        )
        ckpt.save_atomic({"model": {}}, run.file(epoch, "encoder"))


def newest_valid(run):
    return Checkpointer(run, DistInfo(), "auto", {}, keep_last=3, seed=0).newest_valid()


@pytest.fixture
def run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.checkpoints.mkdir(parents=True)
    return run


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


def test_a_full_disk_while_saving_is_one_sentence_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-0001.pth"
    ckpt.save_atomic({"epoch": 1}, path)

    def full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="No space left on device.*free some disk space"):
        ckpt.save_atomic({"epoch": 2}, path, "--output-dir")
    assert ckpt.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_prune_keeps_the_newest_k_with_their_exports_and_tagged_files(run):
    write_run(run, [1, 2, 3, 10])
    ckpt.save_atomic({"epoch": 2}, run.file("best"))
    (run.checkpoints / "notes-0001.pth").write_bytes(b"the user's")  # not a kind of the run
    run.prune(keep_last=2, kinds=("encoder",))
    assert sorted(p.name for p in run.checkpoints.iterdir()) == [
        "checkpoint-0003.pth",
        "checkpoint-0010.pth",
        "checkpoint-best.pth",
        "encoder-0003.pth",
        "encoder-0010.pth",
        "notes-0001.pth",
    ]
    assert [e for e, _ in run.numbered()] == [10, 3]


def test_newest_valid_skips_corrupt_files_and_says_so(run, caplog):
    write_run(run, [1, 2, 3])
    newest = run.file(3)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    run.file(2).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        path, state = newest_valid(run)
    assert path.name == "checkpoint-0001.pth" and state["epoch"] == 1
    assert "checkpoint-0003.pth cannot be read" in caplog.text
    assert "checkpoint-0002.pth" in caplog.text


def test_newest_valid_rejects_a_file_missing_required_keys(run):
    write_run(run, [1])
    torch.save({"model": {}}, run.file(2))  # no "epoch"
    path, _ = newest_valid(run)
    assert path.name == "checkpoint-0001.pth"


def test_no_checkpoint_is_none_but_only_corrupt_ones_is_an_error(run, tmp_path):
    assert newest_valid(run) is None
    assert newest_valid(RunDir(tmp_path / "missing")) is None
    run.file(4).write_bytes(b"garbage")
    with pytest.raises(UserError, match="No readable checkpoint"):
        newest_valid(run)


class Foreign:
    """Stands for any class a pickle could run code from."""


def test_a_pickled_class_is_refused_by_weights_only_loading(tmp_path):
    path = tmp_path / "checkpoint-0001.pth"
    torch.save({"model": {}, "epoch": 1, "evil": Foreign()}, path)
    with pytest.raises(ckpt.CorruptCheckpoint) as e:
        ckpt.load(path)
    assert "weights_only=False" not in str(e.value)  # never advise running the pickle


def test_bytes_damaged_inside_a_checkpoint_are_detected_and_skipped(run, caplog):
    write_run(run, [1, 2])
    newest = run.file(2)
    data = bytearray(newest.read_bytes())
    at = data.index(struct.pack("<2f", 2.0, 2.0))  # the tensor's storage, not the pickle
    data[at : at + 8] = b"\xff" * 8  # same size, still a valid zip
    newest.write_bytes(bytes(data))
    assert torch.load(newest, weights_only=True)["model"]["w"].isnan().all()  # loads silently
    with pytest.raises(ckpt.CorruptCheckpoint, match="damaged after it was written"):
        ckpt.load(newest)
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        path, state = newest_valid(run)
    assert path.name == "checkpoint-0001.pth" and "digest" not in state


def test_only_the_runs_own_leftovers_are_removed(run):
    write_run(run, [1])
    temporary_name(run.file(2)).write_bytes(b"half")  # a save killed mid-write
    ckpt.save_atomic({"model": {}}, run.file(2, "encoder"))  # its checkpoint never written
    users = ["fcmae_atto-1600.pth", "best_model-3.pth", ".notes.tmpfile", ".x.pth.tmp-123"]
    for name in users:
        (run.checkpoints / name).write_bytes(b"the user's")
    run.remove_leftovers(kinds=("encoder",))
    assert sorted(p.name for p in run.checkpoints.iterdir()) == sorted(
        ["checkpoint-0001.pth", "encoder-0001.pth", *users]
    )


def test_rng_states_survive_a_weights_only_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save({"rng": rng_state()}, tmp_path / "r.pth")
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    set_rng_state(torch.load(tmp_path / "r.pth", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
