"""Training curves from run directories (their metrics.jsonl) drawn into one PNG, runs overlaid.

The library behind `fcmae plot RUN [RUN ...]`: read_metrics() reads one run's records,
plot_runs() draws loss, learning rate, (for classifiers) validation top-1 and (for monitored
pretraining) kNN top-1 against epoch.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fcmae.config.pictures import PlotConfig
from fcmae.errors import UserError
from fcmae.run import layout
from fcmae.run.files import PNG_MARK, fcmae_png, replaceable, writable, write_atomic
from fcmae.run.metrics import parse_record

log = logging.getLogger("fcmae")

PANEL_INCHES = (5.0, 4.0)  # width, height of one panel
DPI = 120
RUN_HINT = (
    "pass a run directory written by fcmae pretrain, finetune or linprobe "
    "(the folder given as --output-dir)"
)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    """The records of run/metrics.jsonl in step order; a step logged twice keeps its later line.

    Lines that are not JSON objects with a "type" and an integer "step" (such as the half line
    of a run killed mid-write) are skipped. Raises UserError when there is nothing to plot.
    """
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run} does not exist: {RUN_HINT}.")
    if not run.is_dir():
        raise UserError(f"{run} is not a directory: {RUN_HINT}.")
    path = run / layout.METRICS
    if not path.is_file():
        raise UserError(f"{run} has no metrics.jsonl: {RUN_HINT}.")
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for line in path.read_text(errors="replace").splitlines():
        record = parse_record(line)
        if record is not None:
            latest[(record["type"], record["step"])] = record
    records = sorted(latest.values(), key=lambda r: r["step"])
    if not any(r["type"] == "step" for r in records):
        raise UserError(
            f"{path} has no readable training step records: plot {run} once it has logged "
            "its first steps, or pass another run directory."
        )
    return records


def run_labels(runs: list[Path]) -> list[str]:
    """Legend labels: each run's directory name, or, for runs sharing a name, its path
    relative to their common parent."""
    paths = [Path(os.path.abspath(r)) for r in runs]
    labels = []
    for path in paths:
        same = [p for p in paths if p.name == path.name]
        if len(set(same)) < 2:
            labels.append(path.name)
            continue
        parent = os.path.commonpath([str(p) for p in same])
        labels.append(os.path.relpath(path, parent))
    return labels


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(epoch, value) of the records of one type that carry a number under key."""
    xs, ys = [], []
    for r in records:
        x, y = r.get("epoch"), r.get(key)
        if r["type"] == kind and _is_number(x) and _is_number(y):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _peaks(all_records: list[list[dict]], key: str) -> list[float]:
    """Each run's largest step value of key, where that is positive."""
    peaks = [max(ys) for recs in all_records if (ys := _series(recs, "step", key)[1])]
    return [p for p in peaks if p > 0]


def _draw(ax, xs: list[float], ys: list[float], **style: Any) -> None:
    """A curve; a lone point gets a marker, since a one-point line does not show."""
    if xs:
        ax.plot(xs, ys, **{"marker": "o" if len(xs) == 1 else None, **style})


def plot_runs(runs: list[Path], output: Path, overwrite: bool = False) -> Path:
    """Draws the runs' training loss, learning rate and, when any run validated or was
    monitored, validation or kNN top-1 against epoch, side by side in one PNG at output; returns
    output. An existing file at output is replaced when fcmae drew it, or with overwrite."""
    if not runs:
        raise UserError("No run directory given: pass at least one run's --output-dir.")
    all_records = [read_metrics(Path(run)) for run in runs]
    output = writable(output, "--output", suffixes=(".png",))
    replaceable([output], "--output", overwrite, ours=fcmae_png)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_acc = any(_series(recs, "epoch", "val_acc1")[0] for recs in all_records)
    with_knn = any(_series(recs, "epoch", "knn_acc1")[0] for recs in all_records)
    panels = 2 + with_acc + with_knn
    # A Figure on an Agg canvas, outside pyplot: no display, no global backend switch, and
    # nothing left open in pyplot's figure list once it is saved.
    fig = Figure(figsize=(PANEL_INCHES[0] * panels, PANEL_INCHES[1]), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    loss_ax, lr_ax = axes[0], axes[1]
    for i, (records, label) in enumerate(zip(all_records, run_labels(runs))):
        color = f"C{i % 10}"
        _draw(loss_ax, *_series(records, "step", "loss"), color=color, label=label)
        _draw(lr_ax, *_series(records, "step", "lr"), color=color, label=label)
        if with_acc:
            style = {"color": color, "marker": "o", "markersize": 3}
            _draw(axes[2], *_series(records, "epoch", "val_acc1"), label=label, **style)
            _draw(
                axes[2],
                *_series(records, "epoch", "ema_acc1"),
                label=f"{label} (EMA)",
                linestyle="--",
                **style,
            )
        if with_knn:
            style = {"color": color, "marker": "o", "markersize": 3, "label": label}
            _draw(axes[-1], *_series(records, "epoch", "knn_acc1"), **style)
    _decorate(loss_ax, "Training loss", "loss")
    _decorate(lr_ax, "Learning rate", "learning rate")
    peaks = _peaks(all_records, "lr")
    if peaks and max(peaks) > 10 * min(peaks):  # a linear axis would flatten the smaller ones
        lr_ax.set_yscale("log", nonpositive="mask")
        lr_ax.set_ylim(bottom=min(peaks) / 1000)  # not down to a cosine's last tiny step
    else:
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if with_acc:
        _decorate(axes[2], "Validation top-1", "top-1 accuracy (%)")
    if with_knn:
        _decorate(axes[-1], "kNN top-1 (--monitor-data)", "top-1 accuracy (%)")
    write_atomic(output, lambda f: fig.savefig(f, dpi=DPI, format="png", metadata=dict([PNG_MARK])))
    fig.clear()
    return output


def _decorate(ax, title: str, ylabel: str) -> None:
    """Title, axis labels, grid and legend of one panel."""
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def run(cfg: PlotConfig) -> Path:
    """`fcmae plot`: write the PNG and say where."""
    runs = [Path(run) for run in cfg.runs]
    output = Path(cfg.output_file())
    plot_runs(runs, output, cfg.overwrite)
    log.info("Wrote %s: loss, lr and accuracy of %s.", output, ", ".join(map(str, runs)))
    return output
