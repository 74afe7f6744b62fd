"""The commands' options of the core (device, loading, network, images, training) and the
pretraining, visualize and plot configurations, with the pretraining recipe: the numbers live
here, the machinery that declares and resolves them in fcmae.config.schema. Torch-free."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from fcmae.config.schema import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    RECIPE,
    Config,
    Range,
    opt,
)
from fcmae.errors import ConfigError
from fcmae.models import CLASSIFIERS
from fcmae.models.masking import check_masking
from fcmae.sites import BACKENDS


@dataclass
class DeviceOptions(Config):
    """Where and in what precision a command runs."""

    device: str = opt("auto", "auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps", identity=False)
    precision: str = opt(
        "auto",
        "auto: bf16 on GPUs that support it, else fp16 on cuda, fp32 elsewhere",
        choices=("auto", "bf16", "fp16", "fp32"),
        identity=False,
    )

    def validate(self) -> None:
        super().validate()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(
                f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}."
            )


@dataclass
class LoadingOptions(DeviceOptions):
    """DeviceOptions, and the processes that load data."""

    num_workers: int | None = opt(
        None,
        "data-loading processes per device; default: one "
        "less than the CPU cores per device, at most 8, and none "
        "with 2 cores or fewer",
        within=NON_NEGATIVE,
        identity=False,
    )


@dataclass
class NetworkOptions(Config):
    """The network that a training command builds (pretrain, finetune, linprobe)."""

    model: str = opt("convnextv2_atto", "ConvNeXt V2 size of the encoder", choices=CLASSIFIERS)
    in_chans: int = opt(3, "image channels: 3 (RGB) or 1 (grayscale)", choices=(1, 3))
    grn: bool = opt(
        True,
        "GRN in every block (ConvNeXt V2); --no-grn builds ConvNeXt V1's blocks instead (layer "
        "scale, init 1e-6), the paper's ablation of GRN",
    )


@dataclass
class ImagesOption(Config):
    """Unlabelled images, or the embedded demo photos (pretrain, visualize)."""

    data: str | None = opt(
        None,
        "image folder (ImageFolder tree or flat, searched recursively), or WebDataset tar "
        "shards (a .tar, a brace pattern such as train-{000000..000127}.tar, URLs); without "
        "it, the embedded demo photos",
    )


@dataclass
class TrainConfig(LoadingOptions):
    """What the engine reads: optimisation, schedule, checkpoints, logging. The optimisation
    numbers come from the command's recipe."""

    output_dir: str | None = opt(
        None, "run directory: checkpoints, logs, resolved config", identity=False
    )
    compile: bool = opt(False, "torch.compile the model", identity=False)
    channels_last: bool = opt(
        False, "channels-last memory format for model and images", identity=False
    )
    grad_checkpointing: bool = opt(
        False,
        "activation checkpointing: the encoder's blocks recompute their activations in the "
        "backward pass instead of keeping them (less memory, more compute; linprobe's frozen "
        "encoder keeps none anyway)",
        identity=False,
    )
    epochs: int = opt(RECIPE, "training epochs", within=POSITIVE, identity=False)
    warmup_epochs: float = opt(
        RECIPE, "epochs of linear lr warmup (per iteration), then cosine", within=NON_NEGATIVE
    )
    batch_size: int = opt(
        RECIPE, "images per device per forward pass", within=POSITIVE, identity=False
    )
    effective_batch: int | None = opt(
        RECIPE,
        "images per optimizer step over all devices; sets --accum-iter when that is not given",
        within=POSITIVE,
    )
    accum_iter: int | None = opt(
        None,
        "forward passes per optimizer step (gradient "
        "accumulation); default from --effective-batch, else 1",
        within=POSITIVE,
        identity=False,
    )
    blr: float = opt(
        RECIPE, "base learning rate: lr = blr * effective_batch / 256", within=POSITIVE
    )
    lr: float | None = opt(None, "absolute learning rate; overrides --blr", within=POSITIVE)
    min_lr: float = opt(RECIPE, "learning rate at the end of the cosine", within=NON_NEGATIVE)
    weight_decay: float = opt(
        RECIPE,
        "AdamW weight decay (none on the parameters the model "
        "names: biases, norms, GRN, mask token)",
        within=NON_NEGATIVE,
    )
    betas: tuple[float, float] = opt(RECIPE, "AdamW betas", within=Range(0, 1, low_closed=True))
    clip_grad: float | None = opt(
        None, "clip the gradient norm to this value (off when unset)", within=POSITIVE
    )
    seed: int = opt(0, "random seed (each process adds its rank)", within=NON_NEGATIVE)
    dist_timeout: float = opt(
        600.0,
        "under torchrun: seconds a process waits for the others at a collective (gradient "
        "sync, checkpoint barrier) before the run stops with an error",
        within=POSITIVE,
        identity=False,
    )
    save_every: int = opt(
        10,
        "write a checkpoint every N epochs (and always at the end)",
        within=POSITIVE,
        identity=False,
    )
    keep_last: int = opt(3, "keep the newest K checkpoints", within=POSITIVE, identity=False)
    resume: str = opt(
        "auto",
        "auto: continue from the newest valid checkpoint in the output "
        "dir; none: start fresh; or a checkpoint path",
        identity=False,
    )
    log_every: int = opt(
        1,
        "write step metrics (JSON lines, TensorBoard) every N optimizer steps",
        within=POSITIVE,
        identity=False,
    )
    accept_changes: str | None = opt(
        None,
        "resume although these settings that define the run differ from the run's, KEY,KEY,... "
        "(the change is written to log.txt and metrics.jsonl)",
        identity=False,
    )

    def validate(self) -> None:
        super().validate()
        if self.warmup_epochs > self.epochs:
            raise ConfigError(
                f"warmup_epochs ({self.warmup_epochs}) must lie between 0 and "
                f"epochs ({self.epochs}); set --warmup-epochs too when shortening "
                f"a run."
            )
        if self.lr is not None and self.min_lr > self.lr:  # with --blr: fcmae.train.optim checks
            raise ConfigError(
                f"min_lr ({self.min_lr:g}) must not exceed lr ({self.lr:g}), the peak of the "
                f"schedule; lower --min-lr."
            )
        unknown = sorted(set(self.accepted_changes()) - set(self.identity_keys()))
        if unknown:
            raise ConfigError(
                f"accept_changes names {', '.join(unknown)}, not a setting that defines the "
                f"run; name some of {', '.join(self.identity_keys())}."
            )

    def accepted_changes(self) -> tuple[str, ...]:
        """The settings --accept-changes names (dashes read as underscores)."""
        names = (self.accept_changes or "").replace("-", "_").split(",")
        return tuple(name.strip() for name in names if name.strip())


