"""Configurations of the fine-tuning stage's commands: finetune, linprobe, eval, knn, export.

Resolved by fcmae.config.resolve like pretraining's. The fine-tuning recipes are SPEC section
3's table. Imports no torch, so `fcmae --help` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from fcmae.config import Config, LoadingOptions, PretrainConfig, TrainConfig, opt
from fcmae.errors import ConfigError
from fcmae.models import CLASSIFIERS, SIZES

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


def _check_image_size(input_size: int, crop_pct: float) -> None:
    if input_size < 32:
        raise ConfigError(
            f"input_size must be at least 32 (the network's stride), got {input_size}."
        )
    if not 0 < crop_pct <= 1:
        raise ConfigError(f"crop_pct must lie in (0, 1], got {crop_pct}.")


@dataclass
class DataOptions(Config):
    """Labelled image folders and image sizing (finetune, linprobe, knn)."""

    data: str | None = opt(
        None,
        "folder holding train/ and val/, each an ImageFolder tree "
        "(one subfolder of images per class)",
    )
    train: str | None = opt(
        None,
        "training ImageFolder, in place of DATA/train; finetune and linprobe also take "
        "WebDataset shards (a .tar, a brace pattern, URLs; labels from .cls)",
    )
    val: str | None = opt(
        None, "validation ImageFolder, in place of DATA/val; or shards, as --train takes"
    )
    input_size: int = opt(224, "image size in pixels that the network sees")
    in_chans: int = opt(3, "image channels: 3 (RGB) or 1 (grayscale)", choices=(1, 3))
    crop_pct: float = opt(
        0.875,
        "evaluation: resize the shorter side to input_size / crop_pct, then centre-crop input_size",
    )


@dataclass
class FinetuneConfig(DataOptions, TrainConfig):
    """A fine-tuning run: a pretrained (or fresh) encoder becomes a classifier."""

    output_root: ClassVar[str | None] = "finetune"

    model: str = opt(
        "convnextv2_atto", "network to fine-tune; its recipe sets the defaults", choices=CLASSIFIERS
    )
    pretrained: str | None = opt(
        None,
        "checkpoint to start from, any supported layout (fcmae, official, timm; detected), "
        "or a Hub name such as timm/convnextv2_tiny.fcmae; unset: train from scratch",
    )
    num_classes: int | None = opt(
        None,
        "classes of the head; default: the class folders of the training data, which it must equal",
    )
    drop_path: float = opt(0.1, "stochastic depth rate of the last block (linear from 0)")
    head_init_scale: float = opt(0.001, "scale of the freshly initialised head's weights")
    layer_decay: float = opt(
        0.9,
        "layer-wise lr decay: layer id i trains at "
        "layer_decay^(L+1-i) times the lr; 1 turns it off",
    )
    layer_decay_mode: str = opt(
        "single",
        "layer ids: one per block (single) or the 12 groups of base and larger (group)",
        choices=("single", "group"),
    )
    smoothing: float = opt(0.2, "label smoothing")
    mixup: float = opt(0.0, "mixup alpha (timm Mixup); 0: off")
    cutmix: float = opt(0.0, "cutmix alpha (timm Mixup); 0: off")
    auto_augment: str | None = opt(RAND_AUGMENT, "timm RandAugment policy; none: off")
    reprob: float = opt(0.25, "random erasing probability (timm, per-pixel noise)")
    model_ema: bool = opt(
        True, "keep an exponential moving average of the weights and evaluate it too"
    )
    model_ema_decay: float = opt(0.9999, "EMA decay per optimizer step")

    @classmethod
    def recipe(cls, chosen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        model = chosen.get("model", cls.model)
        return [(f"recipe for {model}", FINETUNE_RECIPES[model])]

    def validate(self) -> None:
        super().validate()
        _check_image_size(self.input_size, self.crop_pct)
        if self.num_classes is not None and self.num_classes <= 0:
            raise ConfigError(f"num_classes must be positive, got {self.num_classes}.")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must lie in (0, 1], got {self.layer_decay}.")
        for key in ["drop_path", "smoothing", "model_ema_decay"]:
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key} must lie in [0, 1), got {getattr(self, key)}.")
        if not 0 <= self.reprob <= 1:
            raise ConfigError(f"reprob must lie in [0, 1], got {self.reprob}.")
        if self.mixup < 0 or self.cutmix < 0:
            raise ConfigError(
                f"mixup and cutmix must not be negative, got {self.mixup} and {self.cutmix}."
            )
        if (self.mixup or self.cutmix) and self.batch_size % 2:
            # timm's Mixup pairs each image with the one mirrored in the batch.
            raise ConfigError(
                f"batch_size must be even with mixup or cutmix, got {self.batch_size}."
            )
        if self.auto_augment is not None and not self.auto_augment.startswith("rand"):
            raise ConfigError(
                f"auto_augment must be a RandAugment policy such as "
                f"{RAND_AUGMENT}, or none; got {self.auto_augment!r}."
            )


@dataclass
class LinprobeConfig(DataOptions, TrainConfig):
    """A linear probe: frozen encoder, BatchNorm1d + Linear on its pooled features (MAE)."""

    output_root: ClassVar[str | None] = "linprobe"

    model: str = opt("convnextv2_atto", "encoder to probe", choices=CLASSIFIERS)
    pretrained: str | None = opt(
        None,
        "encoder checkpoint, any supported layout, or a Hub name such as "
        "timm/convnextv2_tiny.fcmae; unset: a randomly initialised encoder (a baseline)",
    )
    num_classes: int | None = opt(
        None,
        "classes of the head; default: the class folders of the training data, which it must equal",
    )

    @classmethod
    def recipe(cls, chosen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [("the linear-probe recipe", LINPROBE_RECIPE)]

    def validate(self) -> None:
        super().validate()
        _check_image_size(self.input_size, self.crop_pct)
        if self.num_classes is not None and self.num_classes <= 0:
            raise ConfigError(f"num_classes must be positive, got {self.num_classes}.")


@dataclass
class InferenceOptions(LoadingOptions):
    """Device and batching of commands that only run the network forward (eval, knn)."""

    batch_size: int = opt(128, "images per forward pass")

    def validate(self) -> None:
        super().validate()
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}.")


@dataclass
class EvalConfig(InferenceOptions):
    """Top-1 / top-5 accuracy of a classifier checkpoint on an image folder."""

    checkpoint: str | None = opt(
        None,
        "classifier checkpoint, any supported layout, or a Hub name such as "
        "timm/convnextv2_tiny.fcmae_ft_in1k (required)",
    )
    data: str | None = opt(None, "ImageFolder to evaluate: one subfolder per class (required)")
    model: str | None = opt(None, "network; default: the checkpoint's size", choices=CLASSIFIERS)
    in_chans: int | None = opt(None, "image channels; default: the checkpoint's", choices=(1, 3))
    input_size: int = opt(224, "image size in pixels that the network sees")
    crop_pct: float = opt(
        0.875, "resize the shorter side to input_size / crop_pct, then centre-crop input_size"
    )

    def validate(self) -> None:
        super().validate()
        _check_image_size(self.input_size, self.crop_pct)


@dataclass
class KnnConfig(DataOptions, InferenceOptions):
    """k-nearest-neighbour classification of val/ by the frozen features of train/."""

    pretrained: str | None = opt(
        None,
        "encoder checkpoint, any supported layout, or a Hub name such as "
        "timm/convnextv2_tiny.fcmae; unset: a randomly initialised encoder (a baseline)",
    )
    model: str | None = opt(
        None, "encoder; default: the checkpoint's size, else convnextv2_atto", choices=CLASSIFIERS
    )
    in_chans: int | None = opt(
        None, "image channels; default: the checkpoint's, else 3", choices=(1, 3)
    )
    k: int = opt(20, "neighbours that vote")
    temperature: float = opt(0.07, "votes are weighted by exp(cosine similarity / temperature)")
    save_features: str | None = opt(
        None,
        "folder to write train.pt and val.pt to: {features (N, C), labels (N,), classes, files}",
    )

    def validate(self) -> None:
        super().validate()
        _check_image_size(self.input_size, self.crop_pct)
        if self.k <= 0 or self.temperature <= 0:
            raise ConfigError(
                f"k and temperature must be positive, got {self.k} and {self.temperature}."
            )


@dataclass
class ExportConfig(Config):
    """A checkpoint rewritten in timm's convnextv2 layout."""

    checkpoint: str | None = opt(None, "checkpoint to export, any supported layout (required)")
    output: str | None = opt(
        None, "file to write: .safetensors, or .pth/.bin for torch.save (required)"
    )


