"""A classifier checkpoint in the fine-tuning stage's terms: its head's class count, the class
names it was trained on, and the model it holds (a fine-tuned ConvNeXtV2 or a linear probe)."""

from __future__ import annotations

from typing import Any

from torch import nn

from fcmae.finetune.probe import LinearProbe, is_probe, probe_classes
from fcmae.weights.layouts import Weights, build_model


def head_classes(weights: Weights) -> int | None:
    """Classes of the classifier head, a fine-tuned one or a linear probe's; None for an
    encoder."""
    return probe_classes(weights) if is_probe(weights) else weights.num_classes


def class_names(weights: Weights) -> list[str] | None:
    """The class folder names a fine-tuning checkpoint or export was trained on: fcmae keeps
    them in a training checkpoint's extra state (ClassNames) and as an export's "classes"."""
    extra: Any = weights.metadata.get("extra")
    if isinstance(extra, dict) and isinstance(extra.get("classes"), dict):
        return list(extra["classes"].get("names", [])) or None
    names = weights.metadata.get("classes")
    return list(names) if isinstance(names, list) else None


def build_classifier(weights: Weights) -> nn.Module:
    """The classifier a file holds, loaded: a linear probe (the bare encoder under the probe's
    head), else a fine-tuned ConvNeXtV2."""
    if not is_probe(weights):
        return build_model(weights, "classifier")
    classes = probe_classes(weights)
    return build_model(weights, "encoder", wrap=lambda encoder: LinearProbe(encoder, classes))
