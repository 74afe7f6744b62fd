"""fcmae.experiments.plot: reading metrics.jsonl and drawing run curves into a PNG (fake runs,
no training)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from fcmae.errors import UserError
from fcmae.experiments.plot import DPI, PANEL_INCHES, plot_runs, read_metrics, run_labels


def write_run(run: Path, records: list[dict], tail: str = "") -> Path:
    run.mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(lines + tail)
    return run


def step(step: int, epoch: float, loss: float, lr: float) -> dict:
    return {"type": "step", "step": step, "epoch": epoch, "loss": loss, "lr": lr, "img_per_s": 9}


def epoch_record(step: int, epoch: int, loss: float, **extra: float) -> dict:
    return {
        "type": "epoch",
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": 1e-4,
        "img_per_s": 9.0,
        "time_s": 1.0,
        "skipped_images": 0,
        **extra,
    }


@pytest.fixture
def pretrain_run(tmp_path: Path) -> Path:
    """Pretraining-like: 3 epochs of 4 steps; resumed after step 6 (steps 7-8 logged twice),
    and killed while writing its last line."""
    records = [{"type": "run", "step": 0}]
    for s in range(1, 9):
        records.append(step(s, s / 4, 1.0 - s / 20, 1e-4 * s / 8))
        if s % 4 == 0:
            records.append(epoch_record(s, s // 4, 1.0 - s / 20))
    records.append({"type": "run", "step": 6})
    records += [step(s, s / 4, 0.5 - s / 40, 1e-4 * s / 8) for s in (7, 8, 9, 10, 11, 12)]
    records.append(epoch_record(8, 2, 0.4))
    return write_run(tmp_path / "a" / "run", records, tail='{"type": "step", "step": 13, "lo')


@pytest.fixture
def finetune_run(tmp_path: Path) -> Path:
    """Fine-tuning-like: validation top-1 of the model and of its EMA after each epoch."""
    records = [{"type": "run", "step": 0}]
    for e in range(1, 4):
        records += [step(2 * e - 1, e - 0.5, 2.0 / e, 1e-3), step(2 * e, e, 1.8 / e, 1e-3)]
        acc = {"val_acc1": 30.0 * e, "val_acc5": 60.0, "val_loss": 1.0}
        ema = {"ema_acc1": 25.0 * e, "ema_acc5": 55.0, "ema_loss": 1.1, "best_acc1": 30.0 * e}
        records.append(epoch_record(2 * e, e, 1.9 / e, **acc, **ema))
    return write_run(tmp_path / "b" / "run", records)


def test_read_metrics_keeps_the_later_of_a_doubled_step_and_skips_a_cut_line(pretrain_run):
    records = read_metrics(pretrain_run)
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert steps[6]["loss"] == pytest.approx(0.5 - 7 / 40)  # the resumed run's step 7
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [(r["epoch"], r["loss"]) for r in epochs] == [(1, 0.8), (2, 0.4)]


def test_run_labels_use_names_and_disambiguate_shared_names(tmp_path):
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c" / "other"]
    assert run_labels(runs) == ["a/run", "b/run", "other"]


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size


def test_plot_runs_writes_a_png_with_a_panel_per_curve(pretrain_run, finetune_run, tmp_path):
    panel_w, panel_h = round(PANEL_INCHES[0] * DPI), round(PANEL_INCHES[1] * DPI)

    output = tmp_path / "plots" / "new" / "curves.png"
    assert plot_runs([pretrain_run, finetune_run], output) == output
    assert png_size(output) == (3 * panel_w, panel_h)  # loss, lr, validation top-1

    no_acc = plot_runs([pretrain_run], tmp_path / "pretrain.png")
    assert png_size(no_acc) == (2 * panel_w, panel_h)  # loss, lr


def test_plot_runs_refuses_an_empty_list(tmp_path):
    with pytest.raises(UserError, match="at least one"):
        plot_runs([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_empty_dir_is_a_user_error_naming_it(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    with pytest.raises(UserError, match="has no metrics.jsonl") as e:
        read_metrics(run)
    assert str(run) in str(e.value)


def test_missing_dir_is_a_user_error_naming_it(tmp_path, finetune_run):
    run = tmp_path / "missing"
    output = tmp_path / "x.png"
    with pytest.raises(UserError, match="does not exist") as e:
        plot_runs([finetune_run, run], output)
    assert str(run) in str(e.value)
    assert not output.exists()


def test_file_instead_of_dir_is_a_user_error_naming_it(finetune_run):
    path = finetune_run / "metrics.jsonl"
    with pytest.raises(UserError, match="is not a directory") as e:
        read_metrics(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", ["", "\n", '{"type": "run", "step": 0}\n{"type": "st'])
def test_metrics_without_step_records_is_a_user_error_naming_the_dir(tmp_path, content):
    run = write_run(tmp_path / "young", [], tail=content)
    with pytest.raises(UserError, match="no readable training step records") as e:
        read_metrics(run)
    assert str(run) in str(e.value)
