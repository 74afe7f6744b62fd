"""Convert an image folder (ImageFolder tree or flat) to WebDataset tar shards for fcmae's
--data (pretrain) and --train / --val (finetune, linprobe).

    python scripts/folder_to_shards.py /data/imagenet/train shards/train --shard-size 1000
    python scripts/folder_to_shards.py /data/imagenet/val shards/val --shard-size 1000
    fcmae finetune --train 'shards/train/{000000..001281}.tar' \
        --val 'shards/val/{000000..000049}.tar'

Writes OUTPUT/000000.tar, 000001.tar, ... of --shard-size samples each (the last may hold
fewer). Sample NNNNNN is the image file's bytes as they are (NNNNNN.jpg, .png, ...) and, for an
ImageFolder, NNNNNN.cls: its class index as text. Samples are shuffled (--seed) so that every
shard mixes the classes. Beside the shards: classes.json, the class names in label order (for
an ImageFolder), and sizes.json, each shard's sample count, which spares fcmae counting them.
Prints the pattern to pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import webdataset

from fcmae.data.folders import find_images
from fcmae.data.shards import CLASSES_FILE, SIZES_FILE
from fcmae.errors import UserError


def write_shards(source: str | Path, output: str | Path, shard_size: int, seed: int = 0) -> str:
    """Write the images under source as shards in output (see the module docstring); returns
    the brace pattern that names them."""
    files, labels, classes = find_images(source)
    output = Path(output)
    if output.is_dir() and any(output.glob("*.tar")):
        raise UserError(f"{output} already holds shards; pass an empty or new folder.")
    output.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(files))
    sizes = {}
    for start in range(0, len(files), shard_size):
        name = f"{start // shard_size:06d}.tar"
        with webdataset.TarWriter(str(output / name), encoder=False) as shard:
            for index in order[start : start + shard_size]:
                path = files[index]
                sample = {"__key__": f"{index:06d}", path.suffix[1:].lower(): path.read_bytes()}
                if classes:
                    sample["cls"] = str(labels[index]).encode()
                shard.write(sample)
        sizes[name] = len(order[start : start + shard_size])
    if classes:
        (output / CLASSES_FILE).write_text(json.dumps(classes, indent=1) + "\n")
    (output / SIZES_FILE).write_text(json.dumps(sizes, indent=1) + "\n")
    last = len(sizes) - 1
    return str(output / (f"{{000000..{last:06d}}}.tar" if last else "000000.tar"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="image folder: one subfolder per class, or flat")
    parser.add_argument("output", help="folder to write the shards to (new or empty)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    args = parser.parse_args()
    if args.shard_size <= 0:
        parser.error(f"--shard-size must be positive, got {args.shard_size}")
    try:
        pattern = write_shards(args.source, args.output, args.shard_size, args.seed)
    except UserError as e:
        sys.exit(f"folder_to_shards: error: {e}")
    print(pattern)


if __name__ == "__main__":
    main()