@dataclass
class PretrainConfig(ImagesOption, NetworkOptions, TrainConfig):
    """An FCMAE pretraining run."""

    output_root: ClassVar[str | None] = "pretrain"

    input_size: int = opt(RECIPE, "training crop size in pixels, a multiple of --patch-size")
    patch_size: int = opt(RECIPE, "masking patch size in pixels")
    mask_ratio: float = opt(RECIPE, "fraction of patches masked per image")
    decoder_depth: int = opt(1, "ConvNeXt V2 blocks in the decoder", within=POSITIVE)
    decoder_dim: int = opt(512, "width of the decoder", within=POSITIVE)
    norm_pix_loss: bool = opt(RECIPE, "standardise each target patch by its own mean and variance")
    decay_grn: bool = opt(
        RECIPE,
        "weight decay on GRN's gamma/beta and the mask token too, as the official pretraining "
        "does (timm's add_weight_decay exempts only 1-D tensors and biases); --no-decay-grn "
        "exempts them, as the official fine-tuning exempts GRN's",
    )
    backend: str = opt(
        "sparse", "how the encoder skips masked sites", choices=tuple(BACKENDS), identity=False
    )
    demo_images: int = opt(
        256,
        "random crops per epoch drawn from the embedded photos (only without --data)",
        within=POSITIVE,
    )
    recon_every: int = opt(
        10,
        "every N epochs, write reconstructions of a fixed set of images to recon/ and "
        "TensorBoard (0: never)",
        within=NON_NEGATIVE,
        identity=False,
    )

    @classmethod
    def recipe(cls, chosen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        layers = [(f"recipe for {chosen.get('model', cls.model)}", PRETRAIN_RECIPE)]
        if chosen.get("data") is None:
            layers.append(("demo settings", PRETRAIN_DEMO))
        return layers

    def validate(self) -> None:
        super().validate()
        check_masking(self.input_size, self.patch_size, self.mask_ratio)
        check_backend(self.backend)


@dataclass
class VisualizeConfig(ImagesOption, DeviceOptions):
    """A PNG grid of FCMAE reconstructions: original, masked, prediction, pasted."""

    checkpoint: str | None = opt(None, "pretraining checkpoint (with its decoder) (required)")
    output: str | None = opt(
        None, "PNG to write; default: CHECKPOINT_STEM-recon.png beside the checkpoint"
    )
    images: int = opt(
        8,
        "rows: N images of --data, evenly spaced in path order (so every class)",
        within=POSITIVE,
    )
    mask_ratio: float | None = opt(
        None, "fraction of patches masked; default: the checkpoint's", within=FRACTION
    )
    input_size: int | None = opt(
        None, "image size in pixels; default: the checkpoint's", within=POSITIVE
    )
    seed: int = opt(0, "random seed of the masks", within=NON_NEGATIVE)


@dataclass
class PlotConfig(Config):
    """Training curves of one or more runs, overlaid, in one PNG."""

    runs: tuple[str, ...] = opt((), "run directories (their metrics.jsonl)", positional=True)
    output: str | None = opt(
        None,
        "PNG to write; default: curves.png in the run directory "
        "(of the first run when there are several)",
    )


def check_backend(name: str) -> None:
    """Refuse a backend whose package is missing, without importing it (nor torch): the
    minkowski backend needs MinkowskiEngine. (Unknown names are refused by the choices.)"""
    if name == "minkowski" and importlib.util.find_spec("MinkowskiEngine") is None:
        raise ConfigError(
            "--backend minkowski needs MinkowskiEngine, which is not installed in this "
            "environment: run `bash scripts/install_minkowski.sh` (a CPU build, about 8 minutes)."
        )


# The paper's pretraining recipe (its appendix; the official TRAINING.md gives the same command
# for convnextv2_base), the same for every size. 1600 epochs is what the released encoders were
# trained for; the paper's ablations use 800.
PRETRAIN_RECIPE: dict[str, Any] = {
    "epochs": 1600,
    "warmup_epochs": 40,
    "batch_size": 64,
    "effective_batch": 4096,
    "blr": 1.5e-4,
    "min_lr": 0.0,
    "weight_decay": 0.05,
    "betas": (0.9, 0.95),
    "input_size": 224,
    "patch_size": 32,
    "mask_ratio": 0.6,
    "norm_pix_loss": True,
    "decay_grn": True,  # the official main_pretrain.py decays all but 1-D tensors and biases
}

# Without --data: a short run on the embedded photos that finishes in a few minutes on a
# 2-core CPU and still shows the loss falling. Small batches need a higher lr than the rule gives.
PRETRAIN_DEMO: dict[str, Any] = {
    "epochs": 30,
    "warmup_epochs": 2,
    "batch_size": 32,
    "effective_batch": None,
    "blr": 1.5e-2,
    "input_size": 96,
    "output_dir": "runs/demo",
}
