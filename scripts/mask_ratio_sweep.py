"""Which masking ratio? A `fcmae sweep` over five ratios on Fashion-MNIST, on a 2-core CPU.

    python scripts/mask_ratio_sweep.py           # about 35 minutes on a quiet 2-core CPU

Needs Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`). Images are
upscaled from 28 to 128 px (bicubic), so that the 32-px patches form a 4x4 grid of 16: every
ratio masks a different number of patches (0.4 masks 7, 0.5 8, 0.6 10, 0.7 12, 0.8 13).

1. Writes PNG ImageFolders once: pretrain/ (--pretrain-images random training images, labels
   unused), eval/train/ (1,000 other training images, balanced) and eval/val/ (500 test
   images).
2. `fcmae sweep --set mask_ratio=...`: ConvNeXt V2-Atto pretrained once per ratio with the same
   data, epochs and schedule; each encoder scored on eval/ by kNN and a linear probe.

Rerunning continues an interrupted sweep. Writes OUT/sweep/results.{csv,md,png} and
OUT/results.md (the table and the command).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from fashion_mnist import CLASSES, fcmae, finish, read_split
from PIL import Image


def write_folders(root: Path, size: int, pretrain_images: int, seed: int = 0) -> None:
    """The ImageFolders of the module docstring, written once (root/.done marks it)."""
    if (root / ".done").exists():
        return
    print(f"Writing Fashion-MNIST as {size}-px PNGs under {root} ...", flush=True)
    rng = np.random.default_rng(seed)
    (train_x, train_y), (test_x, test_y) = read_split("train"), read_split("t10k")
    order = rng.permutation(len(train_y))
    rest = order[pretrain_images:]  # labelled images the pretraining never sees
    labelled = [i for c in range(10) for i in rest[train_y[rest] == c][:100]]
    for folder, images, labels, indices in (
        ("pretrain", train_x, train_y, order[:pretrain_images]),
        ("eval/train", train_x, train_y, labelled),
        ("eval/val", test_x, test_y, rng.permutation(len(test_y))[:500]),
    ):
        for i in indices:
            path = root / folder / CLASSES[labels[i]] / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).save(path)
    (root / ".done").write_text("ok\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/mask_ratio_sweep", help="data and runs go here")
    parser.add_argument("--ratios", default="0.4,0.5,0.6,0.7,0.8")
    parser.add_argument("--pretrain-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--probe-epochs", type=int, default=20)
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    write_folders(out / "data", 128, args.pretrain_images)
    commands: list[str] = []
    fcmae(
        "sweep",
        "--model",
        "convnextv2_atto",
        "--in-chans",
        "1",
        "--input-size",
        "128",
        "--data",
        str(out / "data" / "pretrain"),
        "--eval-data",
        str(out / "data" / "eval"),
        "--set",
        f"mask_ratio={args.ratios}",
        "--epochs",
        str(args.epochs),
        "--warmup-epochs",
        "0.5",
        "--batch-size",
        "64",
        "--effective-batch",
        "none",
        "--lr",
        "2e-3",
        "--probe-epochs",
        str(args.probe_epochs),
        "--num-workers",
        "0",
        "--recon-every",
        "0",
        "--output-dir",
        str(out / "sweep"),
        log=commands,
    )
    table = (out / "sweep" / "results.md").read_text()
    text = (
        f"{table}\nFashion-MNIST at 128 px (16 patches), ConvNeXt V2-Atto, grayscale; "
        f"pretraining: {args.epochs} epochs on {args.pretrain_images} images per ratio; "
        f"scores on 500 test images, 1,000 labelled training images vote (kNN, k=20) "
        f"or train the probe ({args.probe_epochs} epochs).\n\nCommand:\n\n    {commands[0]}\n"
    )
    finish(out, text, out / "sweep" / "results.png", start)


if __name__ == "__main__":
    main()
