"""Every path option resolved once, at configuration time, and the one rule for what a command
writes against what it reads: refused in one sentence before anything is written."""

import os

import pytest
import torch
import yaml
from helpers import write_image_folder

import fcmae
from fcmae.cli import main
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.errors import ConfigError
from fcmae.finetune.config import FinetuneConfig
from fcmae.run.paths import check_outputs, resolved


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def refused(argv, root, capsys):
    """The CLI's one-line error for argv, checking that nothing under root changed."""
    before = snapshot(root)
    assert main([str(arg) for arg in argv]) == 1
    err = capsys.readouterr().err
    assert snapshot(root) == before
    assert err.startswith("fcmae: error: ") and err.count("\n") == 1, err
    return err


IMAGES, LABELLED = "unlabelled/images", "sets/labelled"  # each alone in its parent folder
TRAIN, VAL = "trainset/train", "valset/val"
# A run the commands would make of these inputs, tiny: only the output's place is wrong.
TINY = "--epochs 1 --warmup-epochs 0 --batch-size 2 --effective-batch none --input-size 64"


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """Inputs every command would accept: images (and a pretraining checkpoint in them), a
    labelled set (train/ and val/), train and val folders, an encoder and a run's metrics."""
    root = tmp_path_factory.mktemp("paths").resolve()
    for folder in (IMAGES, f"{LABELLED}/train", f"{LABELLED}/val", TRAIN, VAL):
        write_image_folder(root / folder, classes=2, per_class=2, size=32)
    model = fcmae.create_model("fcmae_convnextv2_atto")
    torch.save({"model": model.state_dict(), "epoch": 1}, root / IMAGES / "pretrain.pth")
    (root / "weights").mkdir()
    torch.save({"model": model.encoder.state_dict()}, root / "weights" / "encoder.pth")
    (root / "run").mkdir()
    (root / "run" / "metrics.jsonl").write_text('{"type": "step", "step": 1, "loss": 1.0}\n')
    return root


# (the output's place, the sentence's relation) for an input folder or file IN
RELATIONS = {
    "the input itself": ("{in}", "is the same file or folder as"),
    "inside the input": ("{in}/run", "lies inside"),
    "the input's parent": ("{in}/..", "holds"),
}


def expected(flag, output, relation, source_flag, source):
    return (
        f"{flag} {os.path.realpath(output)} {relation} {source_flag} {source}, which this "
        f"command reads; pass another {flag}, apart from {source_flag}."
    )


@pytest.mark.parametrize("where", RELATIONS)
@pytest.mark.parametrize(
    "command, inputs, flag",
    [
        ("pretrain", {"--data": IMAGES}, "--data"),
        ("finetune", {"--data": LABELLED}, "--data"),
        ("finetune", {"--train": TRAIN, "--val": VAL}, "--train"),
        ("finetune", {"--train": TRAIN, "--val": VAL}, "--val"),
        ("linprobe", {"--data": LABELLED}, "--data"),
        ("linprobe", {"--train": TRAIN, "--val": VAL}, "--train"),
        ("linprobe", {"--train": TRAIN, "--val": VAL}, "--val"),
        ("sweep", {"--data": IMAGES, "--eval-data": LABELLED}, "--data"),
        ("sweep", {"--data": IMAGES, "--eval-data": LABELLED}, "--eval-data"),
    ],
)
def test_a_training_run_directory_apart_from_its_inputs(
    place, capsys, command, inputs, flag, where
):
    source = place / inputs[flag]
    output, relation = (s.format(**{"in": source}) for s in RELATIONS[where])
    argv = [command, *(x for f, folder in inputs.items() for x in (f, place / folder))]
    argv += [*TINY.split(), "--output-dir", output]
    if command == "sweep":
        argv += ["--set", "mask_ratio=0.5,0.6", "--probe-epochs", "0"]
    err = refused(argv, place, capsys)
    assert (
        err.strip() == f"fcmae: error: {expected('--output-dir', output, relation, flag, source)}"
    )


@pytest.mark.parametrize("command", ["finetune", "linprobe"])
@pytest.mark.parametrize("where", ["the input itself", "the input's parent"])
def test_a_training_run_directory_apart_from_its_pretrained_encoder(place, capsys, command, where):
    encoder = place / "weights" / "encoder.pth"
    output, relation = (s.format(**{"in": encoder}) for s in RELATIONS[where])
    argv = [command, "--data", place / LABELLED, "--pretrained", encoder, *TINY.split()]
    argv += ["--output-dir", output]
    err = refused(argv, place, capsys)
    assert expected("--output-dir", output, relation, "--pretrained", encoder) in err


