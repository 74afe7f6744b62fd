"""`fcmae sweep`: pretraining once per value of one setting, each encoder scored on labels.

    OUTPUT_DIR/
      mask_ratio=0.6/          an ordinary pretraining run directory per point (resumable)
        linprobe/, finetune/   the point's linear probe and fine-tune, ordinary run directories
        scores.json            its scores (kNN, probe, fine-tune), written last: a point that
                               has it is not run again
      results.csv, results.md, results.png
                               the scores' table and plot (fcmae.experiments.sweep_report)
      sweep.yaml               the swept key and the settings of every point but that key

Every point has the same settings (and so the same data and epochs) but the swept one. A sweep
directory holds one sweep: a rerun with another key or other settings is refused, and a point's
scores are reused only when they were made with the settings asked for now; a damaged
scores.json is no scores, and its point is scored again. --eval-batch-size is how the scoring
runs, not what a point is: a rerun may lower it (a small --eval-data, a full GPU) and continue,
points already scored keep their scores, and a probe or fine-tune begun with another size
continues with the new one (its run logs the change).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import check, resolve
from fcmae.config.yaml_io import dump_yaml, parse_yaml
from fcmae.errors import ConfigError, UserError
from fcmae.experiments import monitor
from fcmae.experiments.sweep_report import write_results
from fcmae.finetune import finetune, knn, linprobe
from fcmae.finetune.config import FinetuneConfig, KnnConfig, LinprobeConfig, SweepConfig
from fcmae.finetune.data import LABELLED, check_labelled
from fcmae.models import ModelError
from fcmae.models.masking import check_masking
from fcmae.run import identity, layout
from fcmae.run.files import write_text_atomic
from fcmae.track.connect import connect
from fcmae.track.folder import RunFolder
from fcmae.track.trackers import Sinks, nested
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
    parsed = [parse_yaml(v.strip(), f"--set {key}") for v in values.split(",") if v.strip()]
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
        except (ConfigError, ModelError) as e:
            raise ConfigError(f"--set {key}={value} cannot be pretrained: {e}") from None
        out.append((value, point))
    return key, out


def check_eval_data(cfg: SweepConfig) -> None:
    """Refuse, before any pretraining, an --eval-data that cannot score the points (see
    fcmae.finetune.data.check_labelled), and one without a whole --eval-batch-size batch of
    train/ images per process for the probe and the fine-tune, which drop an incomplete batch."""
    if cfg.eval_data is None:
        raise ConfigError(f"--eval-data is required: {LABELLED}, that scores each encoder.")
    root = Path(cfg.eval_data).expanduser()
    train = check_labelled(cfg.eval_data, "--eval-data", cfg.data)
    if cfg.probe_epochs and cfg.eval_batch_size < 2:
        raise ConfigError(
            "--eval-batch-size 1 gives the linear probe's BatchNorm one image per batch, which "
            "it cannot train on; pass 2 or more."
        )
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    per_process = len(train) // world_size
    if (cfg.probe_epochs or cfg.finetune_epochs) and per_process < cfg.eval_batch_size:
        share = f" ({per_process} for each of {world_size} processes)" if world_size > 1 else ""
        fix = (
            f"lower --eval-batch-size to {per_process}"
            if per_process >= (2 if cfg.probe_epochs else 1)
            else "add images to it"
        )
        raise UserError(
            f"{root / 'train'} (from --eval-data) holds {len(train)} images{share}, "
            f"fewer than one training batch of --eval-batch-size {cfg.eval_batch_size}; {fix}."
        )


def _epochs(run: Path) -> list[dict[str, Any]]:
    """The epoch records of a run's metrics.jsonl (a line that is not a JSON object, cut off
    by a crash, is passed over); UserError when there is none."""
    records = []
    for line in (run / layout.METRICS).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("type") == "epoch":
            records.append(record)
    if not records:
        raise UserError(
            f"{run / layout.METRICS} holds no epoch record, so the run's results are unknown; "
            f"move {run} away to run it again."
        )
    return records


def settings(cfg: SweepConfig) -> dict[str, Any]:
    """What a sweep's numbers depend on: the settings that define a run (less --set), the
    epochs, and the effective batch as resolved for this many processes."""
    values = cfg.to_dict()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return {
        **{key: values[key] for key in cfg.identity_keys() if key != "set"},
        "epochs": cfg.epochs,
        layout.EFFECTIVE: batch_arithmetic(cfg, world_size)[1],
    }


def claim(root: Path, key: str, base: dict[str, Any], accepted: tuple[str, ...]) -> None:
    """Record in root's sweep.yaml that it holds the sweep of key over the settings base (but
    key), or refuse a root that holds a sweep of another key or of other settings (the Run's
    identity check, fcmae.run.identity; accepted: the changes --accept-changes names)."""
    path, base = root / SWEEP_FILE, {k: v for k, v in base.items() if k != key}
    if path.exists():
        old_key, old_settings = claimed(path)
        record = identity.Record(SWEEP_FILE, old_settings, f"the sweep of {old_key}")
        where = f"The sweep in {root}"
        legacy = PretrainConfig.legacy_values()
        identity.check(f"the sweep of {key}", base, tuple(base), accepted, [record], where, legacy)
    if _is_main():
        text = dump_yaml({"key": key, "settings": base})
        write_text_atomic(path, text)


def claimed(path: Path) -> tuple[str, dict[str, Any]]:
    """(swept key, settings) that a sweep.yaml records; UserError when it cannot be read."""
    try:
        old = parse_yaml(path.read_bytes().decode(), str(path))
    except (OSError, UnicodeDecodeError, UserError):  # unreadable, not UTF-8, not YAML
        old = None
    if (
        isinstance(old, dict)
        and isinstance(old.get("key"), str)
        and isinstance(old.get("settings"), dict)
    ):
        return old["key"], old["settings"]
    raise UserError(
        f"{path} cannot be read, so the settings of the sweep in {path.parent} are unknown; pass "
        f"another --output-dir, or, if you know the sweep's settings, delete {path} and rerun "
        f"with them."
    )


def _score(cfg: SweepConfig, point: PretrainConfig, wanted: dict[str, Any]) -> dict[str, Any]:
    """Pretrain one point (or find it done, with the settings wanted) and score its encoder."""
    run = Path(point.output_dir)
    done = run / "scores.json"
    scores = _recorded(done, cfg, wanted) if done.exists() else None
    if scores is not None:
        _say("Point %s is done (%s): not run again.", run.name, done)
        return scores
    monitor.pretrain(point)
    epochs = _epochs(run)
    masked, patches = check_masking(point.input_size, point.patch_size, point.mask_ratio)
    scores: dict[str, Any] = {
        "final_loss": epochs[-1]["loss"],
        "pretrain_minutes": sum(r["time_s"] for r in epochs) / 60,
        "masked_patches": f"{masked}/{patches}",
        **_evaluate(
            cfg, point, str(run / layout.CHECKPOINTS / layout.file_name(point.epochs, "encoder"))
        ),
    }
    if _is_main():
        write_text_atomic(done, json.dumps({**scores, "settings": wanted}, indent=1) + "\n")
    return scores


def _recorded(path: Path, cfg: SweepConfig, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The scores in a point's scores.json, made with the settings wanted; None, with a warning,
    when the file is damaged (not JSON, not an object, a score or the settings missing), so the
    point is scored again. UserError when they were made with other settings."""
    try:
        record = json.loads(path.read_bytes())
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        record = None
    made_with = record.get("settings") if isinstance(record, dict) else None
    if isinstance(made_with, dict):
        made_with = {k: v for k, v in made_with.items() if k in wanted}  # older: more keys
        where, made = str(path), [identity.Record(path.name, made_with)]
        accepted, legacy = cfg.accepted_changes(), PretrainConfig.legacy_values()
        if identity.check("", wanted, tuple(wanted), accepted, made, where, legacy):
            _say("%s was scored before the change accepted now: scoring it again.", path.parent)
            return None
        names = ["final_loss", "pretrain_minutes", "masked_patches", "knn_acc1"]
        names += [f"{job}_acc1" for job in ("probe", "finetune") if getattr(cfg, f"{job}_epochs")]
        kinds = {name: str if name == "masked_patches" else (int, float) for name in names}
        if all(isinstance(record.get(name), kinds[name]) for name in names):
            return {name: record[name] for name in names}
    if _is_main():
        log.warning("%s is damaged, so its scores are unknown: scoring the point again.", path)
    return None


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
        "accept_changes": layout.EFFECTIVE,  # a rerun may lower --eval-batch-size
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


def run(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Every point pretrained and scored; returns one row per point. With --track, the sweep
    is a tracker run, and each point's pretraining a run nested under it (fcmae.track)."""
    key, configs = points(cfg)
    check_eval_data(cfg)
    trackers = connect(cfg.track) if _is_main() else []  # unreachable: refused before writing
    root, base = Path(cfg.output_dir), settings(cfg)
    claim(root, key, base, cfg.accepted_changes())
    shared = {name: value for name, value in base.items() if name != key}  # as sweep.yaml
    sinks = Sinks(trackers, RunFolder.read_sweep(root, key, shared))
    sinks.start()
    status = "FAILED"
    try:
        rows = []
        for value, point in configs:
            with nested(sinks.parent({"sweep.key": key, "sweep.value": str(value)})):
                rows.append({key: value, **_score(cfg, point, {**base, key: value})})
        if _is_main():
            paths = write_results(root, key, rows)
            values = ", ".join(str(row[key]) for row in rows)
            _say("Sweep of %s over %s: %s", key, values, ", ".join(map(str, paths)))
            _say("\n%s", (root / "results.md").read_text())
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        sinks.finish(status)
    return rows
