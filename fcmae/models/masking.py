"""The masking arithmetic of FCMAE: patch sizes, how many patches a ratio hides, and the one
check of input size, patch size and mask ratio. No torch: the configuration uses it."""

from __future__ import annotations

from fcmae.models.errors import ModelError

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

    Raises ModelError, one sentence naming the key, when patch_size is not a positive multiple
    of STRIDE, input_size not a positive multiple of patch_size, mask_ratio outside (0, 1), or
    the mask would hide every patch.
    """
    if patch_size <= 0 or patch_size % STRIDE:
        raise ModelError(
            f"patch_size must be a multiple of {STRIDE} (the encoder's stride), got "
            f"{patch_size}; use {STRIDE}, {2 * STRIDE}, ..."
        )
    if input_size <= 0 or input_size % patch_size:
        raise ModelError(
            f"input_size must be a multiple of patch_size={patch_size}, got {input_size}."
        )
    if not 0 < mask_ratio < 1:
        raise ModelError(f"mask_ratio must lie in (0, 1), got {mask_ratio}.")
    patches = (input_size // patch_size) ** 2
    masked = masked_patches(patches, mask_ratio)
    if patches == 1:
        raise ModelError(
            f"patch_size {patch_size} cuts a {input_size}-px image into one patch, which a mask "
            f"cannot split into seen and hidden parts; choose a smaller patch_size or a "
            f"larger input_size."
        )
    if masked == patches:
        raise ModelError(
            f"mask_ratio {mask_ratio} masks all {patches} patches of {patch_size} px in a "
            f"{input_size}-px image, leaving the encoder nothing to see; choose a ratio of at "
            f"most {1 - 1 / patches:.3g}, or a larger input_size."
        )
    return masked, patches
