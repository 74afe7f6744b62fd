"""The `fcmae` command line (also `python -m fcmae`).

Each subcommand is one entry of COMMANDS: a config dataclass whose fields become flags
(resolved by fcmae.config.schema.resolve: defaults < recipe < --config file < flags), and the job
that runs the resolved config (imported only when it runs, so --help and --print-config need
no torch). The CLI sets up console logging once for the job (the "fcmae" logger), so jobs log
rather than print. The CLI is the top layer: it names the fine-tuning stage's jobs
(fcmae.finetune), which nothing else in the core imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fcmae.config.commands import PretrainConfig
from fcmae.config.pictures import PlotConfig, VisualizeConfig
from fcmae.config.schema import resolve
from fcmae.config.tracking import TrackConfig
from fcmae.config.yaml_io import dump_yaml
from fcmae.errors import UserError
from fcmae.finetune.config import (
    LINPROBE_RECIPE,
    EvalConfig,
    ExportConfig,
    FinetuneConfig,
    KnnConfig,
    LinprobeConfig,
    SweepConfig,
    recipe_table,
)
from fcmae.models import ModelError
from fcmae.track.trackers import fcmae_version


@dataclass(frozen=True)
class Command:
    help: str
    config: type  # a fcmae.config.schema.Config dataclass: one flag per field
    job: str  # "module:function" taking the resolved config
    variants: dict[str, dict] = dataclasses.field(default_factory=dict)  # help: other defaults
    examples: str = ""


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        help="FCMAE self-supervised pretraining of a ConvNeXt V2 encoder",
        config=PretrainConfig,
        job="fcmae.experiments.monitor:pretrain",
        variants={"with --data": {"data": "DIR"}},
        examples="""\
Defaults follow the paper's recipe for the model when --data is given; without --data a short
demo runs on embedded photos. Precedence: recipe < --config FILE < flags.

examples:
  fcmae pretrain                                   # a few minutes' demo on a laptop CPU
  fcmae pretrain --model convnextv2_base --data /data/imagenet/train
  torchrun --nproc_per_node 8 -m fcmae pretrain --model convnextv2_base --data DIR
  fcmae pretrain --data 'shards/train-{000000..000127}.tar'   # WebDataset shards, or URLs
  fcmae pretrain --model convnextv2_tiny --data DIR --print-config > tiny.yaml   # edit, then
  fcmae pretrain --config tiny.yaml --data DIR --epochs 800""",
    ),
    "finetune": Command(
        help="fine-tune a pretrained encoder (or train from scratch) into a classifier",
        config=FinetuneConfig,
        job="fcmae.finetune.finetune:run",
        examples=f"""\
Defaults are the paper's recipe for --model (shown above for the default model). Every epoch
evaluates the model and its EMA on val/ and keeps checkpoint-best.pth; rerunning the same
command resumes. Precedence: recipe < --config FILE < flags.

{recipe_table()}

examples:
  fcmae finetune --model convnextv2_atto --pretrained RUN/checkpoints/encoder-1600.pth --data DIR
  fcmae finetune --model convnextv2_base --pretrained base_1k_224_fcmae.pt --train DIR --val DIR
  torchrun --nproc_per_node 8 -m fcmae finetune --model convnextv2_tiny --pretrained CKPT --data DIR
  fcmae finetune --data DIR                        # from scratch, same recipe
  fcmae finetune --model convnextv2_tiny --pretrained timm/convnextv2_tiny.fcmae \\
      --train 'shards/train/{{000000..001281}}.tar' --val 'shards/val/{{000000..000049}}.tar'""",
    ),
    "eval": Command(
        help="top-1 / top-5 accuracy of a classifier checkpoint on an image folder",
        config=EvalConfig,
        job="fcmae.finetune.evaluate:run",
        examples="""\
The checkpoint may be of any supported layout (fcmae, official fine-tuned, timm); its size,
input channels and classes are read from it. Images are resized to input_size / crop_pct and
centre-cropped.

examples:
  fcmae eval --checkpoint runs/finetune/convnextv2_atto/checkpoints/ema-best.pth --data DIR/val
  fcmae eval --checkpoint convnextv2_tiny_1k_224_ema.pt --data /data/imagenet/val""",
    ),
    "linprobe": Command(
        help="linear probe: a BatchNorm + Linear head on the frozen encoder's pooled features",
        config=LinprobeConfig,
        job="fcmae.finetune.linprobe:run",
        examples=f"""\
MAE's protocol with AdamW (the engine's optimizer): {LINPROBE_RECIPE["epochs"]} epochs, \
{LINPROBE_RECIPE["warmup_epochs"]} of warmup, no weight decay,
crop and flip only. Evaluates on val/ every epoch; rerunning the same command resumes.

examples:
  fcmae linprobe --pretrained runs/pretrain/convnextv2_atto/checkpoints/encoder-1600.pth \\
      --data DIR""",
    ),
    "knn": Command(
        help="k-nearest-neighbour accuracy of the frozen encoder's features (val/ by train/)",
        config=KnnConfig,
        job="fcmae.finetune.knn:run",
        examples="""\
