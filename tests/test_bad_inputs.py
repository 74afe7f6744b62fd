"""Every subcommand's refusals: one `error:` sentence, no traceback, nothing written.

Each case runs the CLI in-process on a scratch folder that holds a tiny image folder, an
encoder export, a pretraining checkpoint, a plain file, a text file named like a checkpoint, a
tar shard without images and a pickle that would run code; after the refusal the folder must
hold exactly what it held.
"""

import os
import subprocess
import sys
import tarfile

import pytest
import torch
from helpers import write_image_folder

import fcmae
from fcmae.cli import main
from fcmae.config.yaml_io import write_yaml
from fcmae.run.identity import write_identity
from fcmae.run.layout import CONFIG, IDENTITY
from fcmae.run.manifest import Manifest


class Exploit:
    """A pickle that would run a shell command when loaded without weights_only."""

    def __reduce__(self):
        return (subprocess.call, (["touch", "/tmp/fcmae-exploit-ran"],))


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_image_folder(root / "images", classes=2, per_class=2, size=32)
    for split in ("train", "val"):
        write_image_folder(root / "labelled" / split, classes=2, per_class=2, size=32)
    write_image_folder(root / "three" / "x", classes=3, per_class=1, size=32)
    model = fcmae.create_model("fcmae_convnextv2_atto")
    torch.save({"model": model.encoder.state_dict()}, root / "encoder.pth")
    torch.save({"model": model.state_dict(), "epoch": 1}, root / "pretrain.pth")
    (root / "file").write_text("not a folder\n")
    with tarfile.open(root / "text.tar", "w") as shard:  # a WebDataset shard without images
        shard.add(root / "file", "000000.txt")
    (root / "text.pth").write_text("not a checkpoint\n")
    torch.save({"model": Exploit()}, root / "exploit.pth")
    (root / "empty-run").mkdir()
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text('{"type": "step", "step": 1, "loss": 1.0}\n')
    (root / "twice.yaml").write_text("seed: 1\nblr: 0.001\nseed: 2\n")
    settings = {"model": "convnextv2_atto", "drop_path": 0.1}
    finetune_run = Manifest(root / "finetune-run")  # as fcmae finetune leaves one
    write_identity(finetune_run.claim(finetune_run.root / IDENTITY), "fcmae finetune", settings, {})
    write_yaml(settings, finetune_run.claim(finetune_run.root / CONFIG))
    # Before identity.yaml and manifest.json: config.yaml alone.
    write_yaml(settings, root / "finetune-run-old" / CONFIG)
    return root


PRETRAIN = ["pretrain", "--data", "{p}/images", "--output-dir", "{p}/out", "--input-size", "64"]
LABELLED = ["--data", "{p}/labelled", "--output-dir", "{p}/out", "--input-size", "64"]
FINETUNE = ["finetune", *LABELLED]
LINPROBE = ["linprobe", *LABELLED]
KNN = ["knn", "--data", "{p}/labelled", "--input-size", "64"]
EVAL = ["eval", "--data", "{p}/labelled/val"]
EXPORT = ["export", "--output", "{p}/out/x.safetensors"]
ENCODER = "{p}/encoder.pth"
SWEEP = ["sweep", "--data", "{p}/images", "--eval-data", "{p}/labelled", "--output-dir", "{p}/out"]
VISUALIZE = ["visualize", "--checkpoint", "{p}/pretrain.pth", "--output", "{p}/out/r.png"]

