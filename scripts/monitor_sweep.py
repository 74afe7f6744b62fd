"""When do more pretraining epochs stop helping? A masking-ratio sweep watched by the kNN monitor.

Fashion-MNIST (Debian's dataset-fashion-mnist: `apt install dataset-fashion-mnist`), atto at
64 px, where patches of 32 px make 2x2 per image, so the mask ratios 0.25, 0.5 and 0.75 mask 1,
2 and 3 of the 4 exactly. Each point pretrains on the unlabelled images, and every
--monitor-every epochs its encoder is measured by kNN on the labelled folder
(`fcmae sweep ... --monitor-data`); `fcmae plot` then draws every point's loss and kNN curves in
one PNG.

    python scripts/monitor_sweep.py --out runs/monitor-sweep --plot docs/monitor_sweep.png
    python scripts/monitor_sweep.py --out /tmp/m --pretrain 200 --train 100 --val 50 --epochs 2

Prints each command and the total time; the monitor's measurements and their cost are in each
point's log.txt (lines "kNN monitor after epoch N ... (S s)").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fashion_mnist import epochs_of, fcmae, finish, write_folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/monitor-sweep"))
    parser.add_argument("--plot", type=Path, help="the curves' PNG; default OUT/curves.png")
    parser.add_argument("--pretrain", type=int, default=3000, help="unlabelled train images")
    parser.add_argument("--train", type=int, default=1000, help="labelled ones among them")
    parser.add_argument("--val", type=int, default=500, help="labelled test images")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--every", type=int, default=2, help="--monitor-every")
    args = parser.parse_args()
    start, log = time.perf_counter(), []
    out = args.out.resolve()
    unlabelled, labelled = write_folders(out / "data", args.pretrain, args.train, args.val, 0)
    values = ("0.25", "0.5", "0.75")
    sweep = out / "sweep"
    fcmae(
        "sweep",
        *("--data", str(unlabelled), "--eval-data", str(labelled)),
        *("--monitor-data", str(labelled), "--monitor-every", str(args.every)),
        *("--set", f"mask_ratio={','.join(values)}", "--probe-epochs", "0"),
        *("--in-chans", "1", "--pixel-stats", "data", "--input-size", "64"),
        *("--epochs", str(args.epochs), "--warmup-epochs", str(max(1, args.epochs // 10))),
        *("--batch-size", "64", "--effective-batch", "none", "--lr", "1.5e-3"),
        *("--recon-every", str(args.epochs), "--num-workers", "0", "--output-dir", str(sweep)),
        log=log,
    )
    points = [sweep / f"mask_ratio={v}" for v in values]
    plot = (args.plot or out / "curves.png").resolve()
    fcmae("plot", *map(str, points), "--output", str(plot), "--overwrite", log=log)
    lines = ["| mask ratio | " + " | ".join(f"epoch {e}" for e in _monitored(points[0])) + " |"]
    lines.append("|---" * (len(_monitored(points[0])) + 1) + "|")
    for value, point in zip(values, points):
        accs = _monitored(point).values()
        lines.append(f"| {value} | " + " | ".join(f"{a:.1f}" for a in accs) + " |")
    text = "kNN top-1 (%) on the labelled test images while pretraining\n\n" + "\n".join(lines)
    finish(out, text + "\n\nCommands:\n" + "\n".join(log) + "\n", plot, start)


def _monitored(run: Path) -> dict[int, float]:
    """{epoch: knn_acc1} of a monitored run's epoch records."""
    return {r["epoch"]: r["knn_acc1"] for r in epochs_of(run) if "knn_acc1" in r}


if __name__ == "__main__":
    main()
