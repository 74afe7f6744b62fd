"""``fcmae export --hub-dir DIR``: the folder a Hugging Face Hub model repository holds for timm.

    DIR/config.json        architecture, classes, features and pretrained_cfg (input size,
                           mean/std, crop, interpolation): what timm's ``local-dir:`` and
                           ``hf-hub:`` loaders read (timm.models._hub.load_model_config_from_*)
    DIR/model.safetensors  the weights in timm's convnextv2 layout
    DIR/README.md          the model card: what was trained, on what and how long, the recipe,
                           the licence and the scores the run recorded

``timm.create_model("local-dir:DIR", pretrained=True)`` builds and loads it with nothing else,
and ``huggingface_hub.upload_folder(repo_id="USER/NAME", folder_path="DIR")`` publishes it as it
is. The card reads the run from the checkpoint (its settings and extra state) and, when the
checkpoint lies in a run directory's ``checkpoints/``, from the run's config.yaml,
identity.yaml and metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fcmae.config.yaml_io import dump_yaml, parse_yaml
from fcmae.data.stats import parse_stats
from fcmae.errors import UserError
from fcmae.models.masking import STRIDE
from fcmae.run import layout
from fcmae.run.files import write_atomic
from fcmae.weights.hub import hub_name
from fcmae.weights.layouts import Weights

log = logging.getLogger("fcmae")

FILES = ("config.json", "model.safetensors", "README.md")
OFFICIAL_LICENCE = "cc-by-nc-4.0"  # Meta's ConvNeXt V2 releases (and timm's copies of them)
PAPER = "arXiv:2301.00808"
# The scores an epoch record may hold, as the card names them.
SCORES = {
    "best_acc1": "best top-1 (%), model or EMA",
    "val_acc1": "top-1 (%)",
    "val_acc5": "top-5 (%)",
    "val_loss": "validation loss",
    "ema_acc1": "EMA top-1 (%)",
    "ema_acc5": "EMA top-5 (%)",
    "loss": "training loss",
}


@dataclass
class RunRecord:
    """What is known of the run that made a checkpoint."""

    settings: dict[str, Any] = field(default_factory=dict)  # the resolved options
    command: str | None = None  # e.g. "fcmae finetune"
    last_epoch: dict[str, Any] = field(default_factory=dict)  # metrics.jsonl's last epoch record
    trained_by_fcmae: bool = False


def _read(path: Path, parse: Any) -> Any:
    """parse(text of path), or None when it is missing or unreadable: a card is written from
    what can be read."""
    try:
        return parse(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, UserError):
        return None


def _last_epoch(text: str) -> dict[str, Any]:
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return next((r for r in reversed(records) if r.get("type") == "epoch"), {})


def run_record(weights: Weights, checkpoint: str) -> RunRecord:
    """The run behind checkpoint: its settings from the file (fcmae's "config", the official
    "args") or from its run directory, which also gives the command and the last epoch."""
    record = RunRecord(dict(weights.settings), trained_by_fcmae="config" in weights.metadata)
    folder = Path(checkpoint).resolve().parent
    if folder.name != layout.CHECKPOINTS:
        return record
    run = folder.parent
    config = _read(run / layout.CONFIG, lambda text: parse_yaml(text, layout.CONFIG))
    if isinstance(config, dict):
        record.settings = record.settings or config
        record.trained_by_fcmae = True
    identity = _read(run / layout.IDENTITY, lambda text: parse_yaml(text, layout.IDENTITY))
    if isinstance(identity, dict):
        record.command = str(identity.get("command") or "") or None
    record.last_epoch = _read(run / layout.METRICS, _last_epoch) or {}
    if weights.pixel_stats:  # an export's own record wins over its run's
        record.settings["pixel_stats"] = weights.pixel_stats
    return record


def licence(weights: Weights, record: RunRecord) -> tuple[str, str]:
    """(the Hub's licence id, the card's sentence on it)."""
    official = (
        weights.layout == "official sparse pretraining"
        or "args" in weights.metadata
        or hub_name(weights.source) is not None
    )
    if official and not record.trained_by_fcmae:
        return OFFICIAL_LICENCE, (
            "These are Meta's ConvNeXt V2 weights (or a conversion of them), released under "
            "CC-BY-NC 4.0: non-commercial use only."
        )
    if record.trained_by_fcmae:
        start = record.settings.get("pretrained")
        inherited = (
            f" They were trained starting from `{start}`, whose terms carry over: Meta's "
            f"official ConvNeXt V2 weights (the official files, timm's `convnextv2_*` "
            f"releases) are CC-BY-NC 4.0, and weights trained from them stay non-commercial."
            if start
            else ""
        )
        return "other", (
            "Trained with fcmae: the licence of these weights is their owner's to choose. Set "
            "`license:` above (e.g. apache-2.0 or cc-by-4.0) before publishing, within the "
            f"terms of the training data.{inherited}"
        )
    return "other", (
        "Where these weights come from is not recorded in the checkpoint: set `license:` above "
        "to the licence of their source before publishing."
    )


def hub_config(
    name: str, state: dict[str, torch.Tensor], settings: dict[str, Any], classes: list | None
) -> dict[str, Any]:
    """config.json as timm writes it (timm.models._hub.save_config_for_hf): architecture,
    num_classes (0: an encoder), num_features and the pretrained_cfg its data config reads."""
    in_chans = state["stem.0.weight"].shape[1]
    head = state.get("head.fc.weight")
    num_classes = 0 if head is None else head.shape[0]
    size = int(settings.get("input_size") or 224)
    # The statistics the run recorded; ImageNet's for files from before the record.
    stats = parse_stats(settings.get("pixel_stats") or "imagenet", in_chans)
    mean, std = stats.mean, stats.std
    config: dict[str, Any] = {
        "architecture": name,
        "num_classes": num_classes,
        "num_features": state["head.norm.weight"].shape[0],
        "global_pool": "avg",
    }
    if classes and len(classes) == num_classes:
        config["label_names"] = list(classes)
    config["pretrained_cfg"] = {
        "custom_load": False,
        "input_size": [in_chans, size, size],
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": float(settings.get("crop_pct") or 0.875),
        "crop_mode": "center",
        "mean": list(mean),
        "std": list(std),
        "num_classes": num_classes,
        "pool_size": [size // STRIDE, size // STRIDE],
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "paper_ids": PAPER,
    }
    return config


def _front_matter(licence_id: str, classifier: bool) -> str:
    tags = ["timm", "convnextv2", "fcmae"] + (["image-classification"] if classifier else [])
    meta = {"library_name": "timm", "license": licence_id, "tags": tags}
    if classifier:
        meta["pipeline_tag"] = "image-classification"
    return f"---\n{dump_yaml(meta)}---\n"


def _training_lines(weights: Weights, record: RunRecord, classes: list | None) -> list[str]:
    """What was trained, on what data, for how long."""
    settings, meta = record.settings, weights.metadata
    lines = [f"- Checkpoint: `{Path(weights.source).name}` ({weights.layout} layout)"]
    if record.command:
        lines.append(f"- Command: `{record.command}`")
    if settings.get("pretrained"):
        lines.append(f"- Started from: `{settings['pretrained']}`")
    data = [f"`{settings[k]}`" for k in ("data", "train") if settings.get(k)]
    if data:
        lines.append(f"- Data: {', '.join(data)} (name the data set here)")
    if classes:
        shown = ", ".join(map(str, classes[:20])) + (", ..." if len(classes) > 20 else "")
        lines.append(f"- Classes ({len(classes)}): {shown}")
    epochs = meta.get("epoch", record.last_epoch.get("epoch"))
    if epochs is not None:
        planned = f" of {settings['epochs']}" if settings.get("epochs") else ""
        lines.append(f"- Trained: {epochs}{planned} epochs")
    step, batch = meta.get("step", record.last_epoch.get("step")), settings.get("effective_batch")
    if step is not None:
        seen = f", {step * batch:,} images at {batch} per step" if batch else ""
        lines.append(f"- Optimizer steps: {step:,}{seen}")
    if settings.get("input_size"):
        lines.append(f"- Input size: {settings['input_size']} px")
    return lines


def _score_lines(weights: Weights, record: RunRecord) -> list[str]:
    """The scores the run recorded: the checkpoint's best top-1, the last epoch's record."""
    lines = []
    extra = weights.metadata.get("extra")
    best = extra.get("evaluator") if isinstance(extra, dict) else None
    if isinstance(best, dict) and best.get("acc1", -1) >= 0:
        lines.append(
            f"| best top-1 (%) | {best['acc1']:.2f} ({best.get('weights', 'model')} weights, "
            f"epoch {best.get('epoch', '?')}) |"
        )
    last = record.last_epoch
    epoch = last.get("epoch", "?")
    for key, what in SCORES.items():
        if isinstance(last.get(key), (int, float)) and not (key == "best_acc1" and lines):
            lines.append(f"| {what}, epoch {epoch} | {last[key]:.4g} |")
    return ["| score | value |", "|---|---|", *lines] if lines else []


def model_card(
    weights: Weights,
    name: str,
    kind: str,
    classifier: bool,
    record: RunRecord,
    classes: list | None,
) -> str:
    """README.md of the folder: front matter for the Hub, then the card. kind: what the
    weights are, e.g. "a 10-class classifier"."""
    licence_id, licence_text = licence(weights, record)
    scores = _score_lines(weights, record) or ["No scores were recorded with this checkpoint."]
    recipe = (
        ["```yaml", dump_yaml(record.settings).rstrip(), "```"]
        if record.settings
        else ["The checkpoint does not record the settings it was trained with."]
    )
    arguments = "" if classifier else ", num_classes=0"
    sections = [
        _front_matter(licence_id, classifier),
        f"# {name}\n",
        f"ConvNeXt V2 ({PAPER}): {kind}, in timm's `{name}` layout, written by "
        "`fcmae export --hub-dir`.\n",
        "## Training\n",
        *_training_lines(weights, record, classes),
        "\n## Scores\n",
        *scores,
        "\n## Recipe\n",
        *recipe,
        "\n## Use with timm\n",
        "```python",
        "import timm",
        f'model = timm.create_model("hf-hub:USER/NAME", pretrained=True{arguments}).eval()',
        '# or, from this folder: timm.create_model("local-dir:PATH", pretrained=True)',
        "config = timm.data.resolve_data_config({}, model=model)",
        "transform = timm.data.create_transform(**config)",
        "```\n",
        "## Licence\n",
        licence_text + "\n",
        "## Citation\n",
        "```bibtex",
        "@article{woo2023convnextv2,",
        "  title={ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders},",
        "  author={Woo, Sanghyun and Debnath, Shoubhik and Hu, Ronghang and Chen, Xinlei and "
        "Liu, Zhuang and Kweon, In So and Xie, Saining},",
        "  journal={arXiv preprint arXiv:2301.00808},",
        "  year={2023}",
        "}",
        "```",
    ]
    return "\n".join(sections) + "\n"


def _stats(record: RunRecord) -> dict[str, str] | None:
    """The safetensors metadata that carries the run's pixel statistics to fcmae readers."""
    stats = record.settings.get("pixel_stats")
    return {"pixel_stats": str(stats)} if stats else None


def write_folder(
    weights: Weights,
    name: str,
    state: dict[str, torch.Tensor],
    kind: str,
    folder: str | Path,
    checkpoint: str,
    classes: list | None,
) -> Path:
    """Write config.json, model.safetensors and README.md into folder (each atomically). When
    one cannot be written (a full disk), those this call had created are removed again, so
    the same command can be rerun once the fault is gone."""
    from safetensors.torch import save

    folder = Path(folder)
    record = run_record(weights, checkpoint)
    config = hub_config(name, state, record.settings, classes)
    card = model_card(weights, name, kind, "head.fc.weight" in state, record, classes)
    writes = {
        "model.safetensors": lambda f: f.write(save(state, metadata=_stats(record))),
        "config.json": lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()),
        "README.md": lambda f: f.write(card.encode()),
    }
    created = []
    try:
        for file, write in writes.items():
            if not (folder / file).exists():
                created.append(folder / file)
            write_atomic(folder / file, write)
    except UserError:
        for path in created:
            path.unlink(missing_ok=True)
        raise
    return folder
