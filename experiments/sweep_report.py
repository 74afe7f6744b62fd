"""The results of `fcmae sweep` (fcmae.experiments.sweep): results.csv and results.md, one row
per point, and results.png, the scores and final loss against the swept value; ``plot`` also
draws several sweeps over the same values (seeds) as means with their range."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from fcmae.run.files import write_atomic, write_text_atomic


def write_results(root: Path, key: str, rows: list[dict[str, Any]]) -> list[Path]:
    """results.csv, results.md and results.png in root; returns their paths."""
    columns = [
        key,
        "masked_patches",
        "final_loss",
        "knn_acc1",
        "probe_acc1",
        "finetune_acc1",
        "pretrain_minutes",
    ]
    columns = [c for c in columns if any(c in row for row in rows)]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return [
        write_text_atomic(root / "results.csv", table.getvalue()),
        write_text_atomic(root / "results.md", "\n".join(lines) + "\n"),
        plot(root / "results.png", key, [rows]),
    ]


def plot(path: Path, key: str, runs: list[list[dict[str, Any]]]) -> Path:
    """Scores and final pretraining loss against the swept value, side by side. ``runs``: the
    rows of one sweep, or of several over the same values (seeds): then each point is their
    mean, with a bar from the lowest to the highest."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = runs[0]
    values = [row[key] for row in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    x = values if numeric else list(range(len(values)))
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    scores, loss = fig.subplots(1, 2)

    def draw(ax: Any, name: str, **style: Any) -> None:
        points = [[run[i][name] for run in runs] for i in range(len(rows))]
        means = [sum(p) / len(p) for p in points]
        spread = [
            [m - min(p) for m, p in zip(means, points)],
            [max(p) - m for m, p in zip(means, points)],
        ]
        ax.errorbar(
            x, means, yerr=spread if len(runs) > 1 else None, marker="o", capsize=3, **style
        )

    for name, label in (
        ("knn_acc1", "kNN"),
        ("probe_acc1", "linear probe"),
        ("finetune_acc1", "fine-tune"),
    ):
        if name in rows[0]:
            draw(scores, name, label=label)
    seeds = f" (mean of {len(runs)} seeds, bars lowest to highest)" if len(runs) > 1 else ""
    scores.set_ylabel("top-1 (%)")
    scores.set_title("Encoder score on --eval-data" + seeds, fontsize="medium")
    scores.legend(fontsize="small")
    draw(loss, "final_loss", color="tab:red")
    loss.set_ylabel("loss on masked patches")
    loss.set_title("Final pretraining loss" + seeds, fontsize="medium")
    for ax in (scores, loss):
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
        if not numeric:
            ax.set_xticks(x, [str(v) for v in values])
    write_atomic(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    fig.clear()
    return path
