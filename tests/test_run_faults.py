"""Real faults against the Run and the commands that write (issue 24): a full disk is a small
tmpfs mounted for the test, a read-only folder a read-only mount, "permission denied" a
process of another user, a user's file a real file, a hand-edited record a real edit. No writer
is patched.

Mounting needs root: CI runs as root, so there every test here runs; as another user the
tests that mount are skipped (pytest -rs says "mounting a tmpfs needs root").
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fcmae
from fcmae.cli import main
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.errors import UserError
from fcmae.run.checkpoint import read, save_atomic
from fcmae.run.files import write_error
from fcmae.run.metrics import Metrics
from fcmae.run.run import Run
from fcmae.train.distributed import DistInfo

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
TINY = ["--demo-images", "8", "--batch-size", "4", "--input-size", "64", "--recon-every", "0"]
TINY += ["--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0"]


@pytest.fixture
def disk(tmp_path):
    """mount(size, read_only) -> a fresh tmpfs folder of that size; unmounted afterwards."""
    mounted = []

    def mount(size: str = "1m", read_only: bool = False) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fcmae_cli(*args, cwd=None):
    """`python -m fcmae ARGS` in a process of its own: (exit status, stdout, stderr), so that
    what other threads print (TensorBoard's writer) is seen too."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "fcmae", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )
    return done.returncode, done.stdout, done.stderr


def one_sentence(stderr: str) -> str:
    """The one error line of stderr, checked to be alone and without a traceback."""
    assert "Traceback" not in stderr and "Exception in thread" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("fcmae: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def noise():
    """A (256, 256, 3) uint8 picture that no PNG compresses to little."""
    return torch.randint(0, 256, (256, 256, 3), dtype=torch.uint8).numpy()


def fill(folder: Path) -> None:
    """Write a file into folder until its disk is full."""
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


# 1. A real full disk: one sentence wherever the write fails, and the same command resumes.


@needs_root
def test_a_full_disk_at_a_checkpoint_is_one_sentence_and_the_run_resumes_with_room(disk):
    root = disk("1m")  # the records and logs fit, a checkpoint does not
    run = root / "run"
    status, _, stderr = fcmae_cli("pretrain", *TINY, "--epochs", "1", "--output-dir", run)
    said = one_sentence(stderr)
    assert status == 1 and "No space left on device" in said and "checkpoints" in said
    assert "the disk is full" in said
    assert not leftovers(root) and not list((run / "checkpoints").iterdir())
    subprocess.run(["mount", "-o", "remount,size=300m", str(root)], check=True)
    status, stdout, stderr = fcmae_cli("pretrain", *TINY, "--epochs", "1", "--output-dir", run)
    assert status == 0, stderr
    assert (run / "checkpoints" / "checkpoint-0001.pth").is_file() and "Done." in stdout


@needs_root
def test_a_full_disk_at_an_export_is_one_sentence_and_leaves_no_file(disk, tmp_path):
    encoder = fcmae.create_model("convnextv2_atto", head=False)
    torch.save({"model": encoder.state_dict()}, tmp_path / "encoder.pth")
    root = disk("256k")
    status, _, stderr = fcmae_cli(
        "export", "--checkpoint", tmp_path / "encoder.pth", "--output", root / "atto.pth"
    )
    said = one_sentence(stderr)
    assert status == 1 and f"Cannot write {root / 'atto.pth'} (No space left" in said
    assert list(root.iterdir()) == []


@needs_root
def test_a_full_disk_under_the_metrics_and_tensorboard_is_one_sentence(disk, capfd):
    root = disk("1m")
    metrics = Metrics(root)
    metrics.write({"type": "step", "step": 1, "loss": 1.0})
    fill(root)
    # Either sink fails first: metrics.jsonl when its last page is full, or TensorBoard, which
    # writes on a thread of its own (its failure shows at the next record).
    with pytest.raises(UserError, match=r"(metrics.jsonl|tb) \(No space left on device\): the"):
        for step in range(2, 10000):
            metrics.write({"type": "step", "step": step, "loss": 0.5})
    with pytest.raises(UserError, match="No space left on device"):
        metrics.picture(root / "recon" / "epoch-0001.png", noise(), 1)
        metrics.close()
    assert "Exception in thread" not in capfd.readouterr().err


@needs_root
@pytest.mark.parametrize("command", ["visualize", "plot"])
def test_a_picture_on_a_full_disk_is_one_sentence_and_leaves_no_file(command, disk, tmp_path):
    run = tmp_path / "run"
    assert pretrain(run, "--epochs", "1") == 0
    root = disk("16k")
    reads = ["--checkpoint", run / "checkpoints" / "checkpoint-0001.pth"]
    args = ["visualize", *reads, "--images", "2"] if command == "visualize" else ["plot", run]
    status, _, stderr = fcmae_cli(*args, "--output", root / "out.png")
    said = one_sentence(stderr)
    assert status == 1 and f"Cannot write {root / 'out.png'} (No space left on device)" in said
    assert list(root.iterdir()) == []


@needs_root
def test_a_read_only_output_dir_is_one_sentence_before_any_work(disk):
    root = disk(read_only=True)
    status, stdout, stderr = fcmae_cli("pretrain", *TINY, "--output-dir", root / "run")
    said = one_sentence(stderr)
    assert status == 1 and "(Read-only file system): the file system is read-only" in said
    assert "epoch 1/1" not in stdout and list(root.iterdir()) == []  # before any training


# 2. Errors worded once, from the fault itself: each errno with its own advice.


def test_each_failed_write_gets_the_advice_of_its_errno(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("the user's")
    cases = {
        tmp_path / "folder": "a folder is in the way",  # EISDIR
        tmp_path / "file" / "x.txt": "a part of the path is a file",  # ENOTDIR
    }
    for path, advice in cases.items():
        with pytest.raises(OSError) as raised:
            open(path, "w")
        assert advice in str(write_error(path, raised.value))
    with pytest.raises(OSError) as raised:  # EEXIST: a file where a folder is needed
        (tmp_path / "file").mkdir(exist_ok=True)
    assert "a file is where a folder is needed" in str(write_error(tmp_path / "file", raised.value))
    assert write_error(tmp_path, ValueError("not a write")) is None
    assert "free some space" not in str(write_error(tmp_path / "folder", raised.value))


@needs_root
def test_permission_denied_says_so_and_not_free_some_space():
    shared = Path(tempfile.mkdtemp(dir="/tmp"))  # another user may enter it: not pytest's
    try:
        shared.chmod(0o755)
        (shared / "closed").mkdir(mode=0o755)  # root's: another user may not write in it
        code = (
            "from fcmae.run.files import write_text_atomic\n"
            f"write_text_atomic({str(shared / 'closed' / 'x.txt')!r}, 'x')\n"
        )
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        can = subprocess.run([*nobody, sys.executable, "-c", "import fcmae"], capture_output=True)
        if can.returncode:  # e.g. a virtual environment in a folder only root may enter
            pytest.skip("another user cannot run this Python and fcmae")
        done = subprocess.run([*nobody, sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        shutil.rmtree(shared)
    said = done.stderr.strip().splitlines()[-1]
    assert "(Permission denied): permission denied; pass a path in a folder you may" in said, said
    assert "free some" not in said


@needs_root
def test_a_sink_failing_at_the_close_does_not_hide_the_error_that_ended_the_run(disk, capfd):
    root = disk("1m")
    cfg = resolve(PretrainConfig, None, {"output_dir": str(root / "run"), "device": "cpu"})
    with pytest.raises(RuntimeError, match="what ended the run"):
        with Run.open(cfg, DistInfo()) as run:
            run.begin()
            metrics = run.open_metrics(0)
            fill(root)
            metrics.tb.add_image("picture", noise(), 0, dataformats="HWC")  # queued, fails later
            raise RuntimeError("what ended the run")
    err = capfd.readouterr().err
    assert "fcmae: warning: Cannot write" in err and "No space left on device" in err
    assert "Traceback" not in err and "Exception in thread" not in err


# 4. Identity checked against every record, the checkpoint's own configuration included.


def pretrain(run, *extra):
    return main(["pretrain", *TINY, "--output-dir", str(run), *extra])


def test_deleted_records_do_not_let_another_setting_through(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, "--epochs", "1") == 0
    (run / "identity.yaml").unlink()
    (run / "config.yaml").unlink()
    capsys.readouterr()
    changed = ["--mask-ratio", "0.5", "--lr", "0.001", "--weight-decay", "0.1", "--epochs", "2"]
    assert pretrain(run, *changed) == 1
    said = capsys.readouterr().err
    assert "mask_ratio 0.6 -> 0.5" in said and "weight_decay" in said and "lr None -> 0.001" in said
    assert not (run / "identity.yaml").exists()  # refused before anything was written


def test_a_record_with_a_setting_removed_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, "--epochs", "1") == 0
    record = yaml.safe_load((run / "identity.yaml").read_text())
    del record["settings"]["mask_ratio"]
    (run / "identity.yaml").write_text(yaml.safe_dump(record))
    capsys.readouterr()
    assert pretrain(run, "--epochs", "2", "--mask-ratio", "0.5") == 1
    said = capsys.readouterr().err
    assert "identity.yaml lacks mask_ratio" in said and "restore it" in said


def test_a_record_that_contradicts_the_checkpoint_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, "--epochs", "1") == 0
    record = yaml.safe_load((run / "identity.yaml").read_text())
    record["settings"]["mask_ratio"] = 0.5
    (run / "identity.yaml").write_text(yaml.safe_dump(record))
    capsys.readouterr()
    assert pretrain(run, "--epochs", "2", "--mask-ratio", "0.5") == 1
    said = capsys.readouterr().err
    assert "identity.yaml says mask_ratio 0.5 where checkpoint-0001.pth says 0.6" in said


def test_a_setting_no_record_holds_is_a_change_to_accept(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, "--epochs", "1") == 0
    # As an older fcmae left it: no record, the checkpoint's included, knows decoder_depth.
    path = run / "checkpoints" / "checkpoint-0001.pth"
    content = read(path)
    del content["config"]["decoder_depth"]
    save_atomic(content, path)
    for name in ("identity.yaml", "config.yaml"):
        record = yaml.safe_load((run / name).read_text())
        (record.get("settings") or record).pop("decoder_depth")
        (run / name).write_text(yaml.safe_dump(record))
    capsys.readouterr()
    assert pretrain(run, "--epochs", "2") == 1
    said = capsys.readouterr().err
    assert "decoder_depth '(unrecorded)' -> 1" in said and "--accept-changes decoder_depth" in said
    assert pretrain(run, "--epochs", "2", "--accept-changes", "decoder_depth") == 0


def test_a_start_that_saved_no_checkpoint_binds_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    # The loss is nan at the first step (too high an lr): nothing is saved.
    assert pretrain(run, "--epochs", "1", "--lr", "1e30") == 1
    said = capsys.readouterr().err
    assert "The loss became" in said and "No checkpoint was written yet" in said
    assert pretrain(run, "--epochs", "1", "--lr", "1e-3") == 0  # the advice, followed
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records].count("run") == 1  # the failed start's records are gone


def test_data_smaller_than_one_step_is_refused_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        Image.fromarray(np.full((64, 64, 3), 30 * i, np.uint8)).save(data / f"{i}.png")
    run = tmp_path / "run"
    args = ["--data", str(data), "--epochs", "1", "--effective-batch", "4096"]
    assert pretrain(run, *args) == 1
    assert "smaller than one optimizer step" in capsys.readouterr().err and not run.exists()
    assert pretrain(run, *args[:-2], "--effective-batch", "4") == 0  # the advice, followed


def test_an_accepted_change_stays_accepted_until_the_next_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, "--epochs", "1") == 0
    assert pretrain(run, "--epochs", "1", "--seed", "1", "--accept-changes", "seed") == 0
    record = yaml.safe_load((run / "identity.yaml").read_text())
    assert record["settings"]["seed"] == 1 and record["accepted"] == {"seed": 0}
    assert pretrain(run, "--epochs", "2", "--seed", "1") == 0  # accepted before: goes on
    assert pretrain(run, "--epochs", "2", "--seed", "0") == 1


# 5. Clean-up and pruning touch only the run's own files.


def test_the_users_files_in_checkpoints_survive_clean_up_and_pruning(tmp_path):
    run = tmp_path / "run"
    assert pretrain(run, "--epochs", "1") == 0
    folder = run / "checkpoints"
    (folder / "encoder-0050.pth").write_bytes(b"the user's own")
    (folder / (".encoder-0003.pth.tmp-" + "0" * 32)).write_bytes(b"the user's too")
    assert main(["export", "--checkpoint", str(folder / "encoder-0001.pth"), "--output",
                 str(folder / "encoder-0040.pth")]) == 0  # fmt: skip
    assert pretrain(run, "--epochs", "4", "--keep-last", "1") == 0
    names = sorted(p.name for p in folder.iterdir())
    assert "encoder-0050.pth" in names and "encoder-0040.pth" in names
    assert ".encoder-0003.pth.tmp-" + "0" * 32 in names
    assert "checkpoint-0001.pth" not in names and "checkpoint-0004.pth" in names


def test_a_users_file_where_the_run_will_write_is_refused_before_training(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "encoder-0002.pth").write_bytes(b"the user's own")
    assert pretrain(run, "--epochs", "2", "--save-every", "1") == 1
    said = capsys.readouterr().err
    assert "encoder-0002.pth is in the way" in said and "move it away" in said
    assert (run / "checkpoints" / "encoder-0002.pth").read_bytes() == b"the user's own"
    assert not (run / "log.txt").exists()


def test_a_users_readme_in_the_output_dir_is_left_alone(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "README.md").write_text("my notes")
    assert pretrain(run, "--epochs", "1") == 0
    assert (run / "README.md").read_text() == "my notes"


# 8. Advice that fits the fault.


def test_a_checkpoint_that_is_a_folder_or_a_device_is_said_so(tmp_path, capsys):
    (tmp_path / "folder.pth").mkdir()
    (tmp_path / "zero.pth").symlink_to("/dev/zero")
    for path, said in (("folder.pth", "is a folder"), ("zero.pth", "is not a regular file")):
        assert main(["eval", "--checkpoint", str(tmp_path / path), "--data", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert said in err and "does not exist" not in err


def test_data_with_no_readable_image_is_refused_before_the_run_directory(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"{i}.jpg").write_text("not an image")
    run = tmp_path / "run"
    assert main(["pretrain", *TINY, "--data", str(data), "--output-dir", str(run)]) == 1
    said = capsys.readouterr().err
    assert "None of the 12 images can be read" in said and "optimizer step" not in said
    assert not run.exists()


# Outputs of the commands that write outside a run directory: never over what is not theirs.


@pytest.fixture
def encoder(tmp_path):
    path = tmp_path / "encoder.pth"
    torch.save({"model": fcmae.create_model("convnextv2_atto", head=False).state_dict()}, path)
    return path


def test_an_export_over_a_pipe_a_link_or_a_users_file_is_refused(tmp_path, encoder, capsys):
    os.mkfifo(tmp_path / "pipe.safetensors")
    (tmp_path / "gone.pth").symlink_to(tmp_path / "nowhere" / "x.pth")
    (tmp_path / "mine.pth").write_bytes(b"the user's")
    cases = {
        "pipe.safetensors": "which is not a regular file",
        "gone.pth": "is a link",
        "mine.pth": "already exists and was not written by fcmae; pass --overwrite",
    }
    for name, said in cases.items():
        assert main(["export", "--checkpoint", str(encoder), "--output", str(tmp_path / name)]) == 1
        assert said in capsys.readouterr().err
    assert (tmp_path / "pipe.safetensors").is_fifo() and not (tmp_path / "nowhere").exists()
    assert (tmp_path / "mine.pth").read_bytes() == b"the user's"


@needs_root
def test_an_export_over_a_device_is_refused_and_leaves_it(tmp_path, encoder, capsys):
    device = tmp_path / "null"
    os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (tmp_path / "null.pth").symlink_to(device)
    for path in (device, tmp_path / "null.pth"):
        assert main(["export", "--checkpoint", str(encoder), "--output", str(path)]) == 1
    assert device.is_char_device() and "Traceback" not in capsys.readouterr().err


def test_pictures_replace_their_own_png_but_not_the_users(tmp_path, capsys):
    run = tmp_path / "run"
    assert pretrain(run, "--epochs", "1") == 0
    (tmp_path / "mine.png").write_bytes(b"the user's picture")
    plot = ["plot", str(run), "--output"]
    assert main([*plot, str(tmp_path / "mine.png")]) == 1
    assert "not written by fcmae" in capsys.readouterr().err
    assert main([*plot, str(tmp_path / "curves.png")]) == 0
    assert main([*plot, str(tmp_path / "curves.png")]) == 0  # its own: drawn again
    assert main([*plot, str(tmp_path / "mine.png"), "--overwrite"]) == 0
    assert (tmp_path / "mine.png").read_bytes()[:4] == b"\x89PNG"


def test_knn_does_not_replace_the_users_feature_files(tmp_path, encoder, capsys):
    from helpers import write_image_folder

    for split in ("train", "val"):
        write_image_folder(tmp_path / "data" / split, classes=2, per_class=3, size=32)
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "train.pt").write_bytes(b"the user's")
    args = ["knn", "--pretrained", str(encoder), "--data", str(tmp_path / "data"), "--k", "2"]
    args += ["--input-size", "32", "--device", "cpu", "--save-features"]
    assert main([*args, str(tmp_path / "features")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "features" / "train.pt").read_bytes() == b"the user's"


@needs_root
def test_a_hub_folder_cut_short_by_a_full_disk_is_written_by_the_same_command_later(disk, encoder):
    root = disk("4m")  # the weights (about 13 MiB) do not fit
    args = ["export", "--checkpoint", encoder, "--hub-dir", root / "hub"]
    status, _, stderr = fcmae_cli(*args)
    assert status == 1 and "No space left on device" in one_sentence(stderr)
    assert not any((root / "hub").iterdir())
    subprocess.run(["mount", "-o", "remount,size=300m", str(root)], check=True)
    status, _, stderr = fcmae_cli(*args)
    assert status == 0, stderr
    assert sorted(p.name for p in (root / "hub").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]


def test_a_run_from_before_manifests_keeps_the_users_exports(tmp_path):
    run = tmp_path / "run"
    assert pretrain(run, "--epochs", "1") == 0
    (run / "manifest.json").unlink()  # as an older fcmae left the directory
    (run / "checkpoints" / "encoder-0050.pth").write_bytes(b"the user's")
    assert pretrain(run, "--epochs", "2") == 0
    assert (run / "checkpoints" / "encoder-0050.pth").read_bytes() == b"the user's"
    assert (run / "checkpoints" / "checkpoint-0002.pth").is_file()


@needs_root
def test_an_output_dir_on_a_bind_mount_of_the_data_is_refused(tmp_path, capsys):
    data, view = tmp_path / "data", tmp_path / "view"
    data.mkdir()
    view.mkdir()
    for i in range(4):
        Image.fromarray(np.full((64, 64, 3), 40 * i, np.uint8)).save(data / f"{i}.png")
    subprocess.run(["mount", "--bind", str(data), str(view)], check=True)
    try:
        assert pretrain(view / "run", "--data", str(data), "--effective-batch", "4") == 1
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)
    assert "lies inside --data" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == [f"{i}.png" for i in range(4)]