Both folders go through the evaluation resize and crop; features are the globally pooled last
stage. --save-features writes them (train.pt, val.pt) for other tools.

examples:
  fcmae knn --pretrained runs/pretrain/convnextv2_atto/checkpoints/encoder-1600.pth --data DIR
  fcmae knn --model convnextv2_atto --data DIR     # a random encoder, as a baseline""",
    ),
    "export": Command(
        help="write a checkpoint in timm's convnextv2 layout (.safetensors, .pth, a Hub folder)",
        config=ExportConfig,
        job="fcmae.finetune.export:run",
        examples="""\
Any supported checkpoint (fcmae pretraining or fine-tuning, an encoder export, official,
timm); an FCMAE checkpoint gives its encoder.

examples:
  fcmae export --checkpoint runs/finetune/convnextv2_atto/checkpoints/ema-best.pth \\
      --output atto.safetensors
  python -c 'import timm; timm.create_model("convnextv2_atto", pretrained=True, num_classes=10,
             pretrained_cfg_overlay=dict(file="atto.safetensors", num_classes=10))'
(timm drops a head whose class count is not its pretrained config's 1000 unless the overlay
names the count too; the command prints the exact call.)
  fcmae export --checkpoint runs/finetune/convnextv2_atto/checkpoints/ema-best.pth \\
      --hub-dir atto-hub       # config.json, model.safetensors, README.md (a model card)
  python -c 'import timm; timm.create_model("local-dir:atto-hub", pretrained=True)'
  python -c 'import huggingface_hub as h; h.create_repo("USER/NAME", exist_ok=True);
             h.upload_folder(repo_id="USER/NAME", folder_path="atto-hub")'""",
    ),
    "sweep": Command(
        help="pretrain once per value of a setting and score each encoder (kNN, linear probe)",
        config=SweepConfig,
        job="fcmae.experiments.sweep:run",
        variants={"with --data": {"data": "DIR"}},
        examples="""\
Every point is an ordinary pretraining run directory, OUTPUT_DIR/KEY=VALUE/, with the same
settings but the swept one; each encoder is scored on --eval-data (train/ and val/ ImageFolders)
by kNN and a linear probe (and a short fine-tune with --finetune-epochs). Writes results.csv,
results.md and results.png in OUTPUT_DIR. Rerun the same command after an interruption: finished
points are not run again. Under torchrun every point pretrains on all processes.

examples:
  fcmae sweep --data DIR --eval-data LABELLED --set mask_ratio=0.4,0.5,0.6,0.7,0.8 --epochs 100
  fcmae sweep --data DIR --eval-data LABELLED --set decoder_depth=1,2 --model convnextv2_tiny""",
    ),
    "track": Command(
        help="upload run directories to MLflow or W&B from their files (runs made without them)",
        config=TrackConfig,
        job="fcmae.experiments.upload:run",
        examples="""\
Adds what the tracker lacks and nothing else: a second call adds nothing. A sweep directory
gives the sweep's run with its points nested under it.

examples:
  fcmae track runs/demo --track mlflow             # to MLFLOW_TRACKING_URI, else runs/mlflow.db
  fcmae track runs/pretrain/convnextv2_atto runs/sweep/convnextv2_atto --track mlflow wandb""",
    ),
    "visualize": Command(
        help="a PNG of FCMAE reconstructions: original, masked, prediction, pasted",
        config=VisualizeConfig,
        job="fcmae.experiments.visualize:run",
        examples="""\
Needs a pretraining checkpoint (checkpoint-NNNN.pth, with the decoder), not an encoder export.
Model settings (patch size, channels, image size, mask ratio) come from the checkpoint.

examples:
  fcmae visualize --checkpoint runs/demo/checkpoints/checkpoint-0030.pth
  fcmae visualize --checkpoint CKPT --data DIR --mask-ratio 0.75 --seed 3 --output recon.png""",
    ),
    "plot": Command(
        help="training curves (loss, lr, accuracy) of one or more runs in one PNG",
        config=PlotConfig,
        job="fcmae.experiments.plot:run",
        examples="""\
examples:
  fcmae plot runs/demo
  fcmae plot runs/finetune/a runs/finetune/b --output compare.png""",
    ),
}


