"""The finetune job end to end on atto: pretrain -> fine-tune learns, best/last/EMA
checkpoints, resume, `fcmae eval` agreeing with the run, and bad input as one sentence."""

import json
import shutil

import pytest
import timm
import torch
from helpers import randomize_, write_image_folder

import fcmae
from fcmae.cli import main
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.finetune.config import EvalConfig, FinetuneConfig
from fcmae.finetune.evaluate import run as evaluate_checkpoint
from fcmae.finetune.finetune import run as finetune
from fcmae.pretrain.job import run as pretrain

FAST = {
    "input_size": 32,
    "batch_size": 8,
    "effective_batch": None,
    "num_workers": 0,
    "device": "cpu",
    "warmup_epochs": 0,
    "lr": 2e-3,
    "save_every": 1,
}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_image_folder(root / "train", classes=3, per_class=16, seed=0)
    write_image_folder(root / "val", classes=3, per_class=6, seed=1)
    return root


@pytest.fixture(scope="module")
def encoder(labelled, tmp_path_factory):
    """A few FCMAE steps on the training images (labels unused): the exported encoder."""
    out = tmp_path_factory.mktemp("pretrain")
    cfg = resolve(
        PretrainConfig,
        flags={
            **FAST,
            "data": str(labelled / "train"),
            "output_dir": str(out),
            "input_size": 64,
            "epochs": 1,
            "blr": 0.01,
            "lr": None,
        },
    )
    pretrain(cfg)
    return out / "checkpoints" / "encoder-0001.pth"


def epochs(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "epoch"]


def test_a_pretrained_encoder_fine_tunes_above_chance_resumes_and_evaluates(
    labelled, encoder, tmp_path, capsys
):
    out = tmp_path / "run"
    flags = {
        **FAST,
        "data": str(labelled),
        "pretrained": str(encoder),
        "output_dir": str(out),
        "auto_augment": None,
        "reprob": 0.0,
        "model_ema_decay": 0.8,
    }
    finetune(resolve(FinetuneConfig, flags={**flags, "epochs": 3}))
    result = finetune(
        resolve(FinetuneConfig, flags={**flags, "epochs": 4})
    )  # resumes after epoch 3

    log = (out / "log.txt").read_text()
    assert (
        "Not in the checkpoint, initialised fresh: norm.weight, norm.bias, head.weight, "
        "head.bias." in log
    )
    assert "Resumed from" in log and result["epoch"] == 4
    assert result["val_acc1"] > 66 and result["ema_acc1"] > 66  # chance: 33.3%
    records = epochs(out)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    scores = [max(r["val_acc1"], r["ema_acc1"]) for r in records]
    checkpoints = out / "checkpoints"
    best = torch.load(checkpoints / "checkpoint-0004.pth", weights_only=True)["extra"]["evaluator"]
    # The best of the epochs before the resume still counts: only a better score moves it.
    assert (best["acc1"], best["epoch"]) == (max(scores), scores.index(max(scores)) + 1)
    assert records[-1]["best_acc1"] == max(scores)

    for name in ["checkpoint-0004.pth", "ema-0004.pth", "checkpoint-best.pth", "ema-best.pth"]:
        assert (checkpoints / name).is_file(), name
    for name, key in [("checkpoint-0004.pth", "val_acc1"), ("ema-0004.pth", "ema_acc1")]:
        cfg = resolve(
            EvalConfig,
            flags={
                "checkpoint": str(checkpoints / name),
                "input_size": 32,
                "data": str(labelled / "val"),
                "num_workers": 0,
            },
        )
        assert evaluate_checkpoint(cfg)["acc1"] == pytest.approx(result[key]), name

    renamed = shutil.copytree(labelled / "val", tmp_path / "renamed")
    (renamed / "class1").rename(renamed / "classB")  # same count, another class
    ema = str(checkpoints / "ema-best.pth")
    assert main(["eval", "--checkpoint", ema, "--data", str(renamed), "--input-size", "32"]) == 1
    assert "not those" in capsys.readouterr().err


def test_without_pretrained_it_trains_from_scratch(labelled, tmp_path):
    out = tmp_path / "run"
    result = finetune(
        resolve(
            FinetuneConfig,
            flags={
                **FAST,
                "data": str(labelled),
                "output_dir": str(out),
                "epochs": 1,
                "mixup": 0.8,
                "cutmix": 1.0,
                "model_ema": False,
            },
        )
    )
    assert "training convnextv2_atto from scratch" in (out / "log.txt").read_text()
    assert "ema_acc1" not in result and 0 <= result["val_acc1"] <= 100
    assert not (out / "checkpoints" / "ema-0001.pth").exists()


def save(tmp_path, name, state):
    torch.save(state, tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "other size",
            "is a convnextv2_femto checkpoint but --model is convnextv2_atto; pass "
            "--model convnextv2_femto.",
        ),
        ("unrelated", "holds no ConvNeXt V2 or FCMAE weights of a known size"),
        ("num classes", "--num-classes 4 disagrees with the 3 class folders"),
    ],
)
def test_bad_finetune_input_is_one_sentence_and_makes_no_run_dir(
    labelled, tmp_path, capsys, case, message
):
    args = ["finetune", "--data", str(labelled), "--output-dir", str(tmp_path / "run")]
    if case == "other size":
        femto = fcmae.create_model("convnextv2_femto", head=False)
        args += ["--pretrained", save(tmp_path, "femto.pth", {"model": femto.state_dict()})]
    elif case == "unrelated":
        args += ["--pretrained", save(tmp_path, "x.pth", {"weights": torch.zeros(3)})]
    else:
        args += ["--num-classes", "4"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert message in err and err.startswith("fcmae: error: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("encoder", "has no classifier head; fine-tune it first"),
        ("head size", "has 5 classes but"),
    ],
)
def test_eval_refuses_a_checkpoint_that_cannot_classify_the_folder(
    labelled, tmp_path, capsys, case, message
):
    model = (
        fcmae.create_model("convnextv2_atto", head=False)
        if case == "encoder"
        else fcmae.create_model("convnextv2_atto", num_classes=5)
    )
    path = save(tmp_path, "m.pth", {"model": model.state_dict()})
    assert main(["eval", "--checkpoint", path, "--data", str(labelled / "val")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_export_command_round_trips_through_timm(tmp_path, capsys):
    model = randomize_(fcmae.create_model("convnextv2_atto", num_classes=3), scale=0.05).eval()
    source = save(tmp_path, "ours.pth", {"model": model.state_dict(), "epoch": 3})
    output = tmp_path / "out" / "atto.safetensors"
    assert main(["export", "--checkpoint", source, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert f'pretrained_cfg_overlay=dict(file="{output}", num_classes=3)' in printed
    theirs = timm.create_model(
        "convnextv2_atto",
        pretrained=True,
        num_classes=3,
        pretrained_cfg_overlay=dict(file=str(output), num_classes=3),
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    assert (theirs(x) - model(x)).abs().max() < 1e-4
