"""The ``dense`` backend: features (N, H, W, C) on the full grid.

With no mask it is the plain dense network; with one it is the masked-dense reference (the
paper's alternative to sparse convolution): every cross-site operation zeroes its input at
masked sites, and what per-site layers compute there is ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from fcmae.sites.rows import channel_norms


class GridSites:
    """Features (N, H, W, C) on the full grid; ``visible`` (N, H, W) bool, or None when every
    site is visible."""

    def __init__(self, visible: torch.Tensor | None = None):
        self.visible = None if visible is None else visible.unsqueeze(-1)

    def _zero_masked(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.visible is None else x * self.visible

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H, W, C)."""
        return x.permute(0, 2, 3, 1)

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, C, H, W), zero at masked sites."""
        return self._zero_masked(x).permute(0, 3, 1, 2)

    def dwconv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return conv(self._zero_masked(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def site_norm(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 1, C), float32 or wider: each sample's channel norms over its visible sites."""
        return channel_norms(self.by_sample(self._zero_masked(x))).unsqueeze(1)

    def sample_sum(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 1, C) float32 or wider: each sample's channels summed over all its sites."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return x.sum(dim=(1, 2), keepdim=True, dtype=dtype)

    def visible_only(self, x: torch.Tensor) -> torch.Tensor:
        """x, zero at masked sites."""
        return self._zero_masked(x)

    def by_sample(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, H*W, C): each sample's sites as rows."""
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def spread(self, stats: torch.Tensor) -> torch.Tensor:
        """Per-sample statistics (N, 1, 1, C) as they broadcast over the features: as they are."""
        return stats

    def downsample(self, conv: nn.Conv2d, x: torch.Tensor, coarse: GridSites) -> torch.Tensor:
        # Patch-aligned masks: a visible coarse site reads only visible sites.
        return self.dwconv(conv, x)
