"""Configurations of the fine-tuning stage's commands: finetune, linprobe, eval, knn, export
(and the sweep, which pretrains and then scores each encoder with them).

Resolved by fcmae.config.schema.resolve like pretraining's, from the same kind of option groups. The
fine-tuning recipes are the paper's per-size settings (its appendix; the official TRAINING.md
gives the commands for atto, tiny and base). Imports no torch, so `fcmae --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fcmae.config import budget
from fcmae.config.budget import Need, check_fits
from fcmae.config.commands import (
    CHANNELS,
    LoadingOptions,
    NetworkOptions,
    OverwriteOption,
    PixelStatsOption,
    PretrainConfig,
    TrainConfig,
    weight_decay_option,
)
from fcmae.config.schema import (
    COUNT,
    COUNT_OR_ZERO,
    INT64,
    NON_NEGATIVE,
    POSITIVE,
    RECIPE,
    Config,
    Range,
    opt,
)
from fcmae.config.tracking import TrackOption
from fcmae.errors import ConfigError, shorten
from fcmae.models import CLASSIFIERS, SIZES
from fcmae.models.masking import STRIDE

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
LAYER_DECAY_MODES = ("single", "group")  # see fcmae.finetune.layer_decay
UP_TO_ONE = Range(0, 1, high_closed=True)  # (0, 1]
BELOW_ONE = Range(0, 1, low_closed=True)  # [0, 1)


@dataclass
class FoldersOptions(Config):
    """Labelled training and validation images."""

    data: str | None = opt(
        None,
        "folder holding train/ and val/, each an ImageFolder tree "
        "(one subfolder of images per class)",
        path="input",
    )
    train: str | None = opt(
        None,
        "training ImageFolder, in place of DATA/train; finetune and linprobe also take "
        "WebDataset shards (a .tar, a brace pattern, URLs; labels from .cls)",
        path="input",
    )
    val: str | None = opt(
        None,
        "validation ImageFolder, in place of DATA/val; or shards, as --train takes",
        path="input",
    )


@dataclass
class ImageOptions(Config):
    """The size of the images the network sees, and the evaluation crop."""

    input_size: int = opt(
        224,
        "image size in pixels that the network sees",
        within=Range(STRIDE, INT64, low_closed=True, why="at least the network's stride"),
    )
    crop_pct: float = opt(
        0.875,
        "evaluation: resize the shorter side to input_size / crop_pct, then centre-crop input_size",
        within=UP_TO_ONE,
    )


@dataclass
class DataOptions(ImageOptions, FoldersOptions):
    """Labelled image folders and image sizing (finetune, linprobe, knn)."""


@dataclass
class PretrainedOption(Config):
    """The encoder weights a command starts from (finetune, linprobe, knn)."""

    pretrained: str | None = opt(
        None,
        "encoder checkpoint, any supported layout (fcmae, official, timm; detected), or a Hub "
        "name such as timm/convnextv2_tiny.fcmae; unset: a randomly initialised encoder (from "
        "scratch, or a baseline)",
        path="input",
    )


@dataclass
class ClassifierOptions(PretrainedOption, PixelStatsOption, NetworkOptions):
    """The classifier a training command builds (finetune, linprobe)."""

    num_classes: int | None = opt(
        None,
        "classes of the head; default: the class folders of the training data, which it must equal",
        within=COUNT,
    )


@dataclass
class FromCheckpointOptions(Config):
    """NetworkOptions, by default read from the checkpoint (eval, knn)."""

    model: str | None = opt(
        None, "network; default: the checkpoint's size, else convnextv2_atto", choices=CLASSIFIERS
    )
    in_chans: int | None = opt(
        None, "image channels; default: the checkpoint's, else 3", within=CHANNELS
    )


@dataclass
class FinetuneConfig(TrackOption, ClassifierOptions, DataOptions, TrainConfig):
    """A fine-tuning run: a pretrained (or fresh) encoder becomes a classifier."""

    output_root: ClassVar[str | None] = "finetune"

    weight_decay: float = weight_decay_option(
        "on all parameters but 1-D tensors (norms), biases and GRN's gamma and beta, as the "
        "official fine-tuning"
    )
    drop_path: float = opt(
        RECIPE, "stochastic depth rate of the last block (linear from 0)", within=BELOW_ONE
    )
    head_init_scale: float = opt(RECIPE, "scale of the freshly initialised head's weights")
    layer_decay: float = opt(
        RECIPE,
        "layer-wise lr decay: layer id i trains at "
        "layer_decay^(L+1-i) times the lr; 1 turns it off",
        within=UP_TO_ONE,
    )
    layer_decay_mode: str = opt(
        RECIPE,
        "layer ids: one per block (single) or the 12 groups of base and larger (group)",
        choices=LAYER_DECAY_MODES,
    )
    smoothing: float = opt(RECIPE, "label smoothing", within=BELOW_ONE)
    mixup: float = opt(RECIPE, "mixup alpha (timm Mixup); 0: off", within=NON_NEGATIVE)
    cutmix: float = opt(RECIPE, "cutmix alpha (timm Mixup); 0: off", within=NON_NEGATIVE)
    auto_augment: str | None = opt(RECIPE, "timm RandAugment policy; none: off")
    reprob: float = opt(
        RECIPE,
        "random erasing probability (timm, per-pixel noise)",
        within=Range(0, 1, low_closed=True, high_closed=True),
    )
    model_ema: bool = opt(
        RECIPE, "keep an exponential moving average of the weights and evaluate it too"
    )
    model_ema_decay: float = opt(RECIPE, "EMA decay per optimizer step", within=BELOW_ONE)

    @classmethod
    def recipe(cls, chosen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        model = chosen.get("model", cls.model)
        return [(f"recipe for {model}", FINETUNE_RECIPES[model])]

    def validate(self) -> None:
        super().validate()
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            # timm's Mixup pairs each image with the one mirrored in the batch.
            raise ConfigError(
                f"batch_size must be even with mixup or cutmix, got {self.batch_size}."
            )
        if self.auto_augment is not None and not self.auto_augment.startswith("rand"):
            raise ConfigError(
                f"auto_augment must be a RandAugment policy such as "
                f"{RAND_AUGMENT}, or none; got {shorten(self.auto_augment)}."
            )

    def needs(self) -> list[Need]:
        return budget.classifier(self, trains_encoder=True)


@dataclass
class LinprobeConfig(TrackOption, ClassifierOptions, DataOptions, TrainConfig):
    """A linear probe: frozen encoder, BatchNorm1d + Linear on its pooled features (MAE)."""

    output_root: ClassVar[str | None] = "linprobe"

    weight_decay: float = weight_decay_option(
        "on the head's Linear weight alone (its bias and BatchNorm take none, and the encoder "
        "is frozen)"
    )

    @classmethod
    def recipe(cls, chosen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [("the linear-probe recipe", LINPROBE_RECIPE)]

    def needs(self) -> list[Need]:
        return budget.classifier(self, trains_encoder=False)


@dataclass
class InferenceOptions(LoadingOptions):
    """Device and batching of commands that only run the network forward (eval, knn)."""

    batch_size: int = opt(128, "images per forward pass", within=COUNT)


@dataclass
class EvalConfig(FromCheckpointOptions, ImageOptions, InferenceOptions):
    """Top-1 / top-5 accuracy of a classifier checkpoint on an image folder."""

    checkpoint: str | None = opt(
        None,
        "classifier checkpoint, any supported layout, or a Hub name such as "
        "timm/convnextv2_tiny.fcmae_ft_in1k (required)",
        path="input",
    )
    data: str | None = opt(
        None, "ImageFolder to evaluate: one subfolder per class (required)", path="input"
    )

    def needs(self) -> list[Need]:
        return budget.inference(self)


@dataclass
class KnnConfig(
    PretrainedOption,
    PixelStatsOption,
    FromCheckpointOptions,
    DataOptions,
    InferenceOptions,
    OverwriteOption,
):
    """k-nearest-neighbour classification of val/ by the frozen features of train/."""

    k: int = opt(20, "neighbours that vote", within=COUNT)
    temperature: float = opt(
        0.07, "votes are weighted by exp(cosine similarity / temperature)", within=POSITIVE
    )
    save_features: str | None = opt(
        None,
        "folder to write train.pt and val.pt to: {features (N, C), labels (N,), classes, files}",
        path="output",
    )

    def needs(self) -> list[Need]:
        return budget.inference(self)


@dataclass
class ExportConfig(OverwriteOption):
    """A checkpoint rewritten in timm's convnextv2 layout."""

    checkpoint: str | None = opt(
        None, "checkpoint to export, any supported layout (required)", path="input"
    )
    output: str | None = opt(
        None,
        "file to write: .safetensors, or .pth/.bin for torch.save (this or --hub-dir)",
        path="output",
    )
    hub_dir: str | None = opt(
        None,
        "folder to write as a Hugging Face Hub model repository for timm: config.json, "
        "model.safetensors and a README.md model card (this or --output)",
        path="output",
    )

    def validate(self) -> None:
        super().validate()
        if self.output is not None and self.hub_dir is not None:
            raise ConfigError(
                "--output (a file) and --hub-dir (a Hub model folder) are alternatives; pass one."
            )


