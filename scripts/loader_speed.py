"""Images/s of the pretraining loader with one worker: 8-bit RGB photographs (JPEG and PNG,
500x375, ImageNet's typical size) and 13-channel 16-bit TIFFs (256x256, a Sentinel-2 tile's
bands), each through the pretraining transform at 224 px.

    python scripts/loader_speed.py                      # both pipelines, 20 s each
    PYTHONPATH=OLD_CHECKOUT python scripts/loader_speed.py --only rgb   # fcmae before issue 25

The second line measures a checkout from before any-channel images (its API took a PIL mode),
for the README's before/after figure; run it on an idle machine, one measurement at a time.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_report import _time_loader, write_images  # noqa: E402

import fcmae  # noqa: E402
from fcmae.data.sources import ImageFiles, collate  # noqa: E402


def write_tiffs(folder: Path, count: int, chans: int = 13, size: int = 256) -> list[Path]:
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = []
    for i in range(count):
        path = folder / f"tile{i:03d}.tif"
        pixels = rng.integers(0, 10000, (chans, size, size), np.uint16)
        tifffile.imwrite(path, pixels, photometric="minisblack", planarconfig="separate")
        files.append(path)
    return files


def dataset(files: list[Path], in_chans: int) -> ImageFiles:
    many = files * 1000  # never runs out within the timed seconds
    try:
        from fcmae.data.images import Decoding
        from fcmae.data.stats import PixelStats, imagenet
        from fcmae.data.transforms import pretrain_transform
    except ImportError:  # a checkout from before issue 25: RGB only, a PIL mode
        from fcmae.data.sources import pretrain_transform

        return ImageFiles(many, [0] * len(many), pretrain_transform(224), mode="RGB")
    stats = imagenet(3) if in_chans == 3 else PixelStats((0.1,) * in_chans, (0.05,) * in_chans)
    transform = pretrain_transform(224, stats)
    return ImageFiles(many, [0] * len(many), transform, Decoding.for_model(in_chans))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("rgb", "tif13"))
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        kinds = {
            "rgb": (lambda: write_images(Path(tmp, "rgb"), 16), 3),
            "tif13": (lambda: write_tiffs(Path(tmp, "tif"), 16), 13),
        }
        for kind, (write, chans) in kinds.items():
            if args.only in (None, kind):
                loader = DataLoader(dataset(write(), chans), 16, num_workers=1, collate_fn=collate)
                rate = _time_loader(loader, args.seconds)["img_s"]
                print(f"{kind}: {rate} images/s (one worker; fcmae from {fcmae.__file__})")


if __name__ == "__main__":
    main()
