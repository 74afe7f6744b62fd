"""The `minkowski` backend (MinkowskiEngine sparse tensors) against the `sparse` backend, and
the properties of masked execution on it.

MinkowskiEngine's kernel maps are built on one thread (fcmae.sites.minkowski), so two runs
agree bit for bit; outputs and every gradient agree with the sparse backend to 5e-6 of the
tensor's scale, as the sparse backend does with the dense one, with GRN and without it
(ConvNeXt V1's layer scale). Needs MinkowskiEngine (`bash
scripts/install_minkowski.sh`, part of the README's test line); without it these tests are
skipped on a developer's machine and fail in CI (CI set).
"""

import os

import pytest
import torch
from helpers import (
    assert_close_to_scale,
    encoder,
    features_and_grads,
    grn_by_hand,
    random_patch_mask,
    randomize_,
    uneven_mask,
)

from fcmae.models import ModelError
from fcmae.models.convnextv2 import Block
from fcmae.sites import stage_sites

try:
    from fcmae.sites.minkowski import MinkowskiSites
except ModelError as error:
    if os.environ.get("CI"):
        pytest.fail(f"CI must test the minkowski backend: {error}", pytrace=False)
    pytest.skip(str(error), allow_module_level=True)


def border_masked_everywhere():
    """Top row and right column masked in every sample (the official `.dense()` would shrink
    the grid here)."""
    mask = random_patch_mask(3, 4, 4, ratio=0.4, seed=5)
    mask[:, 0, :] = True
    mask[:, :, -1] = True
    return mask


@pytest.mark.parametrize(
    "shape,mask",
    [
        ((4, 3, 128, 128), uneven_mask()),  # visible counts 1, 16, 7 and 0
        ((1, 3, 96, 160), random_patch_mask(1, 3, 5, seed=2)),  # batch 1, non-square
        ((2, 3, 128, 192), random_patch_mask(2, 2, 3, ratio=0.5, seed=3)),  # 64-px patches
        ((3, 3, 128, 128), border_masked_everywhere()),
    ],
    ids=["uneven", "batch1-nonsquare", "patch64", "border-masked"],
)
def test_minkowski_agrees_with_sparse_on_outputs_and_every_gradient(shape, mask):
    model = encoder()
    x = torch.randn(shape)
    sparse_out, sparse_grads = features_and_grads(model, x, mask, "sparse")
    out, grads = features_and_grads(model, x, mask, "minkowski")
    assert out.shape == sparse_out.shape
    assert sparse_out.abs().max() > 0.1
    assert_close_to_scale(out, sparse_out)
    for name, grad in sparse_grads.items():
        assert grad.abs().max() > 0, name
        assert_close_to_scale(grads[name], grad, name=name)


@pytest.mark.parametrize(
    "mask", [uneven_mask(), random_patch_mask(2, 4, 4, seed=6)], ids=["uneven", "random"]
)
def test_blocks_without_grn_agree_with_sparse_on_outputs_and_every_gradient(mask):
    model = encoder(grn=False)  # ConvNeXt V1's blocks: layer scale, no GRN
    assert not any("grn" in name for name, _ in model.named_parameters())
    x = torch.randn(len(mask), 3, 128, 128)
    sparse_out, sparse_grads = features_and_grads(model, x, mask, "sparse")
    out, grads = features_and_grads(model, x, mask, "minkowski")
    assert sparse_out.abs().max() > 0.1
    assert_close_to_scale(out, sparse_out)
    assert any(name.endswith(".gamma") for name in grads)
    for name, grad in sparse_grads.items():
        assert grad.abs().max() > 0, name
        assert_close_to_scale(grads[name], grad, name=name)


def test_two_runs_give_the_same_gradients_bit_for_bit():
    # Kernel maps built on several threads order their pairs differently from run to run, and
    # the gradients then differ by a few 1e-6 of their scale.
    model, mask = encoder(), uneven_mask()
    x = torch.randn(len(mask), 3, 128, 128)
    _, first = features_and_grads(model, x, mask, "minkowski")
    for _ in range(3):
        _, again = features_and_grads(model, x, mask, "minkowski")
        assert all(torch.equal(again[name], grad) for name, grad in first.items())


def test_the_backend_leaves_torchs_thread_count_as_it_was():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # MinkowskiEngine would set it to the machine's core count
        features_and_grads(
            encoder(), torch.randn(2, 3, 64, 64), uneven_mask()[:2, :2, :2], "minkowski"
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_masked_content_never_reaches_visible_sites():
    model = encoder()
    mask = random_patch_mask(3, 4, 4, seed=4)
    x = torch.randn(3, 3, 128, 128)
    pixel_mask = mask.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1)
    changed = torch.where(pixel_mask, 100 * torch.randn_like(x), x)
    before = model.forward_features(x, mask, "minkowski")
    after = model.forward_features(changed, mask, "minkowski")
    assert_close_to_scale(after, before)  # a leak of 100x noise would be far larger
    assert torch.all(before.permute(0, 2, 3, 1)[mask] == 0)  # masked sites are empty
    assert torch.all(before.permute(0, 2, 3, 1)[~mask].abs().sum(-1) > 0)


def test_samples_do_not_leak_and_a_lone_masked_sample_is_empty():
    model = encoder()
    mask = uneven_mask()
    x = torch.randn(4, 3, 128, 128)
    other = x.clone()
    other[2] = torch.randn(3, 128, 128)
    before = model.forward_features(x, mask, "minkowski")
    after = model.forward_features(other, mask, "minkowski")
    assert not torch.allclose(before[2], after[2])
    for i in (0, 1, 3):
        assert_close_to_scale(after[i], before[i])
    alone = model.forward_features(x[3:4], mask[3:4], "minkowski")  # batch 1, nothing visible
    assert alone.shape == (1, 320, 4, 4) and torch.equal(alone, torch.zeros_like(alone))


def test_grn_statistics_are_per_sample_over_visible_sites():
    block = randomize_(Block(8), seed=5)
    mask = uneven_mask()[:3]
    x = torch.randn(3, 8, 16, 16)
    sites = stage_sites(mask, (16, 16), "minkowski")[0]
    assert isinstance(sites, MinkowskiSites)
    out = sites.exit(block(sites.enter(x), sites)).permute(0, 2, 3, 1)
    visible = ~mask.repeat_interleave(4, 1).repeat_interleave(4, 2)
    torch.testing.assert_close(out[visible], grn_by_hand(block, x.permute(0, 2, 3, 1), visible))


def test_sites_hold_one_row_per_visible_site_from_the_mask():
    mask = uneven_mask()
    sites = stage_sites(mask, (32, 32), "minkowski")
    # visible patches 1 + 16 + 7 + 0 = 24; a patch is 8x8, 4x4, 2x2 and 1 site per stage
    assert [len(s.index) for s in sites] == [24 * 64, 24 * 16, 24 * 4, 24]
    stem = torch.zeros(4, 2, 32, 32)  # a stem output that is zero at visible sites too
    assert sites[0].enter(stem).shape == (24 * 64, 2)
