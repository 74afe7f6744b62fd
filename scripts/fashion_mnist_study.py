"""Does FCMAE pretraining help? A small study on Fashion-MNIST, run through the `fcmae` CLI.

    python scripts/fashion_mnist_study.py            # about 25 minutes on a 2-core CPU

1. Converts Debian's dataset-fashion-mnist (IDX files) to PNG ImageFolders once, upscaled from
   28 to --size px (bicubic) so that the 32-px masking patches tile the image:
   all/ (the 60k training images, for pretraining: labels unused), labelled/train/ (a balanced
   subset of --labelled training images), labelled/val/ (2,000 other training images, to watch
   fine-tuning) and test/ (the 10k test images, touched only by the final evaluations).
2. `fcmae pretrain` ConvNeXt V2-Atto (grayscale) on all/ for --pretrain-epochs.
3. `fcmae knn` of the pretrained and of a random encoder (labelled/train/ votes for test/).
4. `fcmae finetune` the pretrained encoder, and the same network from scratch, with the same
   fine-tuning budget (epochs, images, lr schedule); from scratch without layer-wise lr decay,
   as supervised training is done (decay would only slow the layers that must learn most).
5. `fcmae eval` of each last-epoch checkpoint, model and EMA, on test/.

Prints a markdown table and writes it, with the exact commands, to OUT/results.md.
"""

from __future__ import annotations

import argparse
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
CLASSES = ("0-tshirt", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal", "6-shirt",
           "7-sneaker", "8-bag", "9-ankle-boot")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as a uint8 array: (N, 28, 28) images or (N,) labels."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_folders(root: Path, size: int, labelled: int, val: int = 2000, seed: int = 0) -> None:
    """The ImageFolders of the module docstring, written once (root/.done marks it)."""
    if (root / ".done").exists():
        return
    print(f"Writing Fashion-MNIST as {size}-px PNGs under {root} ...", flush=True)
    splits = {"train": (read_idx(SOURCE / "train-images-idx3-ubyte.gz"),
                        read_idx(SOURCE / "train-labels-idx1-ubyte.gz")),
              "test": (read_idx(SOURCE / "t10k-images-idx3-ubyte.gz"),
                       read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz"))}
    for split, (images, labels) in splits.items():
        folder = root / ("all" if split == "train" else "test")
        for c in CLASSES:
            (folder / c).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).resize((size, size), Image.BICUBIC).save(
                folder / CLASSES[label] / f"{split}{i:05d}.png")
    # Balanced, disjoint labelled subsets of the training images, as links to their files.
    rng = np.random.default_rng(seed)
    train_labels = splits["train"][1]
    for c in range(10):
        chosen = rng.choice(np.flatnonzero(train_labels == c), (labelled + val) // 10, replace=False)
        for subset, indices in (("train", chosen[:labelled // 10]), ("val", chosen[labelled // 10:])):
            folder = root / "labelled" / subset / CLASSES[c]
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices:
                target = root / "all" / CLASSES[c] / f"train{i:05d}.png"
                (folder / target.name).symlink_to(target.resolve())
    (root / ".done").write_text("ok\n")


def fcmae(*args: str, log: list[str]) -> str:
    """Run `python -m fcmae ARGS`, stream its output, return it; record the command."""
    command = [sys.executable, "-m", "fcmae", *args]
    log.append(shlex.join(["fcmae", *args]))
    print(f"\n$ {log[-1]}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if not PROGRESS.match(line):
            print(line, end="", flush=True)
    if proc.wait():
        sys.exit(f"fcmae {args[0]} failed (exit {proc.returncode})")
    print(f"({time.perf_counter() - start:.0f} s)", flush=True)
    return "".join(lines)


def last_epoch(run: Path) -> dict:
    """The run's last epoch record in metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "epoch"][-1]


def accuracy(output: str, marker: str) -> float:
    """The top-1 number on the output line that contains marker."""
    line = next(line for line in output.splitlines() if marker in line and "top-1" in line)
    return float(line.split("top-1")[1].split("%")[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/fashion_mnist", help="data and runs go here")
    parser.add_argument("--size", type=int, default=64, help="image size (a multiple of 32)")
    parser.add_argument("--labelled", type=int, default=5000, help="labelled training images")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--finetune-epochs", type=int, default=8)
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    data = out / "data"
    write_folders(data, args.size, args.labelled)
    commands: list[str] = []
    common = ["--model", "convnextv2_atto", "--in-chans", "1", "--input-size", str(args.size),
              "--num-workers", "0"]

    pretrain = out / "pretrain"
    fcmae("pretrain", *common, "--data", str(data / "all"), "--output-dir", str(pretrain),
          "--epochs", str(args.pretrain_epochs), "--warmup-epochs", "0.5", "--batch-size", "128",
          "--effective-batch", "none", "--lr", "2e-3", "--mask-ratio", "0.5",
          "--save-every", "1", log=commands)
    encoder = pretrain / "checkpoints" / f"encoder-{args.pretrain_epochs:04d}.pth"

    labelled = ["--data", str(data / "labelled")]
    test = str(data / "test")
    knn = {name: accuracy(fcmae("knn", *common, "--train", str(data / "labelled/train"),
                                "--val", test, *extra, log=commands), "kNN")
           for name, extra in (("FCMAE pretrained", ["--pretrained", str(encoder)]),
                               ("from scratch", []))}

    finetune = [*common, *labelled, "--epochs", str(args.finetune_epochs), "--warmup-epochs",
                "1", "--batch-size", "64", "--effective-batch", "none", "--lr", "2e-3",
                "--model-ema-decay", "0.995", "--save-every", str(args.finetune_epochs)]
    runs = {"FCMAE pretrained": (out / "finetune-pretrained", ["--pretrained", str(encoder)]),
            "from scratch": (out / "finetune-scratch", ["--layer-decay", "1.0"])}
    rows = []
    for name, (run, extra) in runs.items():
        fcmae("finetune", *finetune, *extra, "--output-dir", str(run), log=commands)
        tops = []
        for prefix in ("checkpoint", "ema"):
            ckpt = run / "checkpoints" / f"{prefix}-{args.finetune_epochs:04d}.pth"
            output = fcmae("eval", "--checkpoint", str(ckpt), "--data", test, "--input-size",
                           str(args.size), "--num-workers", "0", log=commands)
            tops.append(accuracy(output, str(ckpt)))
        rows.append(f"| {name} | {tops[0]:.2f} | {tops[1]:.2f} | "
                    f"{last_epoch(run)['best_acc1']:.2f} | {knn[name]:.2f}"
                    f"{' (random init)' if name == 'from scratch' else ''} |")

    text = "\n".join([
        "| ConvNeXt V2-Atto | test top-1 | test top-1, EMA | best val top-1 (2k) | "
        "kNN test top-1 before fine-tuning |", "|---|---|---|---|---|", *rows]) + (
        f"\n\nFashion-MNIST at {args.size} px, grayscale. Pretraining: {args.pretrain_epochs} "
        f"epochs on the 60k training images (labels unused); fine-tuning: "
        f"{args.finetune_epochs} epochs on {args.labelled} labelled images; test: the 10k "
        f"test images, last-epoch weights.\n\nCommands:\n\n"
        + "\n".join(f"    {c}" for c in commands) + "\n")
    (out / "results.md").write_text(text)
    print(f"\n{text}\nTotal {(time.perf_counter() - start) / 60:.1f} minutes.")


if __name__ == "__main__":
    main()
