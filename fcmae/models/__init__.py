"""The model registry: ``create_model(name, **kwargs)``, ``list_models()``, and the sizes.

Torch-free (the CLI and configuration read the names from here); a model's module is imported
when a model is built.
"""

from __future__ import annotations

from typing import Any

from fcmae.errors import ConfigError

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
STRIDE = 32  # the encoder's total downsampling (stem 4, then three times 2): one site per 32 px


def masked_patches(patches: int, mask_ratio: float) -> int:
    """How many of ``patches`` a mask of ``mask_ratio`` hides: int(patches * (1 - mask_ratio))
    stay visible, as in the official code, so at few patches the share masked can exceed the
    ratio (0.6 of 4 patches masks 3)."""
    return patches - int(patches * (1 - mask_ratio))


def check_masking(input_size: int, patch_size: int, mask_ratio: float) -> tuple[int, int]:
    """(masked, patches) of a square ``input_size`` image cut into ``patch_size`` patches under
    a mask of ``mask_ratio``: the one check of these three settings, for the configuration and
    every job that takes them from elsewhere (a checkpoint, a sweep).

    Raises ConfigError, one sentence naming the key, when patch_size is not a positive multiple
    of STRIDE, input_size not a positive multiple of patch_size, mask_ratio outside (0, 1), or
    the mask would hide every patch.
    """
    if patch_size <= 0 or patch_size % STRIDE:
        raise ConfigError(
            f"patch_size must be a multiple of {STRIDE} (the encoder's stride), got "
            f"{patch_size}; use {STRIDE}, {2 * STRIDE}, ..."
        )
    if input_size <= 0 or input_size % patch_size:
        raise ConfigError(
            f"input_size must be a multiple of patch_size={patch_size}, got {input_size}."
        )
    if not 0 < mask_ratio < 1:
        raise ConfigError(f"mask_ratio must lie in (0, 1), got {mask_ratio}.")
    patches = (input_size // patch_size) ** 2
    masked = masked_patches(patches, mask_ratio)
    if patches == 1:
        raise ConfigError(
            f"patch_size {patch_size} cuts a {input_size}-px image into one patch, which a mask "
            f"cannot split into seen and hidden parts; choose a smaller --patch-size or a "
            f"larger --input-size."
        )
    if masked == patches:
        raise ConfigError(
            f"mask_ratio {mask_ratio} masks all {patches} patches of {patch_size} px in a "
            f"{input_size}-px image, leaving the encoder nothing to see; choose a ratio of at "
            f"most {1 - 1 / patches:.3g}, or a larger --input-size."
        )
    return masked, patches


def list_models() -> list[str]:
    return sorted(CLASSIFIERS + AUTOENCODERS)


def create_model(name: str, features_only: bool = False, **kwargs: Any) -> Any:
    """``convnextv2_<size>`` (ConvNeXtV2 classifier; ``head=False`` for the bare encoder) or
    ``fcmae_convnextv2_<size>`` (FCMAE), size one of atto femto pico nano tiny base large
    huge; kwargs go to the constructor. ``features_only=True`` (timm's) gives the encoder's
    stage maps instead, a ConvNeXtV2Features taking ``out_indices`` (default (0, 1, 2, 3))."""
    from fcmae.errors import UserError

    if name in AUTOENCODERS and features_only:
        raise UserError(
            f"features_only applies to an encoder: create {name.removeprefix('fcmae_')} with "
            f"features_only=True, not {name} (an FCMAE checkpoint loads into it with "
            f"fcmae.weights.load_into)."
        )
    if name in CLASSIFIERS and features_only:
        from fcmae.models.convnextv2 import ConvNeXtV2Features as cls
    elif name in CLASSIFIERS:
        from fcmae.models.convnextv2 import ConvNeXtV2 as cls
    elif name in AUTOENCODERS:
        from fcmae.models.fcmae import FCMAE as cls
    else:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}.")
    depths, dims = SIZES[name.removeprefix("fcmae_").removeprefix("convnextv2_")]
    return cls(depths=depths, dims=dims, **kwargs)
