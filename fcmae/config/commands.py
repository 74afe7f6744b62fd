"""The commands' options of the core (device, loading, network, images, training) and the
pretraining, visualize and plot configurations: the pretraining recipe's numbers live in
fcmae.config.recipes, the machinery that declares and resolves options in fcmae.config.schema.
Torch-free."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from fcmae.config import budget
from fcmae.config.budget import Need
from fcmae.config.recipes import PRETRAIN_DEMO, PRETRAIN_RECIPE
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
from fcmae.config.tracking import MonitorOptions, TrackOption
from fcmae.data.stats import HELP, LEGACY, parse_stats
from fcmae.errors import ConfigError, cut, shorten
from fcmae.models import CLASSIFIERS
from fcmae.models.masking import check_masking
from fcmae.run.paths import resolved
from fcmae.sites import BACKENDS

# torch.Generator.manual_seed takes seeds below 2**64, and DistributedSampler seeds one with
# seed + epoch (numpy's SeedSequence, which derives the others, takes any size).
SEED = Range(
    0, INT64, low_closed=True, why="torch seeds a generator with seed + epoch, below 2**64"
)
FLOAT32_MAX = 3.4028234663852886e38
CHANNELS = Range(
    1, 1024, low_closed=True, high_closed=True, why="bands of an image, e.g. 13 of Sentinel-2"
)
CHANNELS_HELP = (
    "image channels: 3 (RGB), 1 (grey) or any count (e.g. 13 Sentinel-2 bands; TIFF and .npy "
    "files hold them)"
)


def weight_decay_option(on: str) -> Any:
    """The --weight-decay option of a command whose AdamW groups decay what on says."""
    return opt(RECIPE, f"AdamW weight decay {on}", within=NON_NEGATIVE)


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
                f"device must be auto, cpu, cuda, cuda:N or mps, got {shorten(self.device)}."
            )


@dataclass
class LoadingOptions(DeviceOptions):
    """DeviceOptions, and the processes that load data."""

    num_workers: int | None = opt(
        None,
        "data-loading processes per device; default: one "
        "less than the CPU cores per device, at most 8, and none "
        "with 2 cores or fewer",
        within=Range(
            0,
            128,
            low_closed=True,
            high_closed=True,
            why="processes per device: more exhaust the system's process and open-file limits",
        ),
        identity=False,
    )


@dataclass
class NetworkOptions(Config):
    """The network that a training command builds (pretrain, finetune, linprobe)."""

    model: str = opt("convnextv2_atto", "ConvNeXt V2 size of the encoder", choices=CLASSIFIERS)
    in_chans: int = opt(3, CHANNELS_HELP, within=CHANNELS)
    grn: bool = opt(
        True,
        "GRN in every block (ConvNeXt V2); --no-grn builds ConvNeXt V1's blocks instead (layer "
        "scale, init 1e-6), the paper's ablation of GRN",
    )


@dataclass
class PixelStatsOption(Config):
    """The statistics images are normalised with (fcmae.data.stats), for in_chans channels."""

    pixel_stats: str = opt("auto", HELP, legacy=LEGACY)

    def validate(self) -> None:
        super().validate()
        if getattr(self, "in_chans", None):  # else the checkpoint's (knn): checked there
            stats = parse_stats(self.pixel_stats, self.in_chans)
            if stats is not None and self.pixel_stats != "imagenet":
                self.pixel_stats = str(stats)  # one spelling per value: " 0.5" is 0.5


@dataclass
class DisplayOption(Config):
    """The channels pictures of images show (pretrain's reconstructions, visualize)."""

    display_channels: str | None = opt(
        None,
        "channels the pictures show, numbered from 1: three as false colour (red,green,blue, "
        "e.g. 3,2,1) or one in grey; default: 1,2,3, or 1 for images of fewer channels",
        identity=False,
    )

    def validate(self) -> None:
        super().validate()
        if getattr(self, "in_chans", None):  # else the checkpoint's (visualize): checked there
            parse_channels(self.display_channels, self.in_chans)


@dataclass
class OverwriteOption(Config):
    """Commands that write files of their own outside a run directory (export, visualize,
    plot, knn): whether they may replace existing ones."""

    overwrite: bool = opt(
        False,
        "replace output files that already exist and that fcmae did not write (without it they "
        "are refused; a picture fcmae wrote is replaced anyway)",
        identity=False,
    )


@dataclass
class ImagesOption(Config):
    """Unlabelled images, or the embedded demo photos (pretrain, visualize)."""

    data: str | None = opt(
        None,
        "image folder (ImageFolder tree or flat, searched recursively), or WebDataset tar "
        "shards (a .tar, a brace pattern such as train-{000000..000127}.tar, URLs); without "
        "it, the embedded demo photos",
        path="input",
    )


@dataclass
class TrainConfig(LoadingOptions):
    """What the engine reads: optimisation, schedule, checkpoints, logging. The optimisation
    numbers come from the command's recipe."""

    output_dir: str | None = opt(
        None, "run directory: checkpoints, logs, resolved config", identity=False, path="output"
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
    epochs: int = opt(RECIPE, "training epochs", within=COUNT, identity=False)
    warmup_epochs: float = opt(
        RECIPE, "epochs of linear lr warmup (per iteration), then cosine", within=NON_NEGATIVE
    )
    batch_size: int = opt(
        RECIPE, "images per device per forward pass", within=COUNT, identity=False
    )
    effective_batch: int | None = opt(
        RECIPE,
        "images per optimizer step over all devices; sets --accum-iter when that is not given",
        within=COUNT,
    )
    accum_iter: int | None = opt(
        None,
        "forward passes per optimizer step (gradient "
        "accumulation); default from --effective-batch, else 1",
        within=COUNT,
        identity=False,
    )
    blr: float = opt(
        RECIPE, "base learning rate: lr = blr * effective_batch / 256", within=POSITIVE
    )
    lr: float | None = opt(None, "absolute learning rate; overrides --blr", within=POSITIVE)
    min_lr: float = opt(RECIPE, "learning rate at the end of the cosine", within=NON_NEGATIVE)
    weight_decay: float = weight_decay_option(
        "on all parameters but 1-D tensors (norms), biases and those the model names "
        "(fcmae.train.optim.param_groups)"
    )
    betas: tuple[float, float] = opt(RECIPE, "AdamW betas", within=Range(0, 1, low_closed=True))
    clip_grad: float | None = opt(
        None, "clip the gradient norm to this value (off when unset)", within=POSITIVE
    )
    seed: int = opt(0, "random seed (each process adds its rank)", within=SEED)
    dist_timeout: float = opt(
        600,
        "under torchrun: seconds a process waits for the others at a collective (gradient "
        "sync, checkpoint barrier) before the run stops with an error",
        within=Range(0, 9e9, high_closed=True, why="torch counts it in nanoseconds, in 64 bits"),
        identity=False,
    )
    save_every: int = opt(
        10,
        "write a checkpoint every N epochs (and always at the end)",
        within=COUNT,
        identity=False,
    )
    keep_last: int = opt(3, "keep the newest K checkpoints", within=COUNT, identity=False)
    resume: str = opt(
        "auto",
        "auto: continue from the newest valid checkpoint in the output "
        "dir; none: start fresh; or a checkpoint path",
        identity=False,
    )
    log_every: int = opt(
        1,
        "write step metrics (JSON lines, TensorBoard) every N optimizer steps",
        within=COUNT,
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
        # torch computes AdamW's step, lr / (1 - beta1^t), in float32 and refuses one that
        # overflows: the peak lr (here its lowest, on one process) must fit, and without warmup
        # so must the first step (t = 1) at the peak.
        images = self.batch_size * self.accum_iter if self.accum_iter else self.effective_batch
        peak = self.lr if self.lr is not None else self.blr * (images or self.batch_size) / 256
        step = peak if self.warmup_epochs else peak / (1 - self.betas[0])
        if step > FLOAT32_MAX:
            raise ConfigError(
                f"The learning rate would reach {peak:.3g}, so that AdamW's step ({step:.3g}) "
                f"overflows a float32 (at most {FLOAT32_MAX:.3g}); lower --lr or --blr."
            )
        unknown = sorted(set(self.accepted_changes()) - set(self.identity_keys()))
        if unknown:
            raise ConfigError(
                f"accept_changes names {cut(', '.join(unknown), 80)}, not a setting that "
                f"defines the run; name some of {', '.join(self.identity_keys())}."
            )

    def accepted_changes(self) -> tuple[str, ...]:
        """The settings --accept-changes names (dashes read as underscores)."""
        names = (self.accept_changes or "").replace("-", "_").split(",")
        return tuple(name.strip() for name in names if name.strip())

    def resolve_paths(self) -> None:
        """The path options, and --resume PATH: the run's own checkpoint, so neither an input
        nor an output (it may lie in --output-dir)."""
        super().resolve_paths()
        if self.resume not in ("auto", "none"):
            self.resume = resolved(self.resume, hub=False)


@dataclass
class PretrainConfig(
    MonitorOptions,
    TrackOption,
    ImagesOption,
    DisplayOption,
    PixelStatsOption,
    NetworkOptions,
    TrainConfig,
):
    """An FCMAE pretraining run."""

    output_root: ClassVar[str | None] = "pretrain"

    input_size: int = opt(
        RECIPE, "training crop size in pixels, a multiple of --patch-size", within=COUNT
    )
    patch_size: int = opt(RECIPE, "masking patch size in pixels", within=COUNT)
    mask_ratio: float = opt(RECIPE, "fraction of patches masked per image")
    init: str | None = opt(
        None,
        "start from these weights instead of a random encoder: any checkpoint fcmae reads "
        "(fcmae's, the official pt_only and main_pretrain files, timm files, Hub names such as "
        "timm/convnextv2_base.fcmae); its decoder too when it holds one; another channel count "
        "is adapted. Read once, at the start: a resume continues from the run's checkpoint",
        path="input",
        legacy=None,
    )
    decoder_depth: int = opt(1, "ConvNeXt V2 blocks in the decoder", within=COUNT)
    decoder_dim: int = opt(512, "width of the decoder", within=COUNT)
    norm_pix_loss: bool = opt(RECIPE, "standardise each target patch by its own mean and variance")
    weight_decay: float = weight_decay_option(
        "on all parameters but 1-D tensors (norms) and biases: GRN's gamma and beta and the "
        "mask token too, unless --no-decay-grn"
    )
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
        within=COUNT,
    )
    recon_every: int = opt(
        10,
        "every N epochs, write reconstructions of a fixed set of images to recon/ and "
        "TensorBoard (0: never)",
        within=COUNT_OR_ZERO,
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

    def needs(self) -> list[Need]:
        return budget.pretraining(self)


def parse_channels(text: str | None, in_chans: int) -> tuple[int, ...]:
    """--display-channels: 1-based channel numbers, three or one; default the first three (the
    first alone with fewer than three channels). ConfigError for anything else."""
    if text is None:
        return (1, 2, 3) if in_chans >= 3 else (1,)
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        channels = ()
    if len(channels) not in (1, 3) or not all(1 <= c <= in_chans for c in channels):
        raise ConfigError(
            f"--display-channels {text!r} must name three channels (red, green, blue) or one "
            f"(grey) among 1..{in_chans} of these {in_chans}-channel images, e.g. "
            f"{'3,2,1' if in_chans >= 3 else '1'}."
        )
    return channels


def check_backend(name: str) -> None:
    """Refuse a backend whose package is missing, without importing it (nor torch): the
    minkowski backend needs MinkowskiEngine. (Unknown names are refused by the choices.)"""
    if name == "minkowski" and importlib.util.find_spec("MinkowskiEngine") is None:
        raise ConfigError(
            "--backend minkowski needs MinkowskiEngine, which is not installed in this "
            "environment: run `bash scripts/install_minkowski.sh` (a CPU build, about 8 minutes)."
        )