CASES = {
    # flags with a range
    **{
        f"pretrain {flag} {value}": [*PRETRAIN, flag, value]
        for flag, value in [
            ("--lr", "-1"),
            ("--lr", "nan"),
            ("--blr", "nan"),
            ("--blr", "0"),
            ("--min-lr", "-1"),
            ("--clip-grad", "-1"),
            ("--seed", "-1"),
            ("--patch-size", "0"),
            ("--patch-size", "48"),
            ("--input-size", "0"),
            ("--input-size", "-32"),
            ("--input-size", "100"),
            ("--mask-ratio", "1.0"),
            ("--mask-ratio", "0"),
            ("--mask-ratio", "0.99"),
            ("--mask-ratio", "inf"),
            ("--epochs", "0"),
            ("--warmup-epochs", "-1"),
            ("--batch-size", "0"),
            ("--effective-batch", "0"),
            ("--accum-iter", "0"),
            ("--weight-decay", "-0.1"),
            ("--save-every", "0"),
            ("--keep-last", "0"),
            ("--log-every", "0"),
            ("--num-workers", "-1"),
            ("--device", "gpu"),
            ("--precision", "fp8"),
            ("--model", "convnextv2_giant"),
            ("--backend", "minkowsky"),
            ("--in-chans", "2"),
            ("--decoder-depth", "0"),
            ("--decoder-dim", "0"),
            ("--recon-every", "-1"),
            ("--epochs", "ten"),
            ("--patch-size", "64"),  # one patch at 64 px: nothing for a mask to split
            ("--min-lr", "1"),  # above the peak lr that --blr and the effective batch give
        ]
    },
    "pretrain --min-lr above --lr": [*PRETRAIN, "--lr", "1e-4", "--min-lr", "1"],
    "pretrain --accept-changes an unknown key": [*PRETRAIN, "--accept-changes", "colour"],
    "pretrain --config with a key twice": [*PRETRAIN, "--config", "{p}/twice.yaml"],
    "pretrain into a finetune run directory": [*PRETRAIN, "--output-dir", "{p}/finetune-run"],
    "pretrain into a finetune run directory of an earlier version": [
        *PRETRAIN,
        *"--output-dir {p}/finetune-run-old".split(),
    ],
    # an output that is an input
    "export --output the --checkpoint": ["export", "--checkpoint", ENCODER, "--output", ENCODER],
    "visualize --output the --checkpoint": [*VISUALIZE, "--output", "{p}/pretrain.pth"],
    "visualize --output a .pth": [*VISUALIZE, "--output", "{p}/encoder.pth"],
    "visualize --output inside --data": [
        *VISUALIZE,
        *"--data {p}/images --output {p}/images/class0/0.png".split(),
    ],
    "plot --output the run's metrics.jsonl": "plot {p}/run --output {p}/run/metrics.jsonl".split(),
    "plot --output a checkpoint": ["plot", "{p}/run", "--output", "{p}/pretrain.pth"],
    "pretrain --betas": [*PRETRAIN, "--betas", "1", "0.5"],
    **{
        f"{args[0]} {flag} {value}": [*args, flag, value]
        for args in (FINETUNE, LINPROBE)
        for flag, value in [
            ("--lr", "-1"),
            ("--epochs", "0"),
            ("--input-size", "16"),
            ("--crop-pct", "0"),
            ("--batch-size", "0"),
            ("--seed", "-1"),
        ]
    },
    **{
        f"finetune {flag} {value}": [*FINETUNE, flag, value]
        for flag, value in [
            ("--layer-decay", "0"),
            ("--smoothing", "1.5"),
            ("--mixup", "-1"),
            ("--drop-path", "1.5"),
            ("--num-classes", "0"),
            ("--model-ema-decay", "2"),
            ("--reprob", "2"),
        ]
    },
    **{
        f"knn {flag} {value}": [*KNN, flag, value]
        for flag, value in [("--k", "0"), ("--temperature", "0"), ("--temperature", "nan")]
    },
    "eval --batch-size 0": [*EVAL, "--checkpoint", "{p}/encoder.pth", "--batch-size", "0"],
    "visualize --mask-ratio 1.5": [*VISUALIZE, "--mask-ratio", "1.5"],
    "visualize --mask-ratio 0.99": [*VISUALIZE, "--mask-ratio", "0.99", "--input-size", "64"],
    "visualize --images 0": [*VISUALIZE, "--images", "0"],
    "visualize --seed -1": [*VISUALIZE, "--seed", "-1"],
    "visualize --input-size 100": [*VISUALIZE, "--input-size", "100"],
    "sweep ratio 1.0": [*SWEEP, "--set", "mask_ratio=0.5,1.0"],
    "sweep patch 48": [*SWEEP, "--set", "patch_size=32,48"],
    "sweep unknown key": [*SWEEP, "--set", "colour=1,2"],
    "sweep one value": [*SWEEP, "--set", "mask_ratio=0.5"],
    "sweep repeated value": [*SWEEP, "--set", "mask_ratio=0.5,0.5"],
    "sweep no --set": SWEEP,
    # paths: missing, under a file, the wrong kind of file, a pickle exploit
    "pretrain --data missing": [*PRETRAIN, "--data", "{p}/nowhere"],
    "pretrain --data a file": [*PRETRAIN, "--data", "{p}/file"],
    "pretrain --output-dir under a file": [*PRETRAIN, "--output-dir", "{p}/file/run"],
    "pretrain --resume missing": [*PRETRAIN, "--resume", "{p}/nowhere.pth"],
    "pretrain --resume text": [*PRETRAIN, "--resume", "{p}/text.pth"],
    "pretrain --resume exploit": [*PRETRAIN, "--resume", "{p}/exploit.pth"],
    "pretrain --config missing": [*PRETRAIN, "--config", "{p}/nowhere.yaml"],
    "pretrain --config a checkpoint": [*PRETRAIN, "--config", "{p}/encoder.pth"],
    **{
        f"{args[0]} {case}": [*args, *extra]
        for args in (FINETUNE, LINPROBE)
        for case, extra in [
            ("--data missing", ["--data", "{p}/nowhere"]),
            ("--data without train/", ["--data", "{p}/images"]),
            ("--train a file", ["--train", "{p}/file", "--val", "{p}/labelled/val"]),
            ("--pretrained missing", ["--pretrained", "{p}/nowhere.pth"]),
            ("--pretrained text", ["--pretrained", "{p}/text.pth"]),
            ("--pretrained exploit", ["--pretrained", "{p}/exploit.pth"]),
            ("--output-dir under a file", ["--output-dir", "{p}/file/run"]),
        ]
    },
    "knn --data missing": [*KNN, "--data", "{p}/nowhere"],
    "knn --train shards": [*KNN, "--train", "{p}/text.tar", "--val", "{p}/labelled/val"],
    # WebDataset shards
    "pretrain --data shards matching nothing": [*PRETRAIN, "--data", "{p}/nowhere-{{0..3}}.tar"],
    "pretrain --data a shard without images": [*PRETRAIN, "--data", "{p}/text.tar"],
    "finetune --data shards": [*FINETUNE, "--data", "{p}/text.tar"],
    "finetune --train shards without classes.json": [
        *FINETUNE,
        "--train",
        "{p}/text.tar",
        "--val",
        "{p}/labelled/val",
    ],
    "linprobe --train a shard without images": [
        *LINPROBE,
        "--train",
        "{p}/text.tar",
        "--val",
        "{p}/labelled/val",
        "--num-classes",
        "2",
    ],
    # Hub names that are no ConvNeXt V2 release, refused before any download
    "finetune --pretrained a Hub name of another model": [
        *FINETUNE,
        "--pretrained",
        "timm/resnet50.a1_in1k",
    ],
    "knn --pretrained a timm name it does not release": [
        *KNN,
        "--pretrained",
        "hf-hub:timm/convnextv2_atto.bogus",
    ],
    "knn --pretrained missing": [*KNN, "--pretrained", "{p}/nowhere.pth"],
    "knn --pretrained exploit": [*KNN, "--pretrained", "{p}/exploit.pth"],
    "knn --save-features under a file": [*KNN, "--save-features", "{p}/file/feats"],
    "eval no --checkpoint": EVAL,
    "eval --checkpoint missing": [*EVAL, "--checkpoint", "{p}/nowhere.pth"],
    "eval --checkpoint an encoder": [*EVAL, "--checkpoint", "{p}/encoder.pth"],
    "eval --checkpoint text": [*EVAL, "--checkpoint", "{p}/text.pth"],
    "eval --checkpoint exploit": [*EVAL, "--checkpoint", "{p}/exploit.pth"],
    "eval --data missing": ["eval", "--checkpoint", "{p}/encoder.pth", "--data", "{p}/nowhere"],
    "export no --output": ["export", "--checkpoint", "{p}/encoder.pth"],
    "export --checkpoint missing": [*EXPORT, "--checkpoint", "{p}/nowhere.pth"],
    "export --checkpoint text": [*EXPORT, "--checkpoint", "{p}/text.pth"],
    "export --checkpoint exploit": [*EXPORT, "--checkpoint", "{p}/exploit.pth"],
    "export --output under a file": [
        "export",
        "--checkpoint",
        "{p}/encoder.pth",
        "--output",
        "{p}/file/x.safetensors",
    ],
    "export --output a folder": ["export", "--checkpoint", "{p}/encoder.pth", "--output", "{p}"],
    "sweep --eval-data missing": [*SWEEP, "--set", "mask_ratio=0.5,0.6", "--eval-data", "{p}/no"],
    "sweep --eval-data without val/": [
        *SWEEP,
        "--set",
        "mask_ratio=0.5,0.6",
        "--eval-data",
        "{p}/images",
    ],
    "visualize --checkpoint an encoder": [*VISUALIZE, "--checkpoint", "{p}/encoder.pth"],
    "visualize --checkpoint missing": [*VISUALIZE, "--checkpoint", "{p}/nowhere.pth"],
    "visualize --checkpoint exploit": [*VISUALIZE, "--checkpoint", "{p}/exploit.pth"],
    "visualize --data missing": [*VISUALIZE, "--data", "{p}/nowhere"],
    "visualize --output under a file": [*VISUALIZE, "--output", "{p}/file/r.png"],
    "plot an empty run": ["plot", "{p}/empty-run"],
    "plot a missing run": ["plot", "{p}/nowhere"],
    "plot a file": ["plot", "{p}/file"],
    "no subcommand's flag": ["pretrain", "--colour", "red"],
}


def snapshot(root):
    return sorted(
        (str(path.relative_to(root)), path.stat().st_size)
        for path in root.rglob("*")
        if path.is_file() or not any(path.iterdir())
    )


@pytest.mark.parametrize("argv", CASES.values(), ids=CASES.keys())
def test_a_bad_input_is_one_sentence_and_writes_nothing(place, argv, capsys):
    before = snapshot(place)
    try:
        code = main([arg.format(p=place) for arg in argv])
    except SystemExit as e:  # argparse's own refusals: unknown flags, values of the wrong type
        code = e.code
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err, err
    assert "error: " in err.strip().splitlines()[-1], err
    assert "weights_only=False" not in err
    assert snapshot(place) == before
    assert not os.path.exists("/tmp/fcmae-exploit-ran")


def test_the_minkowski_backend_without_its_package_names_the_install_script(
    place, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)  # import fails as if missing
    monkeypatch.delitem(sys.modules, "fcmae.sites.minkowski", raising=False)
    before = snapshot(place)
    code = main([arg.format(p=place) for arg in [*PRETRAIN, "--backend", "minkowski"]])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "not installed" in err and "bash scripts/install_minkowski.sh" in err, err
    assert snapshot(place) == before
