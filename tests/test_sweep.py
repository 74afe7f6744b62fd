"""fcmae sweep: points are ordinary runs, an interrupted sweep resumes without redoing a point."""

import csv
import json

import pytest
from helpers import write_image_folder
from PIL import Image

from fcmae.cli import main
from fcmae.config.schema import resolve
from fcmae.errors import ConfigError
from fcmae.experiments import sweep
from fcmae.finetune.config import SweepConfig
from fcmae.pretrain import job as pretrain
from fcmae.run.logs import close_logging, setup_logging


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_image_folder(root / "train", classes=2, per_class=8, size=64, seed=0)
    write_image_folder(root / "val", classes=2, per_class=4, size=64, seed=1)
    return root


def flags(labelled, out, **extra):
    return {
        "data": str(labelled / "train"),
        "eval_data": str(labelled),
        "output_dir": str(out),
        "set": "mask_ratio=0.5,0.75",
        "input_size": 64,
        "batch_size": 4,
        "effective_batch": None,
        "epochs": 1,
        "warmup_epochs": 0,
        "num_workers": 0,
        "device": "cpu",
        "probe_epochs": 1,
        "eval_batch_size": 4,
        "knn_k": 3,
        "recon_every": 0,
        **extra,
    }


def test_an_interrupted_sweep_resumes_without_rerunning_a_finished_point(
    labelled, tmp_path, monkeypatch, capsys
):
    run = pretrain.run
    started = []

    def second_point_killed(cfg, callbacks=()):
        started.append(cfg.mask_ratio)
        if cfg.mask_ratio == 0.75 and len(started) == 2:
            raise KeyboardInterrupt  # the job is stopped during the second point
        return run(cfg, callbacks)

    monkeypatch.setattr(pretrain, "run", second_point_killed)
    cfg = resolve(SweepConfig, flags=flags(labelled, tmp_path / "sweep"))
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cfg)
    first = tmp_path / "sweep" / "mask_ratio=0.5" / "scores.json"
    assert first.exists() and not (tmp_path / "sweep" / "results.csv").exists()
    stamp = first.stat().st_mtime_ns

    capsys.readouterr()
    handlers = setup_logging(None, 0)  # the console logging the CLI sets up
    try:
        rows = sweep.run(cfg)
    finally:
        close_logging(handlers)
    assert started == [0.5, 0.75, 0.75]  # the finished point was not pretrained again
    assert "Point mask_ratio=0.5 is done" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp
    assert [row["mask_ratio"] for row in rows] == [0.5, 0.75]
    assert [row["masked_patches"] for row in rows] == ["2/4", "3/4"]
    with open(tmp_path / "sweep" / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["mask_ratio"]) for r in table] == [0.5, 0.75]
    assert all(
        0 <= float(r["knn_acc1"]) <= 100 and 0 <= float(r["probe_acc1"]) <= 100 for r in table
    )
    assert "| mask_ratio | masked_patches |" in (tmp_path / "sweep" / "results.md").read_text()
    with Image.open(tmp_path / "sweep" / "results.png") as png:
        assert png.size == (1200, 480)
    for point in ("mask_ratio=0.5", "mask_ratio=0.75"):  # ordinary run directories
        assert (tmp_path / "sweep" / point / "checkpoints" / "encoder-0001.pth").exists()
        assert (tmp_path / "sweep" / point / "linprobe" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "value, message",
    [
        ("mask_ratio=0.5,1.0", "--set mask_ratio=1.0 cannot be pretrained: mask_ratio must lie"),
        ("patch_size=32,48", "--set patch_size=48 cannot be pretrained: patch_size must be a"),
        ("mask_ratios=0.5,0.6", "unknown key 'mask_ratios'"),
        ("mask_ratio=0.5", "give two or more"),
        ("mask_ratio=0.5,high", "must be a number"),
        ("output_dir=a,b", "unknown key 'output_dir'"),
    ],
)
def test_bad_sweeps_are_refused_before_any_pretraining(labelled, tmp_path, value, message):
    cfg = resolve(SweepConfig, flags=flags(labelled, tmp_path / "sweep", set=value))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        sweep.run(cfg)
    assert not (tmp_path / "sweep").exists()


def cli(flags):
    """The `fcmae sweep` command line of a flags() dict."""
    args = ["sweep"]
    for key, value in flags.items():
        args += [f"--{key.replace('_', '-')}", "none" if value is None else str(value)]
    return args


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("fcmae: error: ") and err.count("\n") == 1, err
    return err


def eval_folders(tmp_path, case, labelled):
    """(--data, --eval-data) of a case of an --eval-data that cannot score a sweep."""
    root = tmp_path / "eval"
    if case == "one class":
        write_image_folder(root / "train", classes=1, per_class=8, size=64)
        write_image_folder(root / "val", classes=1, per_class=2, size=64)
    elif case == "no val/":
        write_image_folder(root / "train", classes=2, per_class=8, size=64)
    elif case == "the --data folder":
        return labelled, labelled
    elif case == "its own train/":
        root = labelled / "train"
    elif case == "too few images":
        root = labelled
    return labelled / "train", root


