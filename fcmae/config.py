"""Plain-data configuration: the one source of truth for every command's options and recipes.

A command's configuration is a dataclass of plain values; its fields are the command's flags
(with their help, allowed values and range) and its ``recipe`` names the layers of defaults
that depend on the model or the data. ``resolve`` layers them, later ones winning:

    dataclass defaults < the recipe for the model (and demo settings) < the --config YAML file
    < command-line flags

Each option is declared once: options that several commands share are small dataclasses
(NetworkOptions, ImagesOption, ...) that the commands' configurations inherit. Numbers live in
one place: a field that a recipe sets has no dataclass default (``RECIPE``), so the recipe is
where its value is read; a field no recipe touches keeps its default here. Ranges are declared
beside the option (``within=POSITIVE``) and checked by ``Config.validate`` with one sentence
naming the key; a class's own ``validate`` holds only the rules that relate several keys.

Every layer is checked against the dataclass: an unknown key or a value of the wrong type is a
ConfigError that names the key and where it came from. This module imports no torch, and
neither does validation, so `fcmae --help` and `--print-config` stay fast.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from fcmae.errors import ConfigError
from fcmae.models import CLASSIFIERS
from fcmae.models.masking import check_masking
from fcmae.sites import BACKENDS

C = TypeVar("C", bound="Config")

RECIPE: Any = dataclasses.MISSING  # as a field's default: none here, the command's recipe sets it


@dataclass(frozen=True)
class Range:
    """The allowed values of a number: an interval, open or closed at either end."""

    low: float
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False
    why: str = ""  # said after the rule, e.g. "the network's stride"

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def rule(self) -> str:
        """How a message says it: "must be positive", "must lie in (0, 1]", ..."""
        if self.high < math.inf:
            left, right = "[" if self.low_closed else "(", "]" if self.high_closed else ")"
            text = f"must lie in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low == 0:
            text = "must not be negative" if self.low_closed else "must be positive"
        else:
            text = f"must be {'at least' if self.low_closed else 'more than'} {self.low:g}"
        return f"{text} ({self.why})" if self.why else text


POSITIVE = Range(0)
NON_NEGATIVE = Range(0, low_closed=True)
FRACTION = Range(0, 1)  # (0, 1)


def opt(
    default: Any,
    help: str,
    choices: tuple | None = None,
    positional: bool = False,
    within: Range | None = None,
    identity: bool = True,
) -> Any:
    """A keyword-only dataclass field with the help text (and allowed values or range) the CLI
    shows; default RECIPE: the recipe supplies it. A positional field takes one or more values
    without a flag. A range applies to every element of a tuple; None is always allowed.
    identity=False declares an option that may change when a run resumes (how it runs, not
    what it computes); every other option defines the run (``Config.identity_keys``)."""
    metadata = {
        "help": help,
        "choices": choices,
        "positional": positional,
        "within": within,
        "identity": identity,
    }
    return field(default=default, kw_only=True, metadata=metadata)


def _elements(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


@dataclass
class Config:
    """Base of every command's configuration."""

    output_root: ClassVar[str | None] = None  # output_dir defaults to runs/<output_root>/<model>

    @classmethod
    def recipe(cls, chosen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """Named layers of defaults between the dataclass and the user's values, lowest first;
        chosen: the user's values (config file and flags)."""
        return []

    def validate(self) -> None:
        """Raise ConfigError naming the key: every number is finite, then every declared range
        holds. Subclasses add the rules that relate several keys."""
        fields = dataclasses.fields(self)
        for f in fields:
            value = getattr(self, f.name)
            if any(isinstance(v, float) and not math.isfinite(v) for v in _elements(value)):
                raise ConfigError(
                    f"--{f.name.replace('_', '-')} must be a finite number, got {value}."
                )
        for f in fields:
            value, within = getattr(self, f.name), f.metadata.get("within")
            if within and value is not None and not all(v in within for v in _elements(value)):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(f"{f.name} {within.rule()}, got {shown}.")

    @classmethod
    def identity_keys(cls) -> tuple[str, ...]:
        """The options that define a run: a resume must keep their values (fcmae.rundir)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("identity", True))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for YAML files and checkpoints."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


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
        if self.lr is not None and self.min_lr > self.lr:  # with --blr: fcmae.optim checks
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


def _describe(tp: Any) -> str:
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            return f"a list of {_describe(args[0])}s"
        return f"a list of {len(args)} numbers"
    if _is_optional(tp):
        return f"{_describe(_inner(tp))} or null"
    return str(tp)


def _is_optional(tp: Any) -> bool:
    return isinstance(tp, types.UnionType) and type(None) in typing.get_args(tp)


def _inner(tp: Any) -> Any:
    return next(a for a in typing.get_args(tp) if a is not type(None))


def _coerce(value: Any, tp: Any) -> Any:
    """Return value as type tp, or raise ValueError."""
    if _is_optional(tp):
        return None if value is None else _coerce(value, _inner(tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis and isinstance(value, (list, tuple)):
            return tuple(_coerce(v, args[0]) for v in value)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a) for v, a in zip(value, args))
    raise ValueError


def check(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate keys and types of one layer against dataclass cls; return the coerced values.

    source names the layer in error messages, e.g. "configs/pretrain/x.yaml".
    """
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(
                f"Unknown key {key!r} in {source}; known keys: {', '.join(sorted(known))}."
            )
        try:
            out[key] = _coerce(value, hints[key])
        except ValueError:
            raise ConfigError(
                f"Key {key!r} in {source} must be {_describe(hints[key])}, got {value!r}."
            ) from None
        choices = known[key].metadata.get("choices")
        if choices and out[key] is not None and out[key] not in choices:
            raise ConfigError(
                f"Key {key!r} in {source} must be one of "
                f"{', '.join(map(str, choices))}, got {value!r}."
            )
    return out


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int):
        self.key, self.line = key, line


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that gives a key twice (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad syntax or a key given twice is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; check the --config path.")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError:
        raise ConfigError(
            f"Config file {path} is not text; pass a YAML file (--print-config writes one)."
        ) from None
    except _DuplicateKey as e:
        raise ConfigError(
            f"Config file {path} gives the key {e.key!r} twice (again on line {e.line}); keep "
            f"one of them."
        ) from None
    except yaml.YAMLError as e:
        message = f"Config file {path} is not valid YAML ({e})."
        raise ConfigError(message.replace("\n", " ")) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of keys to values.")
    return values


def resolve(cls: type[C], config_file: str | None = None, flags: dict[str, Any] | None = None) -> C:
    """The validated configuration of cls from its layers: defaults < cls.recipe < the config
    file < flags."""
    file_values = check(cls, load_yaml(config_file), config_file) if config_file else {}
    chosen = {**file_values, **check(cls, flags or {}, "the command line")}
    merged: dict[str, Any] = {}
    for _, values in cls.recipe(chosen):
        merged.update(values)
    cfg = cls(**{**merged, **chosen})
    if cls.output_root and getattr(cfg, "output_dir", "") is None:
        cfg.output_dir = f"runs/{cls.output_root}/{cfg.model}"
    cfg.validate()
    return cfg


def write_yaml(values: dict[str, Any], path: str | Path) -> None:
    """Write plain data as YAML, keys in their declared order."""
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


def require(cfg: Any, *keys: str) -> None:
    """Raise ConfigError naming the first of keys that is unset."""
    for key in keys:
        if getattr(cfg, key) is None:
            raise ConfigError(f"--{key.replace('_', '-')} is required; see --help.")
