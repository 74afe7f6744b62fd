"""fcmae sweep: points are ordinary runs, an interrupted sweep resumes without redoing a point."""

import csv

import pytest
from helpers import write_image_folder
from PIL import Image

from fcmae.cli import main
from fcmae.config.schema import resolve
from fcmae.errors import ConfigError
from fcmae.experiments import sweep
from fcmae.finetune.config import SweepConfig
from fcmae.pretrain import job as pretrain
from fcmae.run.runlog import close_logging, setup_logging


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


def test_bad_eval_data_is_one_sentence_and_nothing_is_written(labelled, tmp_path, capsys):
    args = [
        "sweep",
        "--data",
        str(labelled / "train"),
        "--eval-data",
        str(labelled / "train"),
        "--set",
        "mask_ratio=0.5,0.6",
        "--output-dir",
        str(tmp_path / "sweep"),
    ]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("fcmae: error: ") and err.count("\n") == 1 and "train" in err
    assert not (tmp_path / "sweep").exists()


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
