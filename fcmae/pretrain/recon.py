"""Pictures of what an FCMAE reconstructs: original, masked input, prediction, reconstruction.

`reconstruct` runs a model on normalised images and returns the panels in pixel space, [0, 1];
`grid_array` lays panels out as one uint8 RGB picture (one row per image, one column per
panel, a header naming the columns) and `save_grid` writes that picture as a PNG. The
`Reconstructions` callback draws them during pretraining; `fcmae visualize`
(fcmae.experiments.visualize) draws them from a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torch import nn

from fcmae.config.commands import parse_channels
from fcmae.data.stats import PixelStats, imagenet, parse_stats
from fcmae.run import layout
from fcmae.run.files import PNG_MARK, write_atomic
from fcmae.train.callbacks import Callback, Context

COLUMNS = ("original", "masked", "prediction", "reconstruction")
PERCENTILES = (1.0, 99.0)  # a stretched channel's range: these percentiles of the originals'


@dataclass(frozen=True)
class Display:
    """How normalised images become a picture: de-normalised with stats, channels shown (1-based
    numbers: three as false colour red, green, blue, or one in grey), and each shown channel
    either clamped to [0, 1] (photographs, whose pixels lie there) or stretched so that the 1st
    and 99th percentiles of the original images' values span black to white."""

    stats: PixelStats
    channels: tuple[int, ...]
    stretch: bool

    @classmethod
    def for_run(cls, stats: str, in_chans: int, channels: str | None) -> Display:
        """The display of a run's images: its statistics as recorded, the channels named
        ("3,2,1", "2"; default: the first three, or the first alone with fewer than three);
        photographs (ImageNet's statistics) are clamped, any other data stretched."""
        shown = parse_channels(channels, in_chans)
        return cls(parse_stats(stats, in_chans), shown, stats != "imagenet")


