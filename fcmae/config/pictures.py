"""The options of the commands that draw pictures: reconstructions of a pretraining checkpoint
(fcmae visualize) and training curves (fcmae plot). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fcmae.config import budget
from fcmae.config.budget import Need
from fcmae.config.commands import (
    SEED,
    DeviceOptions,
    DisplayOption,
    ImagesOption,
    OverwriteOption,
)
from fcmae.config.schema import COUNT, FRACTION, opt
from fcmae.run import layout


@dataclass
class VisualizeConfig(ImagesOption, DisplayOption, DeviceOptions, OverwriteOption):
    """A PNG grid of FCMAE reconstructions: original, masked, prediction, pasted."""

    checkpoint: str | None = opt(
        None, "pretraining checkpoint (with its decoder) (required)", path="input"
    )
    output: str | None = opt(
        None,
        "PNG to write; default: CHECKPOINT_STEM-recon.png beside the checkpoint",
        path="output",
    )
    images: int = opt(
        8,
        "rows: N images of --data, evenly spaced in path order (so every class)",
        within=COUNT,
    )
    mask_ratio: float | None = opt(
        None, "fraction of patches masked; default: the checkpoint's", within=FRACTION
    )
    input_size: int | None = opt(
        None, "image size in pixels; default: the checkpoint's", within=COUNT
    )
    seed: int = opt(0, "random seed of the masks", within=SEED)

    def needs(self) -> list[Need]:
        return budget.one_image(self)

    def output_file(self) -> str | None:
        """--output, or by default CHECKPOINT_STEM-recon.png beside the checkpoint."""
        if self.output or self.checkpoint is None:
            return self.output
        checkpoint = Path(self.checkpoint)
        return str(checkpoint.with_name(f"{checkpoint.stem}-recon.png"))

    def outputs(self) -> dict[str, str | None]:
        return {"--output": self.output_file()}


@dataclass
class PlotConfig(OverwriteOption):
    """Training curves of one or more runs, overlaid, in one PNG."""

    runs: tuple[str, ...] = opt(
        (), "run directories (their metrics.jsonl)", positional=True, path="input"
    )
    output: str | None = opt(
        None,
        "PNG to write; default: curves.png in the run directory "
        "(of the first run when there are several)",
        path="output",
    )

    def output_file(self) -> str:
        """--output, or by default curves.png in the (first) run directory."""
        return self.output or str(Path(self.runs[0] if self.runs else ".", "curves.png"))

    def inputs(self) -> dict[str, str | None]:
        """Each run's metrics.jsonl (the run directory itself is no input: curves.png goes
        there)."""
        several = len(self.runs) > 1
        return {
            f"RUN {i}" if several else "RUN": str(Path(run, layout.METRICS))
            for i, run in enumerate(self.runs, 1)
        }

    def outputs(self) -> dict[str, str | None]:
        return {"--output": self.output_file()}
