"""`fcmae sweep`: pretraining once per value of one setting, each encoder scored on labels.

    OUTPUT_DIR/
      mask_ratio=0.6/          an ordinary pretraining run directory per point (resumable)
        knn.json               the point's kNN score
        linprobe/, finetune/   the point's linear probe and fine-tune, ordinary run directories
        scores.json            written last: a point that has it is not run again
      results.csv, results.md, results.png

Every point has the same settings (and so the same data and epochs) but the swept one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from fcmae import pretrain
from fcmae.config import PretrainConfig, check, resolve
from fcmae.errors import ConfigError
from fcmae.finetune import finetune, knn, linprobe
from fcmae.finetune.config import FinetuneConfig, KnnConfig, LinprobeConfig, SweepConfig
from fcmae.finetune.data import labelled_datasets
from fcmae.models import masked_patches
from fcmae.runlog import close_logging, setup_logging

log = logging.getLogger("fcmae")

NOT_SWEPT = ("output_dir", "resume")


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


def _score(cfg: SweepConfig, point: PretrainConfig) -> dict[str, Any]:
    """Pretrain one point (or find it done) and score its encoder."""
    run = Path(point.output_dir)
    done = run / "scores.json"
    if done.exists():
        if _is_main():  # no run logs here, so straight to the console
            print(f"Point {run.name} is done ({done}): not run again.", flush=True)
        return json.loads(done.read_text())
    pretrain.run(point)
    encoder = str(run / "checkpoints" / f"encoder-{point.epochs:04d}.pth")
    epochs = _epochs(run)
    patches = (point.input_size // point.patch_size) ** 2
    masked = masked_patches(patches, point.mask_ratio)
    scores: dict[str, Any] = {
        "final_loss": epochs[-1]["loss"],
        "pretrain_minutes": sum(r["time_s"] for r in epochs) / 60,
        "masked_patches": f"{masked}/{patches}",
    }
    common = {
        "data": cfg.eval_data,
        "input_size": cfg.input_size,
        "in_chans": cfg.in_chans,
        "device": cfg.device,
        "precision": cfg.precision,
        "num_workers": cfg.num_workers,
        "pretrained": encoder,
        "model": cfg.model,
    }
    scores["knn_acc1"] = knn.run(resolve(KnnConfig, flags={**common, "k": cfg.knn_k}))["acc1"]
    trained = {"batch_size": cfg.eval_batch_size, "effective_batch": None, "seed": cfg.seed}
    for name, job, config, epochs_ in (
        ("probe", linprobe, LinprobeConfig, cfg.probe_epochs),
        ("finetune", finetune, FinetuneConfig, cfg.finetune_epochs),
    ):
        if epochs_:
            out = run / ("linprobe" if name == "probe" else "finetune")
            job.run(
                resolve(
                    config,
                    flags={
                        **common,
                        **trained,
                        "epochs": epochs_,
                        "warmup_epochs": epochs_ / 10,
                        "save_every": epochs_,
                        "output_dir": str(out),
                    },
                )
            )
            scores[f"{name}_acc1"] = _epochs(out)[-1]["val_acc1"]
    if _is_main():
        tmp = done.with_name(f".{done.name}.tmp")
        tmp.write_text(json.dumps(scores, indent=1) + "\n")
        os.replace(tmp, done)
    return scores


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
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    return [root / "results.csv", root / "results.md", _plot(root / "results.png", key, rows)]


def _plot(path: Path, key: str, rows: list[dict[str, Any]]) -> Path:
    """Scores and final pretraining loss against the swept value, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = [row[key] for row in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = values if numeric else list(range(len(values)))
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    scores, loss = fig.subplots(1, 2)
    for name, label in (
        ("knn_acc1", "kNN"),
        ("probe_acc1", "linear probe"),
        ("finetune_acc1", "fine-tune"),
    ):
        if name in rows[0]:
            scores.plot(x, [row[name] for row in rows], marker="o", label=label)
    scores.set_ylabel("top-1 (%)")
    scores.set_title("Encoder score on --eval-data")
    scores.legend(fontsize="small")
    loss.plot(x, [row["final_loss"] for row in rows], marker="o", color="tab:red")
    loss.set_ylabel("loss on masked patches")
    loss.set_title("Final pretraining loss")
    for ax in (scores, loss):
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
        if not numeric:
            ax.set_xticks(x, [str(v) for v in values])
    fig.savefig(path, dpi=120)
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
    root = Path(cfg.output_dir)
    rows = [{key: value, **_score(cfg, point)} for value, point in configs]
    if _is_main():
        handlers = setup_logging(None, 0)
        try:
            paths = write_results(root, key, rows)
            log.info(
                "Sweep of %s over %s: %s",
                key,
                ", ".join(map(str, (r[key] for r in rows))),
                ", ".join(map(str, paths)),
            )
            log.info("\n%s", (root / "results.md").read_text())
        finally:
            close_logging(handlers)
    return rows
