"""`fcmae sweep`: pretraining once per value of one setting, each encoder scored on labels.

    OUTPUT_DIR/
      mask_ratio=0.6/          an ordinary pretraining run directory per point (resumable)
        linprobe/, finetune/   the point's linear probe and fine-tune, ordinary run directories
        scores.json            its scores (kNN, probe, fine-tune), written last: a point that
                               has it is not run again
      results.csv, results.md, results.png
      sweep.yaml               the swept key and the settings of every point but that key

Every point has the same settings (and so the same data and epochs) but the swept one. A sweep
directory holds one sweep: a rerun with another key or other settings is refused, and a point's
scores are reused only when they were made with the settings asked for now.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import check, resolve
from fcmae.errors import ConfigError, UserError
from fcmae.finetune import finetune, knn, linprobe
from fcmae.finetune.config import FinetuneConfig, KnnConfig, LinprobeConfig, SweepConfig
from fcmae.finetune.data import labelled_datasets
from fcmae.models.masking import check_masking
from fcmae.pretrain import job as pretrain
from fcmae.run.files import write_atomic, write_text_atomic
from fcmae.run.rundir import EFFECTIVE, RunDir, changed, differences
from fcmae.train.optim import batch_arithmetic

log = logging.getLogger("fcmae")

NOT_SWEPT = ("output_dir", "resume")
SWEEP_FILE = "sweep.yaml"


def parse_set(text: str | None) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` -> (key, values checked against PretrainConfig)."""
    if not text:
        raise ConfigError(
            "--set is required: the key to sweep and its values, e.g. "
            "--set mask_ratio=0.4,0.5,0.6,0.7,0.8."
        )
    key, _, values = text.partition("=")
    key = key.strip().replace("-", "_")
    keys = [f.name for f in dataclasses.fields(PretrainConfig) if f.name not in NOT_SWEPT]
    if key not in keys:
        raise ConfigError(
            f"--set names the unknown key {key!r}; sweep one of the pretraining "
            f"keys: {', '.join(keys)}."
        )
    parsed = [yaml.safe_load(v.strip()) for v in values.split(",") if v.strip()]
    if len(parsed) < 2:
        raise ConfigError(
            f"--set {text} gives {len(parsed)} value(s); give two or more, "
            f"separated by commas: --set {key}=A,B."
        )
    coerced = [check(PretrainConfig, {key: v}, f"--set {key}")[key] for v in parsed]
    if len(set(map(str, coerced))) < len(coerced):
        raise ConfigError(f"--set {text} repeats a value; give each value once.")
    return key, coerced


def points(cfg: SweepConfig) -> tuple[str, list[tuple[Any, PretrainConfig]]]:
    """The swept key and one validated pretraining config per value."""
    key, values = parse_set(cfg.set)
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(PretrainConfig)}
    out = []
    for value in values:
        point = PretrainConfig(
            **{**base, key: value, "output_dir": str(Path(cfg.output_dir) / f"{key}={value}")}
        )
        try:
            point.validate()
        except ConfigError as e:
            raise ConfigError(f"--set {key}={value} cannot be pretrained: {e}") from None
        out.append((value, point))
    return key, out


def _epochs(run: Path) -> list[dict[str, Any]]:
    """The epoch records of a run's metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == "epoch"]


def settings(cfg: SweepConfig) -> dict[str, Any]:
    """What a sweep's numbers depend on: the settings that define a run (less --set), the
    epochs, and the effective batch as resolved for this many processes."""
    values = cfg.to_dict()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return {
        **{key: values[key] for key in cfg.identity_keys() if key != "set"},
        "epochs": cfg.epochs,
        EFFECTIVE: batch_arithmetic(cfg, world_size)[1],
    }


def claim(root: Path, key: str, base: dict[str, Any]) -> None:
    """Record in root's sweep.yaml that it holds the sweep of key over the settings base (but
    key), or refuse a root that holds a sweep of another key or of other settings."""
    path, base = root / SWEEP_FILE, {k: v for k, v in base.items() if k != key}
    if path.is_file():
        old = yaml.safe_load(path.read_text())
        if not isinstance(old, dict) or not isinstance(old.get("settings"), dict):
            raise UserError(f"{path} cannot be read; pass another --output-dir.")
        if old.get("key") != key:
            raise UserError(
                f"{root} holds the sweep of {old['key']}, not of {key}; pass another --output-dir."
            )
        other = differences(old["settings"], base)
        if other:
            raise UserError(
                f"{root} holds a sweep of {key} with other settings ({changed(other)}); rerun "
                f"it with those, or pass another --output-dir."
            )
    elif _is_main():
        text = yaml.safe_dump({"key": key, "settings": base}, sort_keys=False)
        write_text_atomic(path, text, "--output-dir")


def _score(cfg: SweepConfig, point: PretrainConfig, wanted: dict[str, Any]) -> dict[str, Any]:
    """Pretrain one point (or find it done, with the settings wanted) and score its encoder."""
    run = Path(point.output_dir)
    done = run / "scores.json"
    if done.exists():
        scores = json.loads(done.read_text())
        made_with = scores.pop("settings", None)
        other = differences(made_with or {}, wanted)
        if made_with is None or other:
            raise UserError(
                f"{done} holds scores made with "
                f"{f'other settings ({changed(other)})' if other else 'settings not recorded'}; "
                f"pass another --output-dir."
            )
        _say("Point %s is done (%s): not run again.", run.name, done)
        return scores
    pretrain.run(point)
    epochs = _epochs(run)
    masked, patches = check_masking(point.input_size, point.patch_size, point.mask_ratio)
    scores: dict[str, Any] = {
        "final_loss": epochs[-1]["loss"],
        "pretrain_minutes": sum(r["time_s"] for r in epochs) / 60,
        "masked_patches": f"{masked}/{patches}",
        **_evaluate(cfg, point, str(RunDir(run).file(point.epochs, "encoder"))),
    }
    if _is_main():
        write_text_atomic(done, json.dumps({**scores, "settings": wanted}, indent=1) + "\n")
    return scores


def _evaluate(cfg: SweepConfig, point: PretrainConfig, encoder: str) -> dict[str, float]:
    """The encoder's kNN top-1 and, for the epochs cfg gives them, its linear probe's and
    fine-tune's final top-1 (their run directories inside the point's). The network's settings
    (model, channels, GRN, image size) are the point's: one of them may be the swept key."""
    run = Path(point.output_dir)
    common = {
        "data": cfg.eval_data,
        "input_size": point.input_size,
        "in_chans": point.in_chans,
        "device": cfg.device,
        "precision": cfg.precision,
        "num_workers": cfg.num_workers,
        "pretrained": encoder,
        "model": point.model,
    }
    scores = {"knn_acc1": knn.run(resolve(KnnConfig, flags={**common, "k": cfg.knn_k}))["acc1"]}
    trained = {
        "batch_size": cfg.eval_batch_size,
        "effective_batch": None,
        "seed": point.seed,
        "grn": point.grn,
    }
    for name, job, config, epochs in (
        ("probe", linprobe, LinprobeConfig, cfg.probe_epochs),
        ("finetune", finetune, FinetuneConfig, cfg.finetune_epochs),
    ):
        if epochs:
            out = run / ("linprobe" if name == "probe" else "finetune")
            schedule = {"epochs": epochs, "warmup_epochs": epochs / 10, "save_every": epochs}
            flags = {**common, **trained, **schedule, "output_dir": str(out)}
            job.run(resolve(config, flags=flags))
            scores[f"{name}_acc1"] = _epochs(out)[-1]["val_acc1"]
    return scores


