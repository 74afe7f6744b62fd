"""Ways to run the ConvNeXt V2 core over the visible sites of a mask.

A *sites* object describes one stage: which sites of each sample are visible
and how the features are laid out (always channels last). Per-site layers
(LayerNorm, Linear, GELU) run on those features as they are; the few
operations that look across sites go through the sites object:

- ``enter`` / ``exit``: from and to a dense (N, C, H, W) map,
- ``dwconv``: the depthwise convolution (submanifold: masked inputs are zero,
  only visible outputs are kept),
- ``site_norm``: the per-sample L2 norm over visible sites (for GRN),
- ``downsample``: the 2x2 stride-2 convolution into the next stage's sites.

Backends:

- ``GridSites``: features on the full grid, (N, H, W, C). With no mask it is
  the plain dense network; with one it is the masked-dense reference (the
  ``dense`` backend): every cross-site operation zeroes its input at masked
  sites, and what per-site layers compute there is ignored.
- ``PackedSites``: the visible sites only, (N, K, C) (the ``sparse`` backend),
  K the largest visible count of any sample. Samples with fewer visible sites
  are padded with some of their own masked sites, which are zeroed wherever
  they could be read.

Masks are patch-aligned, so the 2x2 downsampling of a visible site reads only
visible sites and the backends agree exactly.
"""
import torch
import torch.nn.functional as F


class GridSites:
    """Features (N, H, W, C) on the full grid; ``visible`` (N, H, W, 1) bool, or
    None when every site is visible."""

    def __init__(self, visible=None):
        self.visible = visible

    def _zero_masked(self, x):
        return x if self.visible is None else x * self.visible

    def enter(self, x):
        """(N, C, H, W) -> (N, H, W, C)."""
        return x.permute(0, 2, 3, 1)

    def exit(self, x):
        """(N, H, W, C) -> (N, C, H, W), zero at masked sites."""
        return self._zero_masked(x).permute(0, 3, 1, 2)

    def dwconv(self, conv, x):
        return conv(self._zero_masked(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)

    def site_norm(self, x):
        """(N, 1, 1, C): L2 norm of each sample's channels over its visible sites."""
        return torch.linalg.vector_norm(self._zero_masked(x), dim=(1, 2), keepdim=True)

    def downsample(self, conv, x, coarse):
        # Patch-aligned masks: a visible coarse site reads only visible sites.
        return self.dwconv(conv, x)


class PackedSites:
    """Features (N, K, C) of the visible sites of ``visible`` (N, H, W) bool."""

    def __init__(self, visible):
        n, self.height, self.width = visible.shape
        flat = visible.reshape(n, -1)
        counts = flat.sum(1)
        k = int(counts.max())
        # A stable sort puts each sample's visible sites first, in raster
        # order, followed by its masked sites: those serve as padding, so
        # padding never collides with a visible site.
        order = torch.argsort((~flat).to(torch.uint8), dim=1, stable=True)
        self.index = order[:, :k]
        self.padding = None
        if bool((counts < k).any()):
            positions = torch.arange(k, device=visible.device)
            self.padding = (positions[None, :] >= counts[:, None]).unsqueeze(-1)

    def _zero_padding(self, x):
        return x if self.padding is None else x.masked_fill(self.padding, 0)

    def gather(self, grid):
        """(N, H*W, C) -> (N, K, C) at the visible sites."""
        index = self.index.unsqueeze(-1).expand(-1, -1, grid.shape[-1])
        return torch.gather(grid, 1, index)

    def scatter(self, x):
        """(N, K, C) -> (N, H*W, C), zero at masked sites."""
        n, _, c = x.shape
        index = self.index.unsqueeze(-1).expand(-1, -1, c)
        grid = x.new_zeros(n, self.height * self.width, c)
        return grid.scatter(1, index, self._zero_padding(x))

    def enter(self, x):
        """(N, C, H, W) -> (N, K, C)."""
        return self.gather(x.flatten(2).transpose(1, 2))

    def exit(self, x):
        """(N, K, C) -> (N, C, H, W), zero at masked sites."""
        grid = self.scatter(x).unflatten(1, (self.height, self.width))
        return grid.permute(0, 3, 1, 2)

    def dwconv(self, conv, x):
        out = conv(self.exit(x)).permute(0, 2, 3, 1)
        return self.gather(out.reshape(x.shape[0], -1, x.shape[-1]))

    def site_norm(self, x):
        """(N, 1, C): L2 norm of each sample's channels over its visible sites."""
        return torch.linalg.vector_norm(self._zero_padding(x), dim=1, keepdim=True)

    def downsample(self, conv, x, coarse):
        # A 2x2 stride-2 conv is a linear map of each 2x2 cell, flattened in
        # (dy, dx, C) order; it runs on the coarse visible sites only.
        n, _, c = x.shape
        cells = self.scatter(x).view(n, self.height // 2, 2, self.width // 2, 2, c)
        cells = cells.permute(0, 1, 3, 2, 4, 5).reshape(n, -1, 4 * c)
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * c)
        return F.linear(coarse.gather(cells), weight, conv.bias)


BACKENDS = ("dense", "sparse")


def stage_sites(mask, stem_size, backend, num_stages=4):
    """Sites for each stage of a network whose stem output is ``stem_size``
    (H0, W0). ``mask`` (N, h, w) bool, True = masked patch, or None for the
    plain dense network. Stage s has (H0 / 2^s, W0 / 2^s) sites."""
    if mask is None:
        return [GridSites()] * num_stages
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    sites = []
    for s in range(num_stages):
        scale = (stem_size[0] >> s) // mask.shape[1]
        visible = ~mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        sites.append(GridSites(visible.unsqueeze(-1)) if backend == "dense" else PackedSites(visible))
    return sites
