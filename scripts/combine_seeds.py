"""Several seeds of one study in one table and one plot: each cell is the mean over the seeds,
then each seed's value; the plot draws the means with a bar from the lowest to the highest.

    python scripts/combine_seeds.py runs/mask_ratio_sweep runs/mask_ratio_sweep_seed1 \\
        --out docs/mask_ratio_sweep.png

Each DIR is the --out of scripts/mask_ratio_sweep.py or scripts/grn_ablation.py (it reads
DIR/sweep/results.csv), in seed order; every DIR must hold the same points. Writes the plot to
--out and prints the table (Markdown).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from fcmae.experiments.sweep_report import plot

COLUMNS = {
    "final_loss": ("final pretraining loss", 3),
    "knn_acc1": ("kNN top-1 (%)", 1),
    "probe_acc1": ("linear probe top-1 (%)", 1),
    "finetune_acc1": ("fine-tune top-1 (%)", 1),
}


def read_rows(path: Path) -> list[dict]:
    """results.csv as rows of numbers (the swept value too, where it is one)."""

    def value(text: str) -> object:
        try:
            return float(text)
        except ValueError:
            return text

    with path.open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def table(key: str, runs: list[list[dict]]) -> str:
    """The Markdown table: per point and column, the mean (seed 0 / seed 1 / ...)."""
    columns = [c for c in COLUMNS if c in runs[0][0]]
    lines = [
        "| " + " | ".join([key] + [COLUMNS[c][0] for c in columns]) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for i, row in enumerate(runs[0]):
        cells = [str(row[key])]
        for c in columns:
            digits = COLUMNS[c][1]
            seeds = [run[i][c] for run in runs]
            each = " / ".join(f"{v:.{digits}f}" for v in seeds)
            cells.append(f"{sum(seeds) / len(seeds):.{digits}f} ({each})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="one study's --out per seed")
    parser.add_argument("--out", type=Path, required=True, help="the plot (PNG) to write")
    args = parser.parse_args()
    missing = [d for d in args.dirs if not (d / "sweep" / "results.csv").is_file()]
    if missing:
        sys.exit(f"{missing[0]}/sweep/results.csv is missing: run the study there first.")
    runs = [read_rows(d / "sweep" / "results.csv") for d in args.dirs]
    key = next(iter(runs[0][0]))
    points = [[row[key] for row in run] for run in runs]
    if any(p != points[0] for p in points):
        sys.exit(f"the runs sweep different points ({points}): combine runs of the same study.")
    print(table(key, runs))
    print(f"\nPlot: {plot(args.out, key, runs)}")


if __name__ == "__main__":
    main()
