"""Which masking ratio? A `fcmae sweep` over five ratios on Fashion-MNIST, on a 2-core CPU.

    python scripts/mask_ratio_sweep.py           # about 35 minutes on a quiet 2-core CPU
    python scripts/mask_ratio_sweep.py --seed 1 --out runs/mask_ratio_sweep_seed1

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


def sweep(out: Path, setting: str, args: argparse.Namespace, commands: list[str]) -> Path:
    """`fcmae sweep --set SETTING` on the folders under out/data, into out/sweep (resumable);
    returns the sweep directory."""
    extra = ["--finetune-epochs", str(args.finetune_epochs)] if args.finetune_epochs else []
    fcmae(
        "sweep",
        *("--model", "convnextv2_atto", "--in-chans", "1", "--input-size", "128"),
        *("--data", str(out / "data" / "pretrain"), "--eval-data", str(out / "data" / "eval")),
        *("--set", setting, "--seed", str(args.seed), "--epochs", str(args.epochs)),
        *("--warmup-epochs", "0.5", "--batch-size", "64", "--effective-batch", "none"),
        *("--lr", "2e-3", "--probe-epochs", str(args.probe_epochs), *extra),
        *("--num-workers", "0", "--recon-every", "0", "--output-dir", str(out / "sweep")),
        log=commands,
    )
    return out / "sweep"


def arguments(
    description: str, out: str, ratios: bool = False, **defaults: object
) -> argparse.Namespace:
    """The options the Fashion-MNIST sweeps share (and --ratios with ratios=True); defaults
    override the shared defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", default=out, help="data and runs go here")
    parser.add_argument("--seed", type=int, default=0, help="pretraining and scoring seed")
    parser.add_argument("--pretrain-images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--probe-epochs", type=int, default=20)
    parser.add_argument("--finetune-epochs", type=int, default=0)
    if ratios:
        parser.add_argument("--ratios", default="0.4,0.5,0.6,0.7,0.8")
    parser.set_defaults(**defaults)
    return parser.parse_args()


def describe(args: argparse.Namespace, commands: list[str], table: str) -> str:
    """The results.md text: the table, the setting in words, the command."""
    finetuned = f", or fine-tune ({args.finetune_epochs} epochs)" if args.finetune_epochs else ""
    return (
        f"{table}\nFashion-MNIST at 128 px (16 patches), ConvNeXt V2-Atto, grayscale, seed "
        f"{args.seed}; pretraining: {args.epochs} epochs on {args.pretrain_images} images per "
        f"point; scores on 500 test images, 1,000 labelled training images vote (kNN, k=20) "
        f"or train the probe ({args.probe_epochs} epochs){finetuned}.\n\nCommand:\n\n"
        f"    {commands[0]}\n"
    )


def main() -> None:
    args = arguments(__doc__.split("\n")[0], "runs/mask_ratio_sweep", ratios=True)
    start = time.perf_counter()
    out = Path(args.out)
    write_folders(out / "data", 128, args.pretrain_images)
    commands: list[str] = []
    root = sweep(out, f"mask_ratio={args.ratios}", args, commands)
    text = describe(args, commands, (root / "results.md").read_text())
    finish(out, text, root / "results.png", start)


if __name__ == "__main__":
    main()
