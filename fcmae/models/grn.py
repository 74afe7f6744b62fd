"""Global response normalisation (ConvNeXt V2), with a backward pass of its own.

GRN on features x, per sample and channel c over the sample's (visible) sites:

    G_c = ||x_c||_2,   N_c = G_c / (mean_c' G_c' + eps),   out = x * (1 + gamma_c N_c) + beta_c

Only G needs a pass over x; the rest is per sample and channel. Autograd, left to itself,
materialises the full-size products of the backward (the gradient times x for gamma and N,
the norm's own gradient x * dG / G, their sum) and walks x several times more than needed.
Here the backward reads the gradient g and x twice each: once for P_c = sum over sites of
g * x (which gives the gradients of gamma and of N), once for

    dx = g * (1 + gamma N) + x * dG / G
    dG_c = gamma_c P_c / m - (sum_c' gamma_c' P_c' G_c') / (C m^2)

with m = mean_c G_c + eps, and dG / G taken as 0 where G is 0 (a channel that is zero at every
site; torch.linalg.vector_norm's gradient is 0 there too). Only x and the small per-sample
statistics are saved, which autograd saved already. Statistics are accumulated in float32
whatever the precision of x; the output has x's dtype.

How sites are laid out (a dense grid, the packed visible sites of the sparse backend,
MinkowskiEngine's rows) is the business of the sites object: ``site_norm`` (over visible sites:
what N reads) and ``sample_sum`` (over every site of the layout: where N is applied) give
per-sample statistics, ``spread`` lays them back over x, ``visible_only`` zeroes x outside the
visible sites. One implementation serves every backend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EPS = 1e-6


class _GRN(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, sites: Any
    ) -> torch.Tensor:
        norm = sites.site_norm(x)  # per-sample statistics, float32
        mean = norm.mean(dim=-1, keepdim=True) + EPS
        scale = sites.spread(1 + gamma * (norm / mean))
        ctx.save_for_backward(x, gamma, norm, mean)
        ctx.sites = sites
        return torch.addcmul(beta.to(x.dtype), x, scale.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gamma, norm, mean = ctx.saved_tensors
        sites = ctx.sites
        products = sites.sample_sum(g * x)  # P: per-sample sums of g * x over every site
        d_scaled = gamma * products  # the gradient of N
        channels = norm.shape[-1]
        d_norm = d_scaled / mean - (d_scaled * norm).sum(dim=-1, keepdim=True) / (
            channels * mean * mean
        )
        coef = torch.where(norm > 0, d_norm / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0)
        scale = 1 + gamma * (norm / mean)
        dx = g * sites.spread(scale).to(g.dtype)
        # The norm saw visible sites only: its part of the gradient stays there.
        dx.addcmul_(sites.visible_only(x), sites.spread(coef).to(x.dtype))
        # gamma and beta are (C,): their gradients sum over samples, and beta's over sites.
        d_gamma = (products * (norm / mean)).reshape(-1, channels).sum(0)
        d_beta = g.reshape(-1, channels).sum(0, dtype=norm.dtype)
        return dx, d_gamma.to(gamma.dtype), d_beta.to(gamma.dtype), None


class GRN(nn.Module):
    """Global response normalisation: each channel is scaled by its L2 norm over the (visible)
    sites of its sample, relative to the mean over channels. gamma and beta, shaped
    (1, 1, 1, C) as in the official checkpoints, start at zero: a fresh GRN is the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor, sites: Any) -> torch.Tensor:
        """x: (..., C) features laid out as ``sites`` says."""
        # Flattened: the (1, 1, 1, C) parameters broadcast over every layout of sites.
        return _GRN.apply(x, self.gamma.flatten(), self.beta.flatten(), sites)