def _parse_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Accept "none"/"null" for optional options, else parse."""

    def parse_optional(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)

    parse_optional.__name__ = parse.__name__  # argparse names the type in its errors
    return parse_optional


def _as_typed(value: Any, path: str | None) -> Any:
    """A default path as the user would type it: relative to this folder when inside it."""
    if path and isinstance(value, str) and value.startswith(os.getcwd() + os.sep):
        return os.path.relpath(value)
    return value


def _show(value: Any) -> str:
    if value is None or value == ():
        return "unset"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def _add_config_flags(parser: argparse.ArgumentParser, command: Command) -> None:
    """One flag per config field, default shown from the resolved config (and variants)."""
    defaults = resolve(command.config)
    others = {
        name: resolve(command.config, None, flags) for name, flags in command.variants.items()
    }
    hints = typing.get_type_hints(command.config)
    for f in dataclasses.fields(command.config):
        tp, kwargs = hints[f.name], {}
        optional = isinstance(tp, types.UnionType)
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        path = f.metadata.get("path")
        default = _as_typed(getattr(defaults, f.name), path)
        shown = f"default: {_show(default)}" + "".join(
            f"; {name}: {_show(_as_typed(getattr(cfg, f.name), path))}"
            for name, cfg in others.items()
            if _as_typed(getattr(cfg, f.name), path) != default
            and f.name not in command.variants[name]
        )
        if f.metadata.get("positional"):  # optional here: a --config file may give them
            parser.add_argument(
                f.name,
                nargs="*",
                default=argparse.SUPPRESS,
                metavar=f.name.upper().rstrip("S"),
                help=f.metadata["help"],
            )
            continue
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple and typing.get_args(tp)[-1] is Ellipsis:
            kwargs.update(nargs="+", action="extend", metavar="NAME")  # --track a b, or twice
        elif typing.get_origin(tp) is tuple:
            kwargs.update(nargs=len(typing.get_args(tp)), type=float, metavar="X")
        else:
            kwargs["type"] = _parse_none(tp) if optional else tp
            kwargs["metavar"] = f.name.upper()
        choices = f.metadata.get("choices")
        if choices:
            kwargs["choices"] = choices
            if len(",".join(map(str, choices))) < 40:  # long lists go in the help, not usage
                kwargs.pop("metavar", None)
            else:
                shown = f"{shown}; one of {', '.join(map(str, choices))}"
        text = f.metadata["help"]
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            default=argparse.SUPPRESS,
            # a help that states its own default (or that the flag is required) keeps it
            help=text if "default:" in text or "(required)" in text else f"{text} ({shown})",
            **kwargs,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcmae",
        description="FCMAE self-supervised pretraining and fine-tuning of "
        "ConvNeXt V2 in plain PyTorch.",
        epilog="Run `fcmae COMMAND --help` for its options.",
    )
    parser.add_argument("--version", action="version", version=f"fcmae {fcmae_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name,
            help=command.help,
            description=command.help,
            epilog=command.examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument(
            "--config",
            metavar="FILE",
            default=None,
            help="YAML file of options (keys as the flags, with underscores); flags override it",
        )
        p.add_argument(
            "--print-config",
            action="store_true",
            help="print the resolved configuration as YAML and exit",
        )
        _add_config_flags(p, command)
    return parser


def _report(error: UserError | ModelError) -> None:
    """One line on stderr; under torchrun every rank prefixes its rank, and errors that every
    rank raises together are reported by rank 0 alone."""
    rank = int(os.environ.get("RANK", 0))
    if rank and getattr(error, "all_ranks", False):
        return
    prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
    message = str(error)
    if "Original Traceback" in message:  # raised in a DataLoader worker: keep its last line
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    print(f"{prefix}fcmae: error: {message}", file=sys.stderr)


def _run(command: Command, cfg: Any) -> None:
    """Run command's job on cfg with console logging: INFO on the main process, warnings and
    errors (prefixed with the rank) on the others."""
    from fcmae.run.logs import close_logging, setup_logging  # torch-free; only a job needs it

    handlers = setup_logging(None, int(os.environ.get("RANK", 0)))
    try:
        module, function = command.job.split(":")
        getattr(importlib.import_module(module), function)(cfg)
    finally:
        close_logging(handlers)


def _attached(argv: list[str]) -> list[str]:
    """argv with "--pixel-stats VALUE" written "--pixel-stats=VALUE": argparse reads a value
    that starts with "-" (a negative first mean) as an option of its own."""
    out, rest = [], iter(argv)
    for arg in rest:
        value = next(rest, None) if arg == "--pixel-stats" else None
        if value is not None and value.startswith("-"):
            out.append(f"{arg}={value}")
        else:
            out.extend(a for a in (arg, value) if a is not None)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fcmae` console script; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(_attached(sys.argv[1:] if argv is None else argv))
        if args.command is None:
            parser.print_help()
            return 0
        command = COMMANDS[args.command]
        flags = {
            k: v for k, v in vars(args).items() if k not in ("command", "config", "print_config")
        }
        cfg = resolve(command.config, args.config, flags)
        if args.print_config:
            print(dump_yaml(cfg.to_dict()), end="")
            return 0
        _run(command, cfg)
        return 0
    except (UserError, ModelError) as e:
        _report(e)
        return 1
    except KeyboardInterrupt:
        print(
            "\nInterrupted. Rerun the same command to resume from the last checkpoint.",
            file=sys.stderr,
        )
        return 130
    finally:
        if "torch" in sys.modules:  # a job ran: leave its process group, if it joined one
            from fcmae.train.distributed import shutdown

            shutdown()