def test_knn_writes_no_features_into_the_folder_it_reads(place, capsys):
    features = place / LABELLED / "train"
    argv = ["knn", "--data", place / LABELLED, "--save-features", features]
    err = refused(argv, place, capsys)
    assert expected("--save-features", features, "lies inside", "--data", place / LABELLED) in err


def test_visualize_writes_no_picture_into_its_data(place, capsys):
    checkpoint = place / IMAGES / "pretrain.pth"
    data = place / IMAGES
    argv = ["visualize", "--checkpoint", checkpoint, "--data", data, "--output", data / "r.png"]
    err = refused(argv, place, capsys)
    assert expected("--output", data / "r.png", "lies inside", "--data", data) in err
    # the default output, beside the checkpoint, is held to the same rule
    err = refused(["visualize", "--checkpoint", checkpoint, "--data", data], place, capsys)
    assert expected("--output", data / "pretrain-recon.png", "lies inside", "--data", data) in err


def test_plot_reads_the_metrics_file_and_writes_beside_it(place, capsys):
    metrics = place / "run" / "metrics.jsonl"
    err = refused(["plot", place / "run", "--output", metrics], place, capsys)
    assert expected("--output", metrics, "is the same file or folder as", "RUN", metrics) in err


def test_a_resume_checkpoint_may_lie_in_the_run_directory(place, monkeypatch):
    monkeypatch.chdir(place)
    flags = {"data": LABELLED, "output_dir": "out"}
    cfg = resolve(FinetuneConfig, flags={**flags, "resume": "out/checkpoints/c.pth"})
    assert cfg.resume == str(place / "out" / "checkpoints" / "c.pth")
    for word in ("auto", "none"):
        assert resolve(FinetuneConfig, flags={**flags, "resume": word}).resume == word


def test_a_relative_path_names_a_folder_of_the_working_directory(tmp_path, monkeypatch):
    for name in ("a", "b"):
        (tmp_path / name / "small").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    in_a = resolve(PretrainConfig, flags={"data": "small"}).data
    assert resolve(PretrainConfig, flags={"data": "./small/"}).data == in_a
    monkeypatch.chdir(tmp_path / "b")
    in_b = resolve(PretrainConfig, flags={"data": "small"}).data
    assert in_a == str((tmp_path / "a" / "small").resolve())
    assert in_b == str((tmp_path / "b" / "small").resolve()) != in_a


def test_a_link_resolves_to_its_target_and_print_config_shows_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--data", "link", "--resume", "ck.pth", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    real = tmp_path.resolve()
    assert printed["data"] == str(real / "real") and printed["resume"] == str(real / "ck.pth")
    assert printed["output_dir"] == str(real / "runs" / "pretrain" / "convnextv2_atto")


def test_what_names_no_local_path_stays_as_it_is(tmp_path, monkeypatch):
    (tmp_path / "shards-real").mkdir()
    os.symlink(tmp_path / "shards-real", tmp_path / "shards")
    monkeypatch.chdir(tmp_path)
    real = tmp_path.resolve()
    for text in ("https://host/train-{0..3}.tar", "pipe:curl -s x.tar", "hf-hub:timm/x.y"):
        assert resolved(text) == text
    assert resolved("shards/train-{000..003}.tar") == f"{real}/shards-real/train-{{000..003}}.tar"
    assert resolved("train-{0..1}.tar") == f"{real}/train-{{0..1}}.tar"
    cfg = resolve(
        FinetuneConfig,
        flags={"pretrained": "timm/convnextv2_atto.fcmae", "output_dir": "out/convnextv2_atto"},
    )
    assert cfg.pretrained == "timm/convnextv2_atto.fcmae"  # a Hub name, not on disk
    assert cfg.output_dir == f"{real}/out/convnextv2_atto"  # an output is always a path


def test_a_hard_link_is_the_same_file_and_unset_values_are_skipped(tmp_path):
    (tmp_path / "encoder.pth").write_bytes(b"weights")
    os.link(tmp_path / "encoder.pth", tmp_path / "other-name.pth")
    with pytest.raises(ConfigError, match="is the same file or folder as --checkpoint"):
        check_outputs(
            {"--output": str(tmp_path / "other-name.pth")},
            {"--checkpoint": str(tmp_path / "encoder.pth")},
        )
    check_outputs({"--output": None}, {"--checkpoint": str(tmp_path)})
    check_outputs({"--output": str(tmp_path / "x")}, {"--data": None, "--train": "https://h/x"})
