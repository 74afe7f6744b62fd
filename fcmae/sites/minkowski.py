"""The ``minkowski`` backend: the stages on MinkowskiEngine sparse tensors.

Features are (M, C), one row per visible site of the whole batch, as a SparseTensor's ``F``;
per-site layers run on them as they are (which is all MinkowskiLayerNorm, MinkowskiLinear and
MinkowskiGELU do). The coordinates (sample, y, x) come from the mask, never from which features
are non-zero. The depthwise conv is MinkowskiEngine's (``MinkowskiDepthwiseConvolution`` of the
official code's fork where installed, else the PyPI release's
``MinkowskiChannelwiseConvolution``, the same operation), the downsampling its
``MinkowskiConvolution`` with kernel 2 and stride 2 onto the next stage's coordinates; both run
with the network's own conv parameters, in MinkowskiEngine's kernel layout. Unlike the official
code, GRN's statistics are per sample, and ``exit`` scatters into the full grid (the official
``.dense()`` shrinks the grid when a border row is masked in every sample).

Needs MinkowskiEngine: ``bash scripts/install_minkowski.sh``.
"""

from __future__ import annotations

import collections
import collections.abc
import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call

from fcmae.models.errors import ModelError
from fcmae.sites.kernels import to_me_kernel

if not hasattr(collections, "Sequence"):  # MinkowskiEngine 0.5.4 predates Python 3.10
    collections.Sequence = collections.abc.Sequence
try:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The MinkowskiEngine was compiled with CPU_ONLY")
        import MinkowskiEngine as ME
except ImportError as error:
    if getattr(error, "name", None) == "MinkowskiEngine":
        raise ModelError(
            "The minkowski backend needs MinkowskiEngine, which is not installed in this "
            "environment: run `bash scripts/install_minkowski.sh` (a CPU build, about 8 minutes)."
        ) from None
    raise ModelError(
        f"MinkowskiEngine is installed but does not import ({error}); rebuild it against this "
        f"torch: `pip uninstall -y MinkowskiEngine && bash scripts/install_minkowski.sh`."
    ) from None

DepthwiseConvolution = getattr(
    ME, "MinkowskiDepthwiseConvolution", ME.MinkowskiChannelwiseConvolution
)


@functools.cache
def _dwconv_layer(channels: int, kernel_size: int) -> nn.Module:
    """An ME depthwise conv to call with our parameters (its own are never used)."""
    return DepthwiseConvolution(channels, kernel_size=kernel_size, bias=True, dimension=2)


@functools.cache
def _downsample_layer(in_channels: int, out_channels: int) -> nn.Module:
    with warnings.catch_warnings():  # it instantiates its autograd Function, which torch deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        return ME.MinkowskiConvolution(
            in_channels, out_channels, kernel_size=2, stride=2, bias=True, dimension=2
        )


@contextlib.contextmanager
def _fixed_pair_order(cuda: bool) -> Iterator[None]:
    """MinkowskiEngine's CPU kernel maps give each (input, output) pair its slot from a counter
    that the OpenMP threads share, so the order of the pairs, and with it the order of every
    sum over them in the backward pass, changes from run to run (gradients then differ by a few
    1e-6 of their scale). Built on one thread, the order is fixed. MinkowskiEngine and torch
    share the OpenMP runtime, so torch's thread count is what it reads."""
    if cuda:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class MinkowskiSites:
    """Features (M, C) at the visible sites of ``visible`` (N, H, W) bool."""

    def __init__(self, visible: torch.Tensor):
        self.shape = visible.shape
        _, height, width = visible.shape
        kind = ME.CoordinateMapType.CUDA if visible.is_cuda else ME.CoordinateMapType.CPU
        # num_threads: MinkowskiEngine would otherwise set the OpenMP thread count, torch's too,
        # to the machine's core count.
        self.manager = ME.CoordinateManager(
            D=2, num_threads=torch.get_num_threads(), coordinate_map_type=kind
        )
        coordinates = visible.nonzero().int().contiguous()
        self.key, (unique, _) = self.manager.insert_and_map(coordinates, tensor_stride=1)
        # Rows follow the coordinate map's order, whatever it is.
        self.coordinates = coordinates[unique.to(coordinates.device)].long()
        sample, y, x = self.coordinates.unbind(1)
        self.sample = sample
        self.index = (sample * height + y) * width + x  # row -> site of the (N*H*W) grid

    def _tensor(self, x: torch.Tensor) -> ME.SparseTensor:
        return ME.SparseTensor(x, coordinate_map_key=self.key, coordinate_manager=self.manager)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (M, C)."""
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])[self.index]

    def exit(self, x: torch.Tensor) -> torch.Tensor:
        """(M, C) -> (N, C, H, W), zero at masked sites."""
        n, height, width = self.shape
        grid = x.new_zeros(n * height * width, x.shape[1]).index_copy(0, self.index, x)
        return grid.view(n, height, width, -1).permute(0, 3, 1, 2)

    def dwconv(self, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if not len(x):  # nothing visible in the whole batch (MinkowskiEngine would crash)
            return x
        layer = _dwconv_layer(conv.in_channels, conv.kernel_size[0])
        params = {"kernel": to_me_kernel(conv.weight, depthwise=True), "bias": conv.bias}
        with _fixed_pair_order(x.is_cuda):
            out = functional_call(layer, params, (self._tensor(x.to(conv.weight.dtype)),))
        return out.F

    def sample_sum(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) float32 or wider: each sample's channels summed over its rows."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        sums = x.new_zeros(self.shape[0], x.shape[1], dtype=dtype)
        return sums.index_add(0, self.sample, x.to(dtype))

    def site_norm(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) float32: the L2 norm of each sample's channels over its visible sites."""
        return self.sample_sum(x.to(torch.promote_types(x.dtype, torch.float32)).square()).sqrt()

    def visible_only(self, x: torch.Tensor) -> torch.Tensor:
        """x as it is: every row is a visible site."""
        return x

    def by_sample(self, x: torch.Tensor) -> None:
        """None: the rows of every sample share one (M, C) matrix, in the coordinate map's
        order."""
        return None

    def spread(self, stats: torch.Tensor) -> torch.Tensor:
        """Per-sample statistics (N, C) -> (M, C), each row its sample's."""
        return stats[self.sample]

    def downsample(self, conv: nn.Conv2d, x: torch.Tensor, coarse: MinkowskiSites) -> torch.Tensor:
        if not len(x):
            return x.new_zeros(0, conv.out_channels)
        # The output coordinates are the next stage's sites at tensor stride 2 (patch-aligned
        # masks: each reads only visible sites); rows are then put in the next stage's order.
        target = coarse.coordinates * torch.tensor([1, 2, 2], device=coarse.coordinates.device)
        key, (_, inverse) = self.manager.insert_and_map(
            target.int().contiguous(), tensor_stride=2, string_id="next stage"
        )
        layer = _downsample_layer(conv.in_channels, conv.out_channels)
        params = {"kernel": to_me_kernel(conv.weight, depthwise=False), "bias": conv.bias}
        inputs = (self._tensor(x.to(conv.weight.dtype)),)
        with _fixed_pair_order(x.is_cuda):
            out = functional_call(layer, params, inputs, {"coordinates": key})
        return out.F[inverse.to(out.F.device)]
