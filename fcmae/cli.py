"""The `fcmae` command line (also `python -m fcmae`).

Each subcommand is one entry of COMMANDS: a config dataclass whose fields become flags, a
resolver that layers defaults, recipe, --config file and flags, and the job that runs the
resolved config (imported only when it runs, so --help needs no torch). Fine-tuning,
evaluation and benchmarks are further entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from fcmae.config import PretrainConfig, resolve_pretrain
from fcmae.errors import UserError


@dataclass(frozen=True)
class Command:
    help: str
    config: type                                # dataclass: one flag per field
    resolve: Callable[[str | None, dict], Any]  # (config file, flags) -> validated config
    job: str                                    # "module:function" taking the config
    variants: dict[str, dict] = dataclasses.field(default_factory=dict)  # help: other defaults
    examples: str = ""


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        help="FCMAE self-supervised pretraining of a ConvNeXt V2 encoder",
        config=PretrainConfig,
        resolve=resolve_pretrain,
        job="fcmae.pretrain:run",
        variants={"with --data": {"data": "DIR"}},
        examples="""\
Defaults follow the paper's recipe for the model when --data is given; without --data a short
demo runs on embedded photos. Precedence: recipe < --config FILE < flags.

examples:
  fcmae pretrain                                   # ~2 min demo on this CPU
  fcmae pretrain --model convnextv2_base --data /data/imagenet/train
  torchrun --nproc_per_node 8 -m fcmae pretrain --model convnextv2_base --data DIR
  fcmae pretrain --config configs/pretrain/convnextv2_tiny.yaml --data DIR --epochs 800""",
    ),
}


def _parse_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Accept "none"/"null" for optional options, else parse."""
    def parse_optional(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)
    parse_optional.__name__ = parse.__name__  # argparse names the type in its errors
    return parse_optional


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def _add_config_flags(parser: argparse.ArgumentParser, command: Command) -> None:
    """One flag per config field, default shown from the resolved config (and variants)."""
    defaults = command.resolve(None, {})
    others = {name: command.resolve(None, flags) for name, flags in command.variants.items()}
    hints = typing.get_type_hints(command.config)
    for f in dataclasses.fields(command.config):
        tp, kwargs = hints[f.name], {}
        optional = isinstance(tp, types.UnionType)
        if optional:
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        default = getattr(defaults, f.name)
        shown = f"default: {_show(default)}" + "".join(
            f"; {name}: {_show(getattr(cfg, f.name))}" for name, cfg in others.items()
            if getattr(cfg, f.name) != default and f.name not in command.variants[name])
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
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
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']} ({shown})", **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fcmae", description="FCMAE self-supervised pretraining and fine-tuning of "
        "ConvNeXt V2 in plain PyTorch.", epilog="Run `fcmae COMMAND --help` for its options.")
    parser.add_argument("--version", action="version", version=f"fcmae {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help,
                           epilog=command.examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", metavar="FILE", default=None,
                       help="YAML file of options (keys as the flags, with underscores); flags "
                       "override it")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved configuration as YAML and exit")
        _add_config_flags(p, command)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("fcmae")
    except PackageNotFoundError:
        return "unknown"


def _report(error: UserError) -> None:
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fcmae` console script; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        command = COMMANDS[args.command]
        flags = {k: v for k, v in vars(args).items()
                 if k not in ("command", "config", "print_config")}
        cfg = command.resolve(args.config, flags)
        if args.print_config:
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return 0
        module, function = command.job.split(":")
        getattr(importlib.import_module(module), function)(cfg)
        return 0
    except UserError as e:
        _report(e)
        return 1
    except KeyboardInterrupt:
        print("\nInterrupted. Rerun the same command to resume from the last checkpoint.",
              file=sys.stderr)
        return 130