@pytest.mark.parametrize(
    "case, extra, message",
    [
        ("missing", {}, "--eval-data {root} is not a folder; pass a folder holding train/"),
        ("its own train/", {}, "--eval-data {root} has no train/ folder of images"),
        ("no val/", {}, "--eval-data {root} has no val/ folder of images"),
        ("one class", {}, "--eval-data {root} holds one class (class0)"),
        ("the --data folder", {}, "pretraining would see them; pretrain on others, e.g. --data"),
        (
            "too few images",
            {"eval_batch_size": 17},
            "holds 16 images, fewer than one training batch of "
            "--eval-batch-size 17; lower --eval-batch-size to 16.",
        ),
        (
            "too few images",
            {"eval_batch_size": 1},
            "--eval-batch-size 1 gives the linear probe's BatchNorm",
        ),
    ],
)
def test_an_eval_data_that_cannot_score_is_one_sentence_before_any_pretraining(
    labelled, tmp_path, capsys, case, extra, message
):
    data, root = eval_folders(tmp_path, case, labelled)
    out = tmp_path / "sweep"
    assert main(cli(flags(labelled, out, data=data, eval_data=root, **extra))) == 1
    assert message.format(root=root) in one_line_error(capsys)
    assert not out.exists()


def test_a_sweep_over_grn_probes_and_fine_tunes_each_encoder_as_it_was_built(labelled, tmp_path):
    cfg = resolve(
        SweepConfig,
        flags=flags(labelled, tmp_path / "sweep", set="grn=true,false", finetune_epochs=1),
    )
    rows = sweep.run(cfg)
    assert [row["grn"] for row in rows] == [True, False]
    assert all("probe_acc1" in row and "finetune_acc1" in row for row in rows)
    config = (tmp_path / "sweep" / "grn=False" / "finetune" / "config.yaml").read_text()
    assert "grn: false" in config


def test_a_rerun_with_a_smaller_eval_batch_size_continues_in_place(labelled, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(cli(flags(labelled, out))) == 0
    first, second = (out / point / "scores.json" for point in ("mask_ratio=0.5", "mask_ratio=0.75"))
    stamp = first.stat().st_mtime_ns
    second.unlink()  # the second point stopped after its probe, before its scores were written
    capsys.readouterr()
    assert main(cli(flags(labelled, out, eval_batch_size=2))) == 0
    assert "Point mask_ratio=0.5 is done" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp and json.loads(second.read_text())["probe_acc1"] >= 0
    log = (out / "mask_ratio=0.75" / "linprobe" / "log.txt").read_text()
    assert "Continuing with changed settings: effective_batch 4 -> 2." in log


def test_a_damaged_scores_json_is_scored_again_with_one_warning(labelled, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = cli(flags(labelled, out, probe_epochs=0))
    assert main(args) == 0
    first, second = (out / point / "scores.json" for point in ("mask_ratio=0.5", "mask_ratio=0.75"))
    record, stamp = json.loads(first.read_text()), second.stat().st_mtime_ns
    no_knn = {key: value for key, value in record.items() if key != "knn_acc1"}
    no_settings = {key: value for key, value in record.items() if key != "settings"}
    for damaged in (
        first.read_bytes()[:40],  # truncated
        b"\xff\xfe\x00\x81 garbage",
        b"[1, 2, 3]",
        json.dumps(no_knn).encode(),
        json.dumps(no_settings).encode(),
    ):
        first.write_bytes(damaged)
        capsys.readouterr()
        assert main(args) == 0
        captured = capsys.readouterr()
        warnings = [line for line in captured.out.splitlines() if " is damaged" in line]
        assert warnings == [
            f"{first} is damaged, so its scores are unknown: scoring the point again."
        ]
        assert "Point mask_ratio=0.75 is done" in captured.out and not captured.err
        assert json.loads(first.read_text()) == record
    assert second.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "damaged",
    [b"key: [mask_ratio", b"\xff\xfe\x00\x81", b"- mask_ratio\n", b"key: mask_ratio\n", b"", None],
)
def test_a_damaged_sweep_yaml_is_one_sentence_that_names_the_fixes(
    labelled, tmp_path, capsys, damaged
):
    out = tmp_path / "sweep"
    out.mkdir()
    if damaged is None:  # a folder where the file should be
        (out / "sweep.yaml").mkdir()
    else:
        (out / "sweep.yaml").write_bytes(damaged)
    assert main(cli(flags(labelled, out))) == 1
    assert (
        f"{out / 'sweep.yaml'} cannot be read, so the settings of the sweep in {out} are "
        f"unknown; pass another --output-dir, or, if you know the sweep's settings, delete "
        f"{out / 'sweep.yaml'} and rerun with them." in one_line_error(capsys)
    )
    assert [p.name for p in out.iterdir()] == ["sweep.yaml"]
