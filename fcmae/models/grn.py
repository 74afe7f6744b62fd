"""Global response normalisation (ConvNeXt V2) and the Linear after it, with backward passes of
their own.

GRN on features x, per sample and channel c over the sample's (visible) sites:

    G_c = ||x_c||_2,   N_c = G_c / (mean_c' G_c' + eps),   z = x * s + beta,  s_c = 1 + gamma_c N_c

and the block's ``pwconv2`` follows: y = z W^T + b. Only G needs a pass over x; the rest is per
sample and channel. Autograd, left to itself, materialises the full-size products of the
backward (the gradient g = dy W times x for gamma and N, g times s, the norm's own gradient
x * dG / G, their sum) and walks the 4x-wide x several times more than needed. Two ways to do
better, chosen by shape (``GRN.forward``):

- Folded (eager mode, where a sample has at least as many rows as the Linear has outputs: the
  early stages). s is per sample and channel, so it folds into a per-sample weight
  W_n = W diag(s_n): y_n = x_n W_n^T + (W beta + b), one batched matmul, and z is never formed
  nor saved. In the backward, Q_n = dy_n^T x_n (C_out x C per sample) gives everything that
  needs a sum over sites: P_n = sum over sites of g * x = sum_j W_j * Q_n,j, and
  dW = sum_n Q_n diag(s_n) + (sum dy)^T beta. x is read once for Q and once for
  dx = dy_n W_n + x * dG / G: the activation passes are those of a GELU. The per-sample
  weights and Q are C_out x C per sample, no larger than the activation in this regime.
- Unfolded (late stages, where per-sample weights would outweigh the activation;
  MinkowskiEngine's rows, which mix samples; and compiled code, where inductor fuses GRN's
  elementwise passes itself and one large matmul beats N small ones): GRN alone, then the
  Linear. Its backward reads g and x twice each, once for P and once for dx, and saves only x
  and the statistics.

Both share the statistics and the norm's gradient:

    dG_c = gamma_c P_c / m - (sum_c' gamma_c' P_c' G_c') / (C m^2),   m = mean_c G_c + eps

with dG / G taken as 0 where G is 0 (a channel that is zero at every site;
torch.linalg.vector_norm's gradient is 0 there too). Statistics are accumulated in float32
whatever the precision of x; outputs have x's dtype (under autocast, the matmuls autocast).

How sites are laid out (a dense grid, the packed visible sites of the sparse backend,
MinkowskiEngine's rows) is the business of the sites object: ``site_norm`` (over visible sites:
what N reads) and ``sample_sum`` (over every site of the layout: where N is applied) give
per-sample statistics, ``spread`` lays them back over x, ``visible_only`` zeroes x outside the
visible sites, ``by_sample`` views the features as (N, rows, C) where the layout allows it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

EPS = 1e-6


def _statistics(x: torch.Tensor, gamma: torch.Tensor, sites: Any) -> tuple[torch.Tensor, ...]:
    """norm G, m = mean G + eps and the scale s = 1 + gamma G / m, float32, per sample."""
    norm = sites.site_norm(x)
    mean = norm.mean(dim=-1, keepdim=True) + EPS
    return norm, mean, 1 + gamma * (norm / mean)


def _norm_coefficient(
    products: torch.Tensor, gamma: torch.Tensor, norm: torch.Tensor, mean: torch.Tensor
) -> torch.Tensor:
    """dG / G from P, the per-sample sums of g * x (0 where G is 0)."""
    d_scaled = gamma * products  # the gradient of N
    d_norm = d_scaled / mean - (d_scaled * norm).sum(dim=-1, keepdim=True) / (
        norm.shape[-1] * mean * mean
    )
    return torch.where(norm > 0, d_norm / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0)


class _GRN(torch.autograd.Function):
    """GRN alone: z = x * s + beta."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, sites: Any
    ) -> torch.Tensor:
        norm, mean, scale = _statistics(x, gamma, sites)
        ctx.save_for_backward(x, gamma, norm, mean)
        ctx.sites = sites
        return torch.addcmul(beta.to(x.dtype), x, sites.spread(scale).to(x.dtype))

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gamma, norm, mean = ctx.saved_tensors
        sites = ctx.sites
        products = sites.sample_sum(g * x)  # P: per-sample sums of g * x over every site
        coef = _norm_coefficient(products, gamma, norm, mean)
        dx = g * sites.spread(1 + gamma * (norm / mean)).to(g.dtype)
        # The norm saw visible sites only: its part of the gradient stays there.
        dx.addcmul_(sites.visible_only(x), sites.spread(coef).to(x.dtype))
        # gamma and beta are (C,): their gradients sum over samples, and beta's over sites.
        channels = norm.shape[-1]
        d_gamma = (products * (norm / mean)).reshape(-1, channels).sum(0)
        d_beta = g.reshape(-1, channels).sum(0, dtype=norm.dtype)
        return dx, d_gamma.to(gamma.dtype), d_beta.to(gamma.dtype), None


