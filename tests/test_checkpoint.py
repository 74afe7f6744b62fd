"""Checkpoint files and a run's checkpoints: atomic writes, digests, pruning, corrupt-file
fallback, clean-up of leftovers, RNG states. A run sees only the files its manifest records."""

import logging
import random
import struct

import numpy as np
import pytest
import torch

from fcmae.errors import UserError
from fcmae.run import checkpoint as ckpt
from fcmae.run.checkpointer import Checkpoints, rng_state, set_rng_state
from fcmae.run.files import temporary_name
from fcmae.run.manifest import Manifest
from fcmae.train.distributed import DistInfo


def checkpoints_of(root, keep_last=3):
    """The checkpoints of the run in root, as its main process sees them."""
    return Checkpoints(root / "checkpoints", Manifest(root), DistInfo(), {}, keep_last, seed=0)


def save(run, content, tag, kind="checkpoint"):
    """Write a file as the run does: claimed in its manifest first."""
    ckpt.save_atomic(content, run.manifest.claim(run.file(tag, kind)))


def write_run(run, epochs):
    for epoch in epochs:
        save(run, {"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch}, epoch)
        save(run, {"model": {}}, epoch, "encoder")


@pytest.fixture
def run(tmp_path):
    run = checkpoints_of(tmp_path / "run")
    run.folder.mkdir(parents=True)
    return run


class Kill:
    """Interrupts torch.save when it reaches this object, as a killed job would mid-write."""

    def __reduce__(self):
        raise KeyboardInterrupt


def test_a_crash_while_saving_leaves_the_old_file_and_no_debris(tmp_path):
    path = tmp_path / "checkpoint-0001.pth"
    ckpt.save_atomic({"epoch": 1}, path)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"epoch": 2, "model": {"w": torch.zeros(1000)}, "kill": Kill()}, path)
    assert ckpt.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_prune_keeps_the_newest_k_with_their_exports_and_tagged_files(run):
    write_run(run, [2, 3, 10])
    save(run, {"epoch": 2}, "best")
    (run.folder / "notes-0001.pth").write_bytes(b"the user's")  # not a kind of the run
    torch.save({"model": {}, "epoch": 1}, run.file(1))  # the user's, named like the run's
    run.keep_last = 2
    run.prune()
    assert sorted(p.name for p in run.folder.iterdir()) == [
        "checkpoint-0001.pth",
        "checkpoint-0003.pth",
        "checkpoint-0010.pth",
        "checkpoint-best.pth",
        "encoder-0003.pth",
        "encoder-0010.pth",
        "notes-0001.pth",
    ]
    assert [e for e, _ in run.numbered()] == [10, 3]
    assert run.file(2) not in run.manifest and run.file(2, "encoder") not in run.manifest


def test_newest_valid_skips_corrupt_files_and_says_so(run, caplog):
    write_run(run, [1, 2, 3])
    newest = run.file(3)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full disk
    run.file(2).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        path, state = run.newest_valid()
    assert path.name == "checkpoint-0001.pth" and state["epoch"] == 1
    assert "checkpoint-0003.pth cannot be read" in caplog.text
    assert "checkpoint-0002.pth" in caplog.text


def test_newest_valid_rejects_a_file_missing_required_keys(run):
    write_run(run, [1])
    save(run, {"model": {}}, 2)  # no "epoch"
    path, _ = run.newest_valid()
    assert path.name == "checkpoint-0001.pth"


def test_newest_valid_sees_only_the_runs_own_checkpoints(run):
    write_run(run, [1])
    save(run, {"model": {}, "epoch": 2}, "best")  # tagged: never resumed from
    torch.save({"model": {}, "epoch": 5}, run.file(5))  # the user's, named like the run's
    path, _ = run.newest_valid()
    assert path.name == "checkpoint-0001.pth"


def test_no_checkpoint_is_none_but_only_corrupt_ones_is_an_error(run, tmp_path):
    assert run.newest_valid() is None
    assert checkpoints_of(tmp_path / "missing").newest_valid() is None
    run.manifest.claim(run.file(4)).write_bytes(b"garbage")
    with pytest.raises(UserError, match="No readable checkpoint"):
        run.newest_valid()


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
        path, state = run.newest_valid()
    assert path.name == "checkpoint-0001.pth" and "digest" not in state


def test_only_the_runs_own_leftovers_are_removed(run):
    write_run(run, [1])
    # A save of epoch 2 killed mid-write: its export written, the checkpoint claimed and staged.
    temporary_name(run.manifest.claim(run.file(2))).write_bytes(b"half")
    save(run, {"model": {}}, 2, "encoder")
    users = ["fcmae_atto-1600.pth", "best_model-3.pth", ".notes.tmpfile", ".x.pth.tmp-123"]
    users += ["encoder-0005.pth", f".notes.pth.tmp-{'0' * 32}"]  # named like the run's
    for name in users:
        (run.folder / name).write_bytes(b"the user's")
    run.remove_leftovers()
    assert sorted(p.name for p in run.folder.iterdir()) == sorted(
        ["checkpoint-0001.pth", "encoder-0001.pth", *users]
    )
    assert run.file(2, "encoder") not in run.manifest


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
