"""The model registry: ``create_model(name, **kwargs)``, ``list_models()``, and the sizes.

Torch-free (the CLI and configuration read the names from here); a model's module is imported
when a model is built. Models and their ways of running (fcmae.sites) raise ModelError, a
ValueError in the terms of their own arguments; the CLI says it as one sentence.
"""

from __future__ import annotations

from typing import Any

from fcmae.models.errors import ModelError

# size -> (depths, dims): the paper's Table 1 and the official models/convnextv2.py.
SIZES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": ((3, 3, 27, 3), (352, 704, 1408, 2816)),
}
CLASSIFIERS = tuple(f"convnextv2_{size}" for size in SIZES)  # ConvNeXtV2
AUTOENCODERS = tuple(f"fcmae_{name}" for name in CLASSIFIERS)  # FCMAE around the same encoder


def list_models() -> list[str]:
    return sorted(CLASSIFIERS + AUTOENCODERS)


def create_model(name: str, features_only: bool = False, **kwargs: Any) -> Any:
    """``convnextv2_<size>`` (ConvNeXtV2 classifier; ``head=False`` for the bare encoder) or
    ``fcmae_convnextv2_<size>`` (FCMAE), size one of atto femto pico nano tiny base large
    huge; kwargs go to the constructor. ``features_only=True`` (timm's) gives the encoder's
    stage maps instead, a ConvNeXtV2Features taking ``out_indices`` (default (0, 1, 2, 3))."""
    if name in AUTOENCODERS and features_only:
        raise ModelError(
            f"features_only applies to an encoder: create {name.removeprefix('fcmae_')} with "
            f"features_only=True, not {name} (an FCMAE checkpoint loads into it with "
            f"fcmae.weights.layouts.load_into)."
        )
    if name in CLASSIFIERS and features_only:
        from fcmae.models.convnextv2 import ConvNeXtV2Features as cls
    elif name in CLASSIFIERS:
        from fcmae.models.convnextv2 import ConvNeXtV2 as cls
    elif name in AUTOENCODERS:
        from fcmae.models.fcmae import FCMAE as cls
    else:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}.")
    depths, dims = SIZES[name.removeprefix("fcmae_").removeprefix("convnextv2_")]
    return cls(depths=depths, dims=dims, **kwargs)
