"""The kNN monitor of pretraining (--monitor-data), and the refusals of the tracking and
monitoring options: one sentence each, nothing written."""

import json

import pytest
from helpers import free_port, write_image_folder

from fcmae.cli import main
from fcmae.config.schema import resolve
from fcmae.finetune import knn
from fcmae.finetune.config import KnnConfig


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_image_folder(root / "train", classes=3, per_class=5, size=64, seed=0)
    write_image_folder(root / "val", classes=3, per_class=3, size=64, seed=1)
    return root


def pretrain(out, *extra):
    return [
        "pretrain",
        *("--epochs", "3", "--demo-images", "16", "--batch-size", "8", "--input-size", "64"),
        *("--recon-every", "0", "--num-workers", "0", "--device", "cpu", "--save-every", "1"),
        *("--output-dir", str(out), *extra),
    ]


def records(run, kind):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_the_monitor_measures_as_fcmae_knn_and_leaves_training_alone(labelled, tmp_path):
    watched, plain = tmp_path / "watched", tmp_path / "plain"
    every = ("--monitor-data", str(labelled), "--monitor-every", "2")
    assert main(pretrain(watched, *every)) == 0
    epochs = records(watched, "epoch")
    measured = {r["epoch"]: r["knn_acc1"] for r in epochs if "knn_acc1" in r}
    assert sorted(measured) == [2, 3]  # every 2 epochs, and at the end
    for epoch, acc in measured.items():
        encoder = watched / "checkpoints" / f"encoder-{epoch:04d}.pth"
        flags = {"pretrained": str(encoder), "data": str(labelled), "input_size": 64}
        assert knn.run(resolve(KnnConfig, flags={**flags, "device": "cpu"}))["acc1"] == acc
    assert "kNN monitor after epoch 2: top-1" in (watched / "log.txt").read_text()

    assert main(pretrain(plain)) == 0  # the same run unwatched trains exactly alike
    assert [r["loss"] for r in records(plain, "step")] == [
        r["loss"] for r in records(watched, "step")
    ]


@pytest.mark.parametrize(
    "case",
    [
        "flat folder",
        "one class",
        "val in data",
        "every 0",
        "unknown tracker",
        "unreachable",
        "W&B unreachable",
    ],
)
def test_bad_tracking_and_monitoring_input_is_one_sentence_and_writes_nothing(
    case, labelled, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)  # logged in: W&B online
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    flat = tmp_path / "flat"
    write_image_folder(flat, classes=1, per_class=2, size=64)
    single = tmp_path / "single"
    for part in ("train", "val"):
        write_image_folder(single / part, classes=1, per_class=2, size=64)
    extra, said = {
        "flat folder": (("--monitor-data", str(flat / "class0")), "has no train/ folder"),
        "one class": (("--monitor-data", str(single)), "holds one class"),
        "val in data": (
            ("--monitor-data", str(labelled), "--data", str(labelled), "--warmup-epochs", "1"),
            "so pretraining would see them",
        ),
        "every 0": (("--monitor-every", "0"), "monitor_every must lie in (0,"),
        "unknown tracker": (("--track", "tensorboard"), "--track 'tensorboard' is not a tracker"),
        "unreachable": (("--track", "mlflow"), "cannot be reached (connection refused)"),
        "W&B unreachable": (("--track", "wandb"), "cannot be reached (connection refused)"),
    }[case]
    out = tmp_path / "run"
    assert main(pretrain(out, *extra)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err, err
    if "unreachable" in case:
        assert "http://127.0.0.1:" in err and "--track" in err
    assert not out.exists() and not (tmp_path / "runs").exists()  # nothing written
