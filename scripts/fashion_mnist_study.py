"""Does FCMAE pretraining pay off? Label efficiency on Fashion-MNIST, through the `fcmae` CLI.

    python scripts/fashion_mnist_study.py        # about 70 minutes on a 2-core CPU

Needs Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`). ConvNeXt V2-Atto,
grayscale, images upscaled from 28 to --size px (bicubic) so that the 32-px patches tile them.

1. Writes PNG ImageFolders once: pretrain/ (a random --pretrain-images subset of the 60k training
   images, labels unused), labels-1/, labels-10/, labels-100/ (balanced 1%, 10% and 100% of the
   60k training images), val/ (1,000 of the test images, only watched during fine-tuning) and
   test/ (the other 9,000 test images: every number below).
2. `fcmae pretrain` on pretrain/ for --pretrain-epochs (mask ratio 0.5: 2 of the 4 patches).
3. `fcmae knn`: the pretrained and a random encoder, labels-10/ votes for test/.
4. `fcmae finetune` of the pretrained encoder and of the same network from scratch on each label
   fraction, with the same budget per fraction (epochs, lr schedule, augmentation); from scratch
   without layer-wise lr decay, as supervised training is done.
5. Compute-matched: scratch on the 10% labels, given the pretraining's wall-clock as extra epochs.
6. `fcmae eval` of each last-epoch EMA checkpoint on test/.

Every step resumes or is skipped when done, so rerunning continues an interrupted study. Writes
OUT/results.md (table, wall-clock, the commands) and OUT/label_efficiency.png.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
from fashion_mnist import CLASSES, accuracy, epochs_of, fcmae, finish, read_split
from PIL import Image

# Label fraction (%) -> fine-tuning epochs: the same for pretrained and scratch.
FRACTIONS = {1: 40, 10: 5, 100: 1}


def write_folders(root: Path, size: int, pretrain_images: int, seed: int = 0) -> None:
    """The ImageFolders of the module docstring, written once (root/.done marks it)."""
    if (root / ".done").exists():
        return
    print(f"Writing Fashion-MNIST as {size}-px PNGs under {root} ...", flush=True)
    rng = np.random.default_rng(seed)
    train, test = read_split("train"), read_split("t10k")
    files = root / "files"

    def save(split, images, labels):
        for i, (image, label) in enumerate(zip(images, labels)):
            path = files / split / f"{split}{i:05d}-{label}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).resize((size, size), Image.BICUBIC).save(path)

    save("train", *train)
    save("test", *test)

    def link(folder, split, indices, labels):
        for i in indices:
            target = files / split / f"{split}{i:05d}-{labels[i]}.png"
            (folder / CLASSES[labels[i]]).mkdir(parents=True, exist_ok=True)
            (folder / CLASSES[labels[i]] / target.name).symlink_to(target.resolve())

    link(root / "pretrain", "train", rng.permutation(len(train[1]))[:pretrain_images], train[1])
    for percent in FRACTIONS:  # balanced: the same share of every class
        chosen = [
            i
            for c in range(10)
            for i in rng.permutation(np.flatnonzero(train[1] == c))[
                : len(train[1]) * percent // 1000
            ]
        ]
        link(root / f"labels-{percent}", "train", chosen, train[1])
    order = rng.permutation(len(test[1]))
    link(root / "val", "test", order[:1000], test[1])
    link(root / "test", "test", order[1000:], test[1])
    (root / ".done").write_text("ok\n")


def plot(rows: dict[str, dict[int, float]], matched: tuple[int, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, marker in (("FCMAE pretrained", "o"), ("from scratch", "s")):
        ax.plot(list(rows[name]), list(rows[name].values()), marker=marker, label=name)
    ax.plot(
        *matched, marker="*", markersize=12, linestyle="none", label="from scratch, compute-matched"
    )
    ax.set_xscale("log")
    ax.set_xticks(list(FRACTIONS), [f"{p}%" for p in FRACTIONS])
    ax.set_xlabel("labelled training images (share of 60k)")
    ax.set_ylabel("test top-1 (%), EMA weights")
    ax.set_title("ConvNeXt V2-Atto on Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/fashion_mnist", help="data and runs go here")
    parser.add_argument("--size", type=int, default=64, help="image size (a multiple of 32)")
    parser.add_argument("--pretrain-images", type=int, default=20000)
    parser.add_argument("--pretrain-epochs", type=int, default=12)
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    data = out / "data"
    write_folders(data, args.size, args.pretrain_images)
    commands: list[str] = []
    common = [
        "--model",
        "convnextv2_atto",
        "--in-chans",
        "1",
        "--input-size",
        str(args.size),
        "--num-workers",
        "0",
    ]

    pretrain = out / "pretrain"
    fcmae(
        "pretrain",
        *common,
        "--data",
        str(data / "pretrain"),
        "--output-dir",
        str(pretrain),
        "--epochs",
        str(args.pretrain_epochs),
        "--warmup-epochs",
        "1",
        "--batch-size",
        "128",
        "--effective-batch",
        "none",
        "--lr",
        "2e-3",
        "--mask-ratio",
        "0.5",
        "--save-every",
        "1",
        log=commands,
    )
    # The median epoch, so that a few epochs slowed by other work on the machine do not count.
    pretrain_s = float(np.median([r["time_s"] for r in epochs_of(pretrain)])) * args.pretrain_epochs
    encoder = pretrain / "checkpoints" / f"encoder-{args.pretrain_epochs:04d}.pth"
    test = str(data / "test")

    knn = {
        name: accuracy(
            fcmae(
                "knn",
                *common,
                "--train",
                str(data / "labels-10"),
                "--val",
                test,
                *extra,
                log=commands,
            ),
            "kNN",
        )
        for name, extra in (
            ("FCMAE pretrained", ["--pretrained", str(encoder)]),
            ("from scratch", []),
        )
    }

    def finetune(run: Path, labels: int, epochs: int, extra: list[str]) -> float:
        fcmae(
            "finetune",
            *common,
            "--train",
            str(data / f"labels-{labels}"),
            "--val",
            str(data / "val"),
            "--epochs",
            str(epochs),
            "--warmup-epochs",
            f"{epochs / 10:g}",
            "--batch-size",
            "64",
            "--effective-batch",
            "none",
            "--lr",
            "2e-3",
            "--model-ema-decay",
            "0.995",
            "--save-every",
            str(epochs),
            *extra,
            "--output-dir",
            str(run),
            log=commands,
        )
        ckpt = run / "checkpoints" / f"ema-{epochs:04d}.pth"
        output = fcmae(
            "eval",
            "--checkpoint",
            str(ckpt),
            "--data",
            test,
            "--input-size",
            str(args.size),
            "--num-workers",
            "0",
            log=commands,
        )
        return accuracy(output, str(ckpt))

    variants = {
        "FCMAE pretrained": ("pretrained", ["--pretrained", str(encoder)]),
        "from scratch": ("scratch", ["--layer-decay", "1.0"]),
    }
    rows: dict[str, dict[int, float]] = {name: {} for name in variants}
    for percent, epochs in FRACTIONS.items():
        for name, (tag, extra) in variants.items():
            rows[name][percent] = finetune(
                out / f"finetune-{tag}-{percent}", percent, epochs, extra
            )

    # Compute-matched: the 10% scratch run, given the pretraining's wall-clock as more epochs.
    epoch_s = np.median([r["time_s"] for r in epochs_of(out / "finetune-scratch-10")])
    matched_epochs = FRACTIONS[10] + math.ceil(pretrain_s / epoch_s)
    matched = finetune(
        out / f"finetune-scratch-10-{matched_epochs}ep",
        10,
        matched_epochs,
        ["--layer-decay", "1.0"],
    )

    header = " | ".join(f"{p}% labels ({FRACTIONS[p]} ep)" for p in FRACTIONS)
    lines = [
        f"| ConvNeXt V2-Atto, test top-1 (EMA) | {header} | kNN, 10% labels vote |",
        "|---" * (len(FRACTIONS) + 2) + "|",
    ]
    for name, accs in rows.items():
        cells = " | ".join(f"{accs[p]:.2f}" for p in FRACTIONS)
        lines.append(
            f"| {name} | {cells} | {knn[name]:.2f}"
            f"{' (random init)' if name == 'from scratch' else ''} |"
        )
    lines.append(f"| from scratch, compute-matched ({matched_epochs} ep) | | {matched:.2f} | | |")
    plot(rows, (10, matched), out / "label_efficiency.png")
    text = "\n".join(lines) + (
        f"\n\nFashion-MNIST at {args.size} px, grayscale. Pretraining: {args.pretrain_epochs} "
        f"epochs on {args.pretrain_images} training images (labels unused), "
        f"{pretrain_s / 60:.1f} min; the compute-matched run adds that wall-clock to the 10% "
        f"scratch run as {matched_epochs - FRACTIONS[10]} more epochs of {epoch_s:.0f} s. "
        f"Test: 9,000 test images, last-epoch EMA weights.\n\nCommands:\n\n"
        + "\n".join(f"    {c}" for c in commands)
        + "\n"
    )
    finish(out, text, out / "label_efficiency.png", start)


if __name__ == "__main__":
    main()