@dataclass
class SweepConfig(PretrainConfig):
    """Pretraining once per value of one setting, each encoder scored on a labelled set."""

    output_root: ClassVar[str | None] = "sweep"

    set: str | None = opt(
        None, "the pretraining key to sweep and its values, KEY=V1,V2,... (required)"
    )
    eval_data: str | None = opt(
        None,
        "folder holding train/ and val/ ImageFolders that score each encoder (required)",
        path="input",
    )
    knn_k: int = opt(20, "neighbours that vote in the kNN score", within=COUNT)
    probe_epochs: int = opt(10, "linear-probe epochs per point (0: no probe)", within=COUNT_OR_ZERO)
    finetune_epochs: int = opt(
        0, "fine-tuning epochs per point (0: no fine-tune)", within=COUNT_OR_ZERO
    )
    eval_batch_size: int = opt(
        64, "images per step of the probe and the fine-tune", within=COUNT, identity=False
    )

    def validate(self) -> None:
        super().validate()
        check_fits(self, budget.scoring(self))  # after pretraining, which has freed its memory


# The paper's fine-tuning settings per size (its appendix; the official TRAINING.md for atto,
# tiny and base): base lr, epochs, warmup, layer decay and its mode, weight decay, drop path,
# mixup, cutmix, smoothing.
_TABLE = {
    "atto": (2e-4, 600, 0, 0.9, "single", 0.3, 0.1, 0, 0, 0.2),
    "femto": (2e-4, 600, 0, 0.9, "single", 0.05, 0, 0.3, 0.3, 0.2),
    "pico": (2e-4, 600, 0, 0.9, "single", 0.3, 0, 0.3, 0.3, 0.2),
    "nano": (2e-4, 600, 0, 0.9, "single", 0.3, 0.1, 0.5, 0.5, 0.2),
    "tiny": (8e-4, 300, 40, 0.9, "single", 0.05, 0.2, 0.8, 1, 0.1),
    "base": (6.25e-4, 100, 20, 0.6, "group", 0.05, 0.1, 0.8, 1, 0.1),
    "large": (6.25e-4, 100, 20, 0.6, "group", 0.05, 0.2, 0.8, 1, 0.1),
    "huge": (1.25e-3, 50, 10, 0.75, "group", 0.05, 0.3, 0.8, 1, 0.1),
}
_TABLE_KEYS = (
    "blr",
    "epochs",
    "warmup_epochs",
    "layer_decay",
    "layer_decay_mode",
    "weight_decay",
    "drop_path",
    "mixup",
    "cutmix",
    "smoothing",
)

