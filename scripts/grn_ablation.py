"""Does GRN matter? The paper's co-design ablation (ConvNeXt V1 + FCMAE against V2 + FCMAE) as
a `fcmae sweep --set grn=true,false` on Fashion-MNIST, on a 2-core CPU.

    python scripts/grn_ablation.py                       # about 20 minutes on a quiet 2-core CPU
    python scripts/grn_ablation.py --seed 1 --out runs/grn_ablation_seed1

The same data, budget and schedule for both points (the folders and settings of
scripts/mask_ratio_sweep.py, mask ratio 0.6): ConvNeXt V2-Atto pretrained with GRN, and the same
network without GRN and with ConvNeXt V1's layer scale (`--no-grn`), each scored by kNN, a
linear probe and a short fine-tune built as it was pretrained. Writes OUT/sweep/results.*
and OUT/results.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from fashion_mnist import finish
from mask_ratio_sweep import arguments, describe, sweep, write_folders


def main() -> None:
    args = arguments(__doc__.split("\n")[0], "runs/grn_ablation", finetune_epochs=5)
    start = time.perf_counter()
    out = Path(args.out)
    write_folders(out / "data", 128, args.pretrain_images)
    commands: list[str] = []
    root = sweep(out, "grn=true,false", args, commands)
    text = describe(args, commands, (root / "results.md").read_text())
    finish(out, text, root / "results.png", start)


if __name__ == "__main__":
    main()