class _FoldedGRNLinear(torch.autograd.Function):
    """GRN then the Linear (weight, bias), with GRN's scale folded into per-sample weights."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        sites: Any,
    ) -> torch.Tensor:
        norm, mean, scale = _statistics(x, gamma, sites)
        rows = sites.by_sample(x)  # (N, R, C)
        folded = weight * scale.reshape(len(rows), 1, -1)  # (N, C_out, C) float32
        constant = torch.addmv(bias, weight, beta)  # W beta + b
        ctx.save_for_backward(x, gamma, beta, weight, norm, mean)
        ctx.sites = sites
        y = torch.baddbmm(constant.to(x.dtype), rows, folded.to(x.dtype).transpose(1, 2))
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, gamma, beta, weight, norm, mean = ctx.saved_tensors
        sites, w = ctx.sites, weight.to(norm.dtype)
        rows = sites.by_sample(x)
        n, channels = len(rows), x.shape[-1]
        dy_rows = dy.reshape(n, -1, weight.shape[0])
        # Q_n = dy_n^T x_n: every sum over sites the backward needs, in one read of x.
        outer = torch.bmm(dy_rows.transpose(1, 2), rows.to(dy.dtype)).to(norm.dtype)
        products = (outer * w).sum(1).reshape(norm.shape)  # P = sum of (dy W) * x
        coef = _norm_coefficient(products, gamma, norm, mean)
        scale = (1 + gamma * (norm / mean)).reshape(n, 1, channels)
        dx = torch.bmm(dy_rows, (w * scale).to(dy.dtype))  # g * s, g = dy W
        dx.addcmul_(sites.by_sample(sites.visible_only(x)), coef.reshape(n, 1, -1).to(x.dtype))
        dy_sum = dy_rows.sum((0, 1), dtype=norm.dtype)
        d_gamma = (products * (norm / mean)).reshape(-1, channels).sum(0)
        d_beta = dy_sum @ w
        d_weight = (outer * scale).sum(0) + torch.outer(dy_sum, beta.to(norm.dtype))
        return (
            dx.reshape(x.shape),
            d_gamma.to(gamma.dtype),
            d_beta.to(beta.dtype),
            d_weight.to(weight.dtype),
            dy_sum.to(weight.dtype),
            None,
        )


class GRN(nn.Module):
    """Global response normalisation: each channel is scaled by its L2 norm over the (visible)
    sites of its sample, relative to the mean over channels. gamma and beta, shaped
    (1, 1, 1, C) as in the official checkpoints, start at zero: a fresh GRN is the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor, sites: Any, linear: nn.Linear) -> torch.Tensor:
        """``linear`` of GRN of x: (..., C) features laid out as ``sites`` says."""
        # Flattened: the (1, 1, 1, C) parameters broadcast over every layout of sites.
        gamma, beta = self.gamma.flatten(), self.beta.flatten()
        rows = sites.by_sample(x)
        # Compiled, the unfolded way measured faster (README, "GRN's cost").
        if (
            rows is not None
            and rows.shape[1] >= linear.out_features
            and not torch.compiler.is_compiling()
        ):
            return _FoldedGRNLinear.apply(x, gamma, beta, linear.weight, linear.bias, sites)
        return linear(_GRN.apply(x, gamma, beta, sites))