def _say(message: str, *args: Any) -> None:
    """A line on the main process's console (the CLI's logging)."""
    if _is_main():
        log.info(message, *args)


def _is_main() -> bool:
    return int(os.environ.get("RANK", 0)) == 0


def write_results(root: Path, key: str, rows: list[dict[str, Any]]) -> list[Path]:
    """results.csv, results.md and results.png in root; returns their paths."""
    columns = [
        key,
        "masked_patches",
        "final_loss",
        "knn_acc1",
        "probe_acc1",
        "finetune_acc1",
        "pretrain_minutes",
    ]
    columns = [c for c in columns if any(c in row for row in rows)]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return [
        write_text_atomic(root / "results.csv", table.getvalue()),
        write_text_atomic(root / "results.md", "\n".join(lines) + "\n"),
        plot(root / "results.png", key, [rows]),
    ]


def plot(path: Path, key: str, runs: list[list[dict[str, Any]]]) -> Path:
    """Scores and final pretraining loss against the swept value, side by side. ``runs``: the
    rows of one sweep, or of several over the same values (seeds): then each point is their
    mean, with a bar from the lowest to the highest."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = runs[0]
    values = [row[key] for row in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = values if numeric else list(range(len(values)))
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    scores, loss = fig.subplots(1, 2)

    def draw(ax: Any, name: str, **style: Any) -> None:
        points = [[run[i][name] for run in runs] for i in range(len(rows))]
        means = [sum(p) / len(p) for p in points]
        spread = [
            [m - min(p) for m, p in zip(means, points)],
            [max(p) - m for m, p in zip(means, points)],
        ]
        ax.errorbar(
            x, means, yerr=spread if len(runs) > 1 else None, marker="o", capsize=3, **style
        )

    for name, label in (
        ("knn_acc1", "kNN"),
        ("probe_acc1", "linear probe"),
        ("finetune_acc1", "fine-tune"),
    ):
        if name in rows[0]:
            draw(scores, name, label=label)
    seeds = f" (mean of {len(runs)} seeds, bars lowest to highest)" if len(runs) > 1 else ""
    scores.set_ylabel("top-1 (%)")
    scores.set_title("Encoder score on --eval-data" + seeds, fontsize="medium")
    scores.legend(fontsize="small")
    draw(loss, "final_loss", color="tab:red")
    loss.set_ylabel("loss on masked patches")
    loss.set_title("Final pretraining loss" + seeds, fontsize="medium")
    for ax in (scores, loss):
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
        if not numeric:
            ax.set_xticks(x, [str(v) for v in values])
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    fig.clear()
    return path


def run(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every point pretrained and scored; returns one row per point."""
    key, configs = points(cfg)
    if cfg.eval_data is None:
        raise ConfigError(
            "--eval-data is required: a folder with train/ and val/ ImageFolders "
            "that score each encoder."
        )
    labelled_datasets(cfg.eval_data, None, None, None, None)  # refuse bad labels before pretraining
    root, base = Path(cfg.output_dir), settings(cfg)
    claim(root, key, base)
    rows = [{key: value, **_score(cfg, point, {**base, key: value})} for value, point in configs]
    if _is_main():
        paths = write_results(root, key, rows)
        values = ", ".join(str(row[key]) for row in rows)
        _say("Sweep of %s over %s: %s", key, values, ", ".join(map(str, paths)))
        _say("\n%s", (root / "results.md").read_text())
    return rows
