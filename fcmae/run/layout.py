"""Every file name of a run directory, in one place (torch-free).

RUN/config.yaml                   the resolved configuration
RUN/identity.yaml                 the command and the settings that define the run
RUN/manifest.json                 the files this run wrote (clean-up and pruning touch only those)
RUN/.lock                         held while a process runs in the directory
RUN/log.txt, metrics.jsonl, tb/   the log and the metric sinks
RUN/trackers.json                 the runs of the experiment trackers that mirror this one
RUN/recon/epoch-0010.png          pretraining's reconstruction pictures
RUN/checkpoints/checkpoint-0010.pth        training state after 10 epochs
RUN/checkpoints/encoder-0010.pth           an export written with it (the job names its
                                           kinds: encoder, ema, ...)
RUN/checkpoints/checkpoint-best.pth, ema-best.pth   tagged files: never pruned
"""

from __future__ import annotations

import re

CONFIG = "config.yaml"
IDENTITY = "identity.yaml"
MANIFEST = "manifest.json"
LOCK = ".lock"
LOG = "log.txt"
METRICS = "metrics.jsonl"
TENSORBOARD = "tb"
TRACKERS = "trackers.json"
RECON = "recon"
CHECKPOINTS = "checkpoints"
CHECKPOINT = "checkpoint"  # the kind of the training-state files
EFFECTIVE = "effective_batch"  # recorded resolved: images per optimizer step


def default_run_dir(command: str, model: str, data: str | None) -> str:
    """The one default of --output-dir: runs/<command>/<model>, and runs/demo for the
    pretraining demo (pretrain without --data)."""
    return "runs/demo" if command == "pretrain" and data is None else f"runs/{command}/{model}"


def file_name(tag: int | str, kind: str = CHECKPOINT) -> str:
    """``checkpoint-0010.pth`` for epoch 10, ``ema-best.pth`` for kind "ema" and tag "best"."""
    return f"{kind}-{tag:04d}.pth" if isinstance(tag, int) else f"{kind}-{tag}.pth"


def numbered(name: str, kind: str = CHECKPOINT, suffix: str = ".pth") -> int | None:
    """The epoch of a numbered file name of kind (``checkpoint-0010.pth`` -> 10,
    ``epoch-0010.png`` of kind "epoch" with suffix ".png"), else None."""
    match = re.fullmatch(rf"{re.escape(kind)}-(\d{{4,}}){re.escape(suffix)}", name)
    return int(match[1]) if match else None


def recon_name(epoch: int) -> str:
    """Where pretraining draws its reconstructions after epoch: ``recon/epoch-0010.png``."""
    return f"{RECON}/epoch-{epoch:04d}.png"
