"""A checkpoint of C input channels in a network of N: one exact rule for the stem.

Only the stem convolution ``downsample_layers.0.0.weight`` (D, C, 4, 4) sees the image's
channels. The rule pairs new channel i (of N) with original channel c (of C) when
i = c (mod min(N, C)); new kernel i is the sum of its paired kernels, each divided by the number
of new channels it is paired with. It generalises timm's ``adapt_input_conv`` (N = 1: the sum of
all kernels; C divides N: copies scaled by C/N) so that it is exact in both directions:

- N < C (fold): kernel j = the sum of kernels c with c mod N = j. An N-channel image x gives the
  stem output of the C-channel image whose channel c is x's channel c mod N (N = 1: a grayscale
  image gives the output of the colour image with that image in every channel).
- N > C (cycle): kernel i = kernel (i mod C) / (how many of the N kernels copy it). The N-channel
  image whose channel i is channel i mod C of a C-channel image X gives X's output.

The stem's bias and LayerNorm see no channels and stay as they are. An FCMAE decoder's last
layer (``pred``, 32*32*C outputs) predicts pixels of C channels: it is dropped, so the model
keeps its fresh initialisation of it.

    weights = adapt_weights(read_weights("encoder-1600.pth"), 1)   # fcmae.weights.layouts
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("fcmae")

STEM = "downsample_layers.0.0.weight"
State = dict[str, torch.Tensor]
PRED = ("pred.weight", "pred.bias")  # the FCMAE decoder's last layer: pixels of in_chans channels


def channel_map(in_chans: int, file_chans: int) -> torch.Tensor:
    """(in_chans, file_chans) float64: the new kernel i is sum over c of map[i, c] * kernel c."""
    pairs = min(in_chans, file_chans)
    new = torch.arange(in_chans).unsqueeze(1)
    old = torch.arange(file_chans).unsqueeze(0)
    paired = (new % pairs == old % pairs).double()
    return paired / paired.sum(dim=0, keepdim=True)  # each kernel split over its copies


def adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The stem kernels (D, C, kh, kw) for in_chans input channels, by the module's rule (the
    sums taken in float64, the result in weight's dtype)."""
    mapping = channel_map(in_chans, weight.shape[1])
    adapted = torch.einsum("nc,dchw->dnhw", mapping, weight.double())
    return adapted.to(weight.dtype).contiguous()


def rule(file_chans: int, in_chans: int) -> str:
    """The rule in words, for the log: e.g. "3 -> 5 channels: stem kernels repeated
    cyclically, each divided by its number of copies"."""
    head = f"{file_chans} -> {in_chans} channels: stem kernels"
    if in_chans == 1:
        return f"{head} summed"
    if in_chans < file_chans:
        return f"{head} folded (channel j = the sum of kernels c with c mod {in_chans} = j)"
    if in_chans % file_chans == 0:
        return f"{head} repeated cyclically, scaled by {file_chans}/{in_chans}"
    return f"{head} repeated cyclically, each divided by its number of copies"


def adapt_states(network: State, rest: State, in_chans: int, source: str) -> tuple[State, State]:
    """(network, rest) of a checkpoint (fcmae.weights.layouts.Weights's) for a network of
    in_chans input channels: the stem adapted, an FCMAE decoder's ``pred`` left out (new
    dicts; the given ones never change). Logs the rule and the tensors it touched, naming
    source."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be at least 1, got {in_chans}")
    stem = network[STEM]
    adapted = {**network, STEM: adapt_stem(stem, in_chans)}
    dropped = [key for key in PRED if key in rest]
    fresh = f"; re-initialised: {', '.join(dropped)}" if dropped else ""
    log.info(
        "%s: %s; adapted %s %s -> %s%s.",
        source,
        rule(stem.shape[1], in_chans),
        STEM,
        tuple(stem.shape),
        tuple(adapted[STEM].shape),
        fresh,
    )
    return adapted, {k: v for k, v in rest.items() if k not in dropped}