# The same for every size (image size and crop are ImageOptions' defaults).
FINETUNE_COMMON: dict[str, Any] = {
    "batch_size": 64,  # per device; accumulation reaches effective_batch
    "effective_batch": 1024,
    "betas": (0.9, 0.999),
    "min_lr": 1e-6,  # the official fine-tuning scripts' floor of the cosine
    "auto_augment": RAND_AUGMENT,
    "reprob": 0.25,
    "head_init_scale": 0.001,
    "model_ema": True,
    "model_ema_decay": 0.9999,
}

FINETUNE_RECIPES: dict[str, dict[str, Any]] = {
    f"convnextv2_{size}": {**dict(zip(_TABLE_KEYS, _TABLE[size])), **FINETUNE_COMMON}
    for size in SIZES
}

# Not in the paper: AdamW in place of MAE's LARS (the engine's one optimizer); MAE's 90 epochs
# with 10 of warmup, no weight decay; BatchNorm makes one lr fit any encoder's features.
LINPROBE_RECIPE: dict[str, Any] = {
    "epochs": 90,
    "warmup_epochs": 10,
    "batch_size": 128,
    "effective_batch": 1024,
    "blr": 1e-3,
    "min_lr": 0,
    "weight_decay": 0,
    "betas": (0.9, 0.999),
}


def recipe_table() -> str:
    """The fine-tuning recipes for `fcmae finetune --help`: what every size shares, then an
    aligned row per size."""
    header = ("model", "blr", "epochs/warmup", "layer decay", "wd", "drop path", "mixup/cutmix")
    rows = [(*header, "smoothing")]
    for model, r in FINETUNE_RECIPES.items():
        rows.append(
            (
                model,
                f"{r['blr']:g}",
                f"{r['epochs']}/{r['warmup_epochs']}",
                f"{r['layer_decay']:g} ({r['layer_decay_mode']})",
                f"{r['weight_decay']:g}",
                f"{r['drop_path']:g}",
                f"{r['mixup']:g}/{r['cutmix']:g}",
                f"{r['smoothing']:g}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    c = FINETUNE_COMMON
    shared = (
        f"recipes per --model (effective batch {c['effective_batch']}, AdamW betas "
        f"{' '.join(f'{b:g}' for b in c['betas'])}, RandAugment\n{c['auto_augment']}, random "
        f"erasing {c['reprob']:g}, head init {c['head_init_scale']:g}, EMA "
        f"{c['model_ema_decay']:g}):"
    )
    return "\n".join(
        [shared]
        + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    )
