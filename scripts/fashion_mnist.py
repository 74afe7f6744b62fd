"""Fashion-MNIST for the studies in scripts/: Debian's dataset-fashion-mnist, and a runner of
the `fcmae` CLI that records each command.

    apt-get install dataset-fashion-mnist      # /usr/share/datasets/fashion-mnist, MIT licence
"""

from __future__ import annotations

import gzip
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
PROGRESS = re.compile(r"epoch \d+/\d+  step ")  # per-step lines, not echoed
CLASSES = (
    "0-tshirt",
    "1-trouser",
    "2-pullover",
    "3-dress",
    "4-coat",
    "5-sandal",
    "6-shirt",
    "7-sneaker",
    "8-bag",
    "9-ankle-boot",
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a uint8 array: (N, 28, 28) images or (N,) labels."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def read_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """("train" or "t10k") -> (images (N, 28, 28) uint8, labels (N,) uint8)."""
    if not SOURCE.is_dir():
        sys.exit(f"{SOURCE} is missing: apt-get install dataset-fashion-mnist")
    return (
        read_idx(SOURCE / f"{split}-images-idx3-ubyte.gz"),
        read_idx(SOURCE / f"{split}-labels-idx1-ubyte.gz"),
    )


def write_folders(root: Path, pretrain: int, train: int, val: int, seed: int) -> tuple[Path, Path]:
    """root/unlabelled (pretrain of the train images, flat) and root/labelled/{train,val}/CLASS/
    (train of those, and val test images) as PNGs: seeded, as many of each class."""
    rng = np.random.default_rng(seed)
    for split, prefix, count in (("train", "train", pretrain), ("val", "t10k", val)):
        images, labels = read_split(prefix)
        picks = [rng.permutation(np.flatnonzero(labels == c))[: count // 10] for c in range(10)]
        for c, chosen in enumerate(picks):
            for n, i in enumerate(chosen):
                if split == "train":
                    (root / "unlabelled").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(images[i]).save(root / "unlabelled" / f"{i:05d}.png")
                if split == "val" or n < train // 10:
                    folder = root / "labelled" / split / CLASSES[c]
                    folder.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    return root / "unlabelled", root / "labelled"


def fcmae(*args: str, log: list[str]) -> str:
    """Run `python -m fcmae ARGS`, stream its output, return it; record the command."""
    log.append(shlex.join(["fcmae", *args]))
    print(f"\n$ {log[-1]}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fcmae", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not PROGRESS.match(line):
            print(line, end="", flush=True)
    if proc.wait():
        sys.exit(f"fcmae {args[0]} failed (exit {proc.returncode})")
    print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    return "".join(lines)


def finish(out: Path, text: str, plot: Path, start: float) -> None:
    """Write OUT/results.md and print it, where the plot is and the total wall-clock."""
    (out / "results.md").write_text(text)
    print(f"\n{text}\nPlot: {plot}\nTotal {(time.perf_counter() - start) / 60:.1f} minutes.")


def epochs_of(run: Path) -> list[dict]:
    """The epoch records of a run's metrics.jsonl."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == "epoch"]


def accuracy(output: str, marker: str) -> float:
    """The top-1 number on the output line that contains marker."""
    line = next(line for line in output.splitlines() if marker in line and "top-1" in line)
    return float(line.split("top-1")[1].split("%")[0])