@dataclass
class SweepConfig(PretrainConfig):
    """Pretraining once per value of one setting, each encoder scored on a labelled set."""

    output_root: ClassVar[str | None] = "sweep"

    set: str | None = opt(
        None, "the pretraining key to sweep and its values, KEY=V1,V2,... (required)"
    )
    eval_data: str | None = opt(
        None, "folder holding train/ and val/ ImageFolders that score each encoder (required)"
    )
    knn_k: int = opt(20, "neighbours that vote in the kNN score")
    probe_epochs: int = opt(10, "linear-probe epochs per point (0: no probe)")
    finetune_epochs: int = opt(0, "fine-tuning epochs per point (0: no fine-tune)")
    eval_batch_size: int = opt(64, "images per step of the probe and the fine-tune")

    def validate(self) -> None:
        super().validate()
        _positive_or_zero = [k for k in ("probe_epochs", "finetune_epochs") if getattr(self, k) < 0]
        if _positive_or_zero:
            key = _positive_or_zero[0]
            raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}.")
        if self.knn_k <= 0 or self.eval_batch_size <= 0:
            raise ConfigError(
                f"knn_k and eval_batch_size must be positive, got {self.knn_k} and "
                f"{self.eval_batch_size}."
            )


# SPEC section 3: per size (base lr, epochs, warmup, layer decay and its mode, weight decay,
# drop path, mixup, cutmix, smoothing).
_TABLE = {
    "atto": (2e-4, 600, 0, 0.9, "single", 0.3, 0.1, 0.0, 0.0, 0.2),
    "femto": (2e-4, 600, 0, 0.9, "single", 0.05, 0.0, 0.3, 0.3, 0.2),
    "pico": (2e-4, 600, 0, 0.9, "single", 0.3, 0.0, 0.3, 0.3, 0.2),
    "nano": (2e-4, 600, 0, 0.9, "single", 0.3, 0.1, 0.5, 0.5, 0.2),
    "tiny": (8e-4, 300, 40, 0.9, "single", 0.05, 0.2, 0.8, 1.0, 0.1),
    "base": (6.25e-4, 100, 20, 0.6, "group", 0.05, 0.1, 0.8, 1.0, 0.1),
    "large": (6.25e-4, 100, 20, 0.6, "group", 0.05, 0.2, 0.8, 1.0, 0.1),
    "huge": (1.25e-3, 50, 10, 0.75, "group", 0.05, 0.3, 0.8, 1.0, 0.1),
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

# The same for every size.
FINETUNE_COMMON: dict[str, Any] = {
    "batch_size": 64,  # per device; accumulation reaches effective_batch
    "effective_batch": 1024,
    "betas": (0.9, 0.999),
    "min_lr": 1e-6,  # the official fine-tuning scripts' floor of the cosine
    "input_size": 224,
    "crop_pct": 0.875,
    "auto_augment": RAND_AUGMENT,
    "reprob": 0.25,
    "head_init_scale": 0.001,
    "model_ema": True,
    "model_ema_decay": 0.9999,
    "save_every": 10,
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
    "min_lr": 0.0,
    "weight_decay": 0.0,
    "betas": (0.9, 0.999),
}


def recipe_table() -> str:
    """The fine-tuning recipes as an aligned text table, for `fcmae finetune --help`."""
    rows = [
        (
            "model",
            "blr",
            "epochs/warmup",
            "layer decay",
            "wd",
            "drop path",
            "mixup/cutmix",
            "smoothing",
        )
    ]
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
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows
    )
