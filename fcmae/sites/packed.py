"""The ``sparse`` backend: the visible sites only, packed as (N, K, C).

K is the largest visible count of any sample. Samples with fewer visible sites are padded with
some of their own masked sites, which are zeroed wherever they could be read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fcmae.sites.rows import channel_norms


class PackedSites:
    """Features (N, K, C) of the visible sites of ``visible`` (N, H, W) bool."""

    def __init__(self, visible: torch.Tensor):
        n, self.height, self.width = visible.shape
        flat = visible.reshape(n, -1)
        counts = flat.sum(1)
        k = int(counts.max())
        # A stable sort puts each sample's visible sites first, in raster order, followed by
        # its masked sites: those serve as padding, so padding never collides with a visible
        # site.
        order = torch.argsort((~flat).to(torch.uint8), dim=1, stable=True)
        self.index = order[:, :k]
        self.padding = None
        if bool((counts < k).any()):
            positions = torch.arange(k, device=visible.device)
            self.padding = (positions[None, :] >= counts[:, None]).unsqueeze(-1)

    def _zero_padding(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.padding is None else x.masked_fill(self.padding, 0)

    def gather(self, grid: torch.Tensor) -> torch.Tensor:
        """(N, H*W, C) -> (N, K, C) at the visible sites."""
        index = self.index.unsqueeze(-1).expand(-1, -1, grid.shape[-1])
        return torch.gather(grid, 1, index)

    def scatter(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K, C) -> (N, H*W, C), zero at masked sites."""
        n, _, c = x.shape
        index = self.index.unsqueeze(-1).expand(-1, -1, c)
        grid = x.new_zeros(n, self.height * self.width, c)
        return grid.scatter(1, index, self._zero_padding(x))

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, C)."""
        return self.gather(x.flatten(2).transpose(1, 2))

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        """(N, K, C) -> (N, C, H, W), zero at masked sites."""
        grid = self.scatter(x).unflatten(1, (self.height, self.width))
        return grid.permute(0, 3, 1, 2)

    def dwconv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        out = conv(self.exit(x)).permute(0, 2, 3, 1)
        return self.gather(out.reshape(x.shape[0], -1, x.shape[-1]))

    def site_norm(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, C) float32 or wider: L2 norm of each sample's channels over its visible sites."""
        return channel_norms(self._zero_padding(x))

    def sample_sum(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, C) float32 or wider: each sample's channels summed over its rows (padding
        included)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        return x.sum(dim=1, keepdim=True, dtype=dtype)

    def visible_only(self, x: torch.Tensor) -> torch.Tensor:
        """x, zero at the padding rows."""
        return self._zero_padding(x)

    def by_sample(self, x: torch.Tensor) -> torch.Tensor:
        """x as it is: (N, K, C), each sample's rows."""
        return x

    def spread(self, stats: torch.Tensor) -> torch.Tensor:
        """Per-sample statistics (N, 1, C) as they broadcast over the features: as they are."""
        return stats

    def downsample(self, conv: nn.Conv2d, x: torch.Tensor, coarse: PackedSites) -> torch.Tensor:
        # A 2x2 stride-2 conv is a linear map of each 2x2 cell, flattened in (dy, dx, C)
        # order; it runs on the coarse visible sites only.
        n, _, c = x.shape
        cells = self.scatter(x).view(n, self.height // 2, 2, self.width // 2, 2, c)
        cells = cells.permute(0, 1, 3, 2, 4, 5).reshape(n, -1, 4 * c)
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * c)
        return F.linear(coarse.gather(cells), weight, conv.bias)
