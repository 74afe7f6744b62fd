"""The linear probe's model: a frozen encoder and a BatchNorm1d + Linear head (MAE's recipe);
trained by `fcmae linprobe`, evaluated by `fcmae eval`; and how to tell its checkpoints."""

from __future__ import annotations

import torch
from torch import nn

from fcmae.weights.layouts import Weights

PROBE_HEAD = "head.1.weight"  # the probe's Linear, beside its encoder in a checkpoint


def is_probe(weights: Weights) -> bool:
    """A linear probe's checkpoint: the encoder and, beside it, BatchNorm1d + Linear."""
    return PROBE_HEAD in weights.rest


def probe_classes(weights: Weights) -> int:
    """Classes of a linear probe's head."""
    return weights.rest[PROBE_HEAD].shape[0]


class LinearProbe(nn.Module):
    """(N, C, H, W) -> frozen encoder -> global average pool (N, D) -> BatchNorm1d -> Linear.

    The batch norm standardises each feature without learning a scale (MAE), so one lr suits
    encoders whose features differ in scale. The encoder stays in eval mode and gets no
    gradient; only the head's parameters train.
    """

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder.requires_grad_(False)
        dim = encoder.num_features
        self.head = nn.Sequential(
            nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes)
        )
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()  # no drop path, whatever the head does
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.encoder.forward_features(images).mean(dim=(2, 3))
        return self.head(features)