GREY = 0.5  # the value masked patches get in the "masked" panel
GAP = 4  # white pixels between tiles and around the grid
HEADER = 20  # height in pixels of the band holding the column names
MIN_TILE = 128  # tiles whose shorter side is below this are upscaled (nearest) to reach it
FONT_SIZE = 12


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    display: Display | None = None,
) -> dict[str, torch.Tensor]:
    """Run an FCMAE in eval mode on normalised images (N, C, H, W) and return the panels.

    mask (N, L), 1 = masked, L = (H/p)*(W/p); None lets the model draw one (from
    ``generator`` when given). display: how the panels are shown (default: ImageNet's
    statistics, clamped; the channels of the images). Returns float32 CPU tensors in [0, 1],
    of the display's 1 or 3 channels: "original", "masked"
    (masked patches grey), "prediction" (the model's pixels for every patch; with
    norm_pix_loss de-standardised with each target patch's mean and variance) and
    "reconstruction" (original on visible patches, prediction on masked ones), each
    (N, C, H, W), and "mask" (N, 1, H, W), 1 = masked. The model's train/eval mode is kept.
    """
    device = next(model.parameters()).device
    images = images.to(device=device, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(images, mask=mask, generator=generator)
    finally:
        model.train(was_training)
    n, c, height, width = images.shape
    p = model.patch_size
    pred = pred.float().flatten(2).transpose(1, 2)  # (N, L, p*p*C), as patchify lays it out
    if model.norm_pix_loss:
        target = model.patchify(images)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1e-6) ** 0.5 + mean
    pred = model.unpatchify(pred.transpose(1, 2).reshape(n, p * p * c, height // p, width // p))

    display = display or Display(imagenet(c), parse_channels(None, c), False)
    original, prediction = _shown(images, pred.nan_to_num(), display)
    pixel_mask = mask.float().view(n, 1, height // p, width // p)
    pixel_mask = pixel_mask.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
    visible = pixel_mask == 0  # broadcast over channels below; exact copies, no blending
    panels = {
        "original": original,
        "masked": torch.where(visible, original, torch.full_like(original, GREY)),
        "prediction": prediction,
        "reconstruction": torch.where(visible, original, prediction),
        "mask": pixel_mask,
    }
    return {name: panel.cpu() for name, panel in panels.items()}


def _shown(
    images: torch.Tensor, pred: torch.Tensor, display: Display
) -> tuple[torch.Tensor, torch.Tensor]:
    """(original, prediction) de-normalised, of the display's channels, in [0, 1]."""
    mean, std = (
        torch.tensor(stat, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        for stat in (display.stats.mean, display.stats.std)
    )
    pick = [c - 1 for c in display.channels]
    original = (images * std + mean)[:, pick]
    prediction = (pred * std + mean)[:, pick]
    if display.stretch:
        values = original.transpose(0, 1).flatten(1)
        low, high = (torch.quantile(values, q / 100, dim=1).view(1, -1, 1, 1) for q in PERCENTILES)
        span = (high - low).clamp_min(1e-12)
        original, prediction = (original - low) / span, (prediction - low) / span
    return original.clamp(0, 1), prediction.clamp(0, 1)


def _scale(height: int, width: int) -> int:
    """Integer upscaling factor that brings the shorter tile side to at least MIN_TILE."""
    return max(1, math.ceil(MIN_TILE / min(height, width)))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font, at FONT_SIZE where this Pillow can size it (>= 10.1 with FreeType)."""
    try:
        return ImageFont.load_default(size=FONT_SIZE)
    except (TypeError, ImportError, OSError):  # older Pillow, or no FreeType: the bitmap font
        return ImageFont.load_default()


def _to_uint8_rgb(panel: torch.Tensor) -> np.ndarray:
    """(N, 1 or 3, H, W) in [0, 1] -> (N, H, W, 3) uint8; grayscale repeated to grey RGB."""
    if panel.dim() != 4 or panel.shape[1] not in (1, 3):
        raise ValueError(f"expected a panel of shape (N, 1 or 3, H, W), got {tuple(panel.shape)}")
    panel = panel.detach().float().cpu().nan_to_num(0.0).clamp(0, 1)
    if panel.shape[1] == 1:
        panel = panel.expand(-1, 3, -1, -1)
    return (panel * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_array(panels: dict[str, torch.Tensor], columns: Sequence[str] = COLUMNS) -> np.ndarray:
    """The grid as uint8 (H, W, 3): a HEADER-px band of column names, then one row per image.

    Each panel is (N, 1 or 3, h, w) in [0, 1], all of one shape but for channels. Tiles are
    upscaled by an integer factor (nearest) when their shorter side is below MIN_TILE, and
    GAP white pixels separate tiles and surround the grid:
    height = HEADER + N*th + (N+1)*GAP, width = len(columns)*tw + (len(columns)+1)*GAP.
    """
    columns = list(columns)
    if not columns:
        raise ValueError("no columns to draw")
    missing = [name for name in columns if name not in panels]
    if missing:
        raise KeyError(f"panels lack {missing}; they hold {sorted(panels)}")
    tiles = [_to_uint8_rgb(panels[name]) for name in columns]
    shapes = {tile.shape for tile in tiles}
    if len(shapes) != 1:
        raise ValueError(f"panels {columns} differ in shape: {sorted(shapes)}")
    n, height, width, _ = tiles[0].shape
    factor = _scale(height, width)
    th, tw = height * factor, width * factor
    grid = np.full(
        (HEADER + n * th + (n + 1) * GAP, len(columns) * tw + (len(columns) + 1) * GAP, 3),
        255,
        dtype=np.uint8,
    )
    for j, tile in enumerate(tiles):
        if factor > 1:
            tile = tile.repeat(factor, axis=1).repeat(factor, axis=2)
        x = GAP + j * (tw + GAP)
        for i in range(n):
            y = HEADER + GAP + i * (th + GAP)
            grid[y : y + th, x : x + tw] = tile[i]

    header = Image.fromarray(grid[:HEADER])
    draw = ImageDraw.Draw(header)
    font = _font()
    for j, name in enumerate(columns):
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        x = GAP + j * (tw + GAP) + (tw - (right - left)) // 2 - left
        y = (HEADER - (bottom - top)) // 2 - top
        draw.text((x, y), name, fill=(0, 0, 0), font=font)
    grid[:HEADER] = np.asarray(header)
    return grid


def save_grid(
    panels: dict[str, torch.Tensor],
    path: str | Path,
    columns: Sequence[str] = COLUMNS,
) -> Path:
    """Write grid_array(panels, columns) as a PNG at path through fcmae.run.files.write_atomic
    (parent folders created; a failed write is one sentence). Returns the path."""
    picture = Image.fromarray(grid_array(panels, columns))
    mark = PngInfo()
    mark.add_text(*PNG_MARK)  # how fcmae knows a picture of its own (fcmae.run.files)
    return write_atomic(path, lambda f: picture.save(f, format="PNG", pnginfo=mark))


class Reconstructions(Callback):
    """Pretraining callback: every ``every`` epochs (and at the end), the reconstruction grid of
    the same images and masks, as recon/epoch-NNNN.png in the run directory and in
    TensorBoard. Written by the main process only."""

    def __init__(self, images: torch.Tensor, every: int, display: Display, seed: int = 0):
        self.images, self.every, self.display, self.seed = images, every, display, seed

    def on_epoch_end(self, ctx: Context) -> None:
        epoch = ctx.epoch
        if not ctx.runtime.dist.is_main or (epoch % self.every and epoch != ctx.epochs):
            return
        generator = torch.Generator().manual_seed(self.seed)
        panels = reconstruct(ctx.model, self.images, generator=generator, display=self.display)
        path = save_grid(panels, ctx.run.file(layout.recon_name(epoch)))
        ctx.metrics.picture(path, grid_array(panels), ctx.step)
