"""Frozen-encoder evaluations: the linear probe (through the engine), kNN, saved features."""

import logging

import pytest
import torch
from helpers import randomize_, write_image_folder
from torch import nn

import fcmae
from fcmae.cli import main
from fcmae.config.schema import resolve
from fcmae.finetune.config import EvalConfig, KnnConfig, LinprobeConfig
from fcmae.finetune.evaluate import run as evaluate_checkpoint
from fcmae.finetune.knn import knn_predict
from fcmae.finetune.knn import run as run_knn
from fcmae.finetune.linprobe import run as linprobe
from fcmae.finetune.probe import LinearProbe


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_image_folder(root / "train", classes=3, per_class=12, seed=0)
    write_image_folder(root / "val", classes=3, per_class=4, seed=1)
    return root


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A (random) encoder checkpoint in the layout FCMAE pretraining exports."""
    path = tmp_path_factory.mktemp("encoder") / "encoder.pth"
    encoder = randomize_(fcmae.create_model("convnextv2_atto", head=False), scale=0.05)
    torch.save({"model": encoder.state_dict()}, path)
    return path


def test_the_probe_is_batchnorm_without_affine_then_linear_on_pooled_features():
    encoder = fcmae.create_model("convnextv2_atto", head=False)
    probe = LinearProbe(encoder, num_classes=4).train()
    norm, linear = probe.head
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert (linear.in_features, linear.out_features) == (320, 4)
    assert not encoder.training  # drop path and the like stay off
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == [
        "head.1.weight",
        "head.1.bias",
    ]
    x = torch.randn(4, 3, 32, 32)
    pooled = encoder.forward_features(x).mean(dim=(2, 3))
    assert torch.allclose(probe(x), linear(norm(pooled)), atol=1e-5)


def test_linprobe_trains_the_head_only_and_learns(labelled, encoder_file, tmp_path, capsys):
    out = tmp_path / "run"
    result = linprobe(
        resolve(
            LinprobeConfig,
            flags={
                "data": str(labelled),
                "pretrained": str(encoder_file),
                "output_dir": str(out),
                "input_size": 32,
                "batch_size": 6,
                "effective_batch": None,
                "epochs": 3,
                "warmup_epochs": 0,
                "lr": 1e-2,
                "num_workers": 0,
                "device": "cpu",
            },
        )
    )
    assert result["val_acc1"] > 66  # chance: 33.3%
    trained = torch.load(out / "checkpoints" / "checkpoint-0003.pth", weights_only=True)["model"]
    original = torch.load(encoder_file, weights_only=True)["model"]
    assert all(torch.equal(trained[f"encoder.{k}"], v) for k, v in original.items())
    assert (out / "checkpoints" / "checkpoint-best.pth").is_file()

    # fcmae eval takes the probe's checkpoint and finds its last epoch's score again
    last = str(out / "checkpoints" / "checkpoint-0003.pth")
    scored = evaluate_checkpoint(
        resolve(
            EvalConfig,
            flags={"checkpoint": last, "data": str(labelled / "val"), "input_size": 32},
        )
    )
    assert scored["acc1"] == pytest.approx(result["val_acc1"])
    # fcmae export keeps the encoder and says why the probe's head stays behind
    assert main(["export", "--checkpoint", last, "--output", str(tmp_path / "p.safetensors")]) == 0
    assert "head has no counterpart" in capsys.readouterr().out


def test_knn_on_frozen_features_and_the_features_it_saves(labelled, encoder_file, tmp_path):
    results = run_knn(
        resolve(
            KnnConfig,
            flags={
                "data": str(labelled),
                "pretrained": str(encoder_file),
                "input_size": 32,
                "num_workers": 0,
                "k": 5,
                "save_features": str(tmp_path / "features"),
            },
        )
    )
    train = torch.load(tmp_path / "features" / "train.pt", weights_only=True)
    val = torch.load(tmp_path / "features" / "val.pt", weights_only=True)
    assert train["features"].shape == (36, 320) and val["features"].shape == (12, 320)
    assert train["classes"] == ["class0", "class1", "class2"]
    assert val["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert val["files"][0].endswith("class0/0.png")
    scores = knn_predict(train["features"], train["labels"], val["features"], 3, k=5)
    again = 100.0 * (scores.argmax(1) == val["labels"]).float().mean().item()
    assert results["acc1"] == pytest.approx(again) and results["acc1"] > 66
    assert "acc5" not in results  # three classes: top-5 would always be 100%


def test_knn_says_when_k_exceeds_the_train_set(labelled, encoder_file, caplog):
    flags = {"data": str(labelled), "pretrained": str(encoder_file), "input_size": 32, "k": 100}
    with caplog.at_level(logging.WARNING, logger="fcmae"):
        run_knn(resolve(KnnConfig, flags={**flags, "num_workers": 0}))
    assert "--k 100 exceeds the 36 train images: using k=36." in caplog.text
