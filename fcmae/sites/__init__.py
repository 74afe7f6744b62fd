"""Ways to run the ConvNeXt V2 core over the visible sites of a mask: the backends.

A *sites* object describes one stage: which sites of each sample are visible and how the
features are laid out (always channels last). Per-site layers (LayerNorm, Linear, GELU) run on
those features as they are; the few operations that look across sites go through the sites
object:

- ``enter`` / ``exit``: from and to a dense (N, C, H, W) map,
- ``dwconv``: the depthwise convolution (submanifold: masked inputs are zero, only visible
  outputs are kept),
- for GRN (fcmae.models.grn): ``site_norm``, the per-sample L2 norm over visible sites,
  ``sample_sum``, a per-sample sum over every site of the layout (both float32 or wider),
  ``spread``, which lays such statistics back over the features, ``visible_only``, the
  features zeroed outside the visible sites, and ``by_sample``, the features as (N, rows, C),
  or None where samples share rows (GRN then runs unfolded),
- ``downsample``: the 2x2 stride-2 convolution into the next stage's sites.

A backend is a sites class built from ``visible`` (N, H, W) bool. Masks are patch-aligned, so
the 2x2 downsampling of a visible site reads only visible sites and all backends agree.

This module imports no torch (the CLI reads the backend names from it); a backend's module is
imported when the backend is first used. A new backend is one class and one line in BACKENDS.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:class"
BACKENDS: dict[str, str] = {
    "sparse": "fcmae.sites.packed:PackedSites",  # visible sites only; the default
    "dense": "fcmae.sites.grid:GridSites",  # masked-dense reference
    "minkowski": "fcmae.sites.minkowski:MinkowskiSites",  # needs MinkowskiEngine
}


def backend_class(name: str) -> type:
    """The sites class registered as ``name``."""
    from fcmae.models.errors import ModelError

    if name not in BACKENDS:
        raise ModelError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def stage_sites(mask: Any, stem_size: tuple[int, int], backend: str, num_stages: int = 4) -> list:
    """Sites for each stage of a network whose stem output is ``stem_size`` (H0, W0).

    ``mask`` (N, h, w) bool, True = masked patch, or None for the plain dense network (every
    site visible, whatever the backend). Stage s has (H0 / 2^s, W0 / 2^s) sites.
    """
    from fcmae.sites.grid import GridSites

    if mask is None:
        return [GridSites()] * num_stages
    cls = backend_class(backend)
    sites = []
    for s in range(num_stages):
        scale = (stem_size[0] >> s) // mask.shape[1]
        sites.append(cls(~mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2)))
    return sites
