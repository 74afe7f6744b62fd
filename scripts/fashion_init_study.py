"""Does a head start from RGB weights help FCMAE pretraining on one-channel images?

Fashion-MNIST (Debian's dataset-fashion-mnist: `apt install dataset-fashion-mnist`, 28x28 grey)
pretrained with FCMAE (a) from scratch and (b) with `--init` from an RGB FCMAE checkpoint of
fcmae's own (by default the demo run on the embedded photos, which this script makes), its stem
channel-adapted (3 -> 1: the kernels summed), at equal pretraining budget; then the encoders'
kNN accuracy and linear-probe accuracy, for each seed. Two reference rows: a random encoder, and
the RGB checkpoint adapted but not pretrained on Fashion-MNIST.

    python scripts/fashion_init_study.py --out runs/fashion-study          # ~70 min on 2 cores
    python scripts/fashion_init_study.py --out /tmp/s --pretrain 200 --train 100 --epochs 1  # smoke

Writes OUT/results.json and OUT/results.md (the table the README quotes).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from fashion_mnist import write_folders

from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.finetune import knn, linprobe
from fcmae.finetune.config import KnnConfig, LinprobeConfig
from fcmae.pretrain import job
from fcmae.run.logs import setup_logging

SIZE = 64  # px the network sees: 28 px upscaled, 2x2 patches of 32


def pretrain(flags: dict[str, Any]) -> Path:
    """A pretraining run; its last encoder export."""
    cfg = resolve(PretrainConfig, flags=flags)
    record = job.run(cfg)
    return Path(record["checkpoint"]).with_name(
        Path(record["checkpoint"]).name.replace("checkpoint", "encoder")
    )


def evaluate(encoder: Path | None, labelled: Path, out: Path, seed: int) -> dict[str, float]:
    """kNN top-1 and the linear probe's best top-1 (%) of an encoder (None: a random one)."""
    common = {"data": str(labelled), "input_size": SIZE, "in_chans": 1, "num_workers": 0}
    pretrained = {"pretrained": str(encoder)} if encoder else {}
    knn_acc = knn.run(resolve(KnnConfig, flags={**common, **pretrained}))["acc1"]
    probe = {
        **common,
        **pretrained,
        "epochs": 10,
        "warmup_epochs": 1,
        "batch_size": 128,
        "effective_batch": None,
        "lr": 1e-3,
        "seed": seed,
        "output_dir": str(out),
        "save_every": 10,
    }
    record = linprobe.run(resolve(LinprobeConfig, flags=probe))
    return {"knn": knn_acc, "probe": record["best_acc1"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/fashion-study"))
    parser.add_argument("--source", help="RGB FCMAE checkpoint to --init from; default: the demo")
    parser.add_argument("--pretrain", type=int, default=4000, help="unlabelled train images")
    parser.add_argument("--train", type=int, default=1000, help="labelled ones among them")
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=24, help="pretraining epochs of each arm")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    setup_logging(None, 0)
    logging.getLogger("fcmae").setLevel(logging.WARNING)
    out = args.out.resolve()
    unlabelled, labelled = write_folders(out / "data", args.pretrain, args.train, args.val, seed=0)
    source = args.source
    if source is None:  # the README's first command: the demo on the embedded photos
        demo = pretrain({"output_dir": str(out / "rgb-demo"), "num_workers": 0})
        source = str(demo)
    rows: dict[str, list[dict[str, float]]] = {}
    started = time.time()
    for seed in args.seeds:
        rows.setdefault("random encoder", []).append(
            evaluate(None, labelled, out / f"probe-random-{seed}", seed)
        )
        rows.setdefault("RGB checkpoint adapted, no Fashion pretraining", []).append(
            evaluate(Path(source), labelled, out / f"probe-adapted-{seed}", seed)
        )
        for arm, init in (("(a) FCMAE from scratch", None), ("(b) FCMAE with --init", source)):
            flags = {
                "data": str(unlabelled),
                "in_chans": 1,
                "pixel_stats": "data",
                "mask_ratio": 0.5,  # 2 of the 4 patches at 64 px (0.6 would mask 3)
                "input_size": SIZE,
                "epochs": args.epochs,
                "warmup_epochs": max(1, args.epochs // 10),
                "batch_size": 64,
                "effective_batch": None,
                "lr": 1.5e-3,
                "seed": seed,
                "recon_every": args.epochs,
                "num_workers": 0,
                "output_dir": str(out / f"{arm[1]}-seed{seed}"),
                **({"init": init} if init else {}),
            }
            encoder = pretrain(flags)
            rows.setdefault(arm, []).append(
                evaluate(encoder, labelled, out / f"probe-{arm[1]}-{seed}", seed)
            )
        print(f"seed {seed} done after {time.time() - started:.0f} s", flush=True)
    write_results(out, rows, args)


def write_results(out: Path, rows: dict[str, list[dict[str, float]]], args: Any) -> None:
    (out / "results.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=1)
    )
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"| encoder ({args.epochs} pretraining epochs on {args.pretrain} images; seeds {seeds}) "
        f"| kNN top-1 (%) | linear probe top-1 (%) |",
        "|---|---|---|",
    ]
    for name, results in rows.items():
        cells = []
        for key in ("knn", "probe"):
            values = [r[key] for r in results]
            mean = statistics.mean(values)
            cells.append(f"{mean:.1f} ({' / '.join(f'{v:.1f}' for v in values)})")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
