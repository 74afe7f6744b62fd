"""Sparse execution: the `sparse` backend against the masked-dense reference, and the
properties that make masked pretraining honest (no leaks from masked content or
between samples, GRN statistics per sample over visible sites)."""

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
from fcmae.sites.grid import GridSites
from fcmae.sites.packed import PackedSites


@pytest.mark.parametrize(
    "shape,mask",
    [
        ((4, 3, 128, 128), random_patch_mask(4, 4, 4, seed=1)),
        ((1, 3, 96, 160), random_patch_mask(1, 3, 5, seed=2)),
        ((4, 3, 128, 128), uneven_mask()),
        ((2, 3, 128, 192), random_patch_mask(2, 2, 3, ratio=0.5, seed=3)),  # 64 px patches
    ],
)
def test_backends_agree_on_outputs_and_every_gradient(shape, mask):
    model = encoder()
    x = torch.randn(shape)
    dense_out, dense_grads = features_and_grads(model, x, mask, "dense")
    sparse_out, sparse_grads = features_and_grads(model, x, mask, "sparse")
    assert dense_out.abs().max() > 0.1
    assert_close_to_scale(sparse_out, dense_out)
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name
        assert_close_to_scale(sparse_grads[name], grad, name=name)


def test_all_visible_mask_is_the_dense_network():
    model = encoder()
    x = torch.randn(2, 3, 64, 96)
    none_masked = torch.zeros(2, 2, 3, dtype=torch.bool)
    plain = model.forward_features(x)
    for backend in ("dense", "sparse"):
        assert_close_to_scale(model.forward_features(x, none_masked, backend), plain)


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_masked_content_never_reaches_visible_sites(backend):
    model = encoder()
    mask = random_patch_mask(3, 4, 4, seed=4)
    x = torch.randn(3, 3, 128, 128)
    pixel_mask = mask.repeat_interleave(32, 1).repeat_interleave(32, 2).unsqueeze(1)
    changed = torch.where(pixel_mask, 100 * torch.randn_like(x), x)
    before = model.forward_features(x, mask, backend)
    after = model.forward_features(changed, mask, backend)
    assert torch.equal(before, after)
    assert torch.all(before.permute(0, 2, 3, 1)[mask] == 0)  # masked sites are empty


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_samples_do_not_leak_into_each_other(backend):
    model = encoder()
    mask = uneven_mask()
    x = torch.randn(4, 3, 128, 128)
    other = x.clone()
    other[2] = torch.randn(3, 128, 128)
    before = model.forward_features(x, mask, backend)
    after = model.forward_features(other, mask, backend)
    assert not torch.equal(before[2], after[2])
    for i in (0, 1, 3):
        assert torch.equal(before[i], after[i])
    alone = model.forward_features(x[3:4], mask[3:4], backend)  # batch of one, nothing visible
    assert torch.equal(alone, torch.zeros_like(alone))
    alone = model.forward_features(x[:1], mask[:1], backend)
    assert_close_to_scale(alone, before[:1])


@pytest.mark.parametrize("backend", ["dense", "sparse"])
def test_grn_statistics_are_per_sample_over_visible_sites(backend):
    block = randomize_(Block(8), seed=5)
    mask = uneven_mask()[:3]
    x = torch.randn(3, 8, 16, 16)
    sites = stage_sites(mask, (16, 16), backend)[0]
    out = sites.exit(block(sites.enter(x), sites)).permute(0, 2, 3, 1)
    visible = ~mask.repeat_interleave(4, 1).repeat_interleave(4, 2)
    torch.testing.assert_close(out[visible], grn_by_hand(block, x.permute(0, 2, 3, 1), visible))


def test_sites_choose_the_layout_by_backend():
    mask = random_patch_mask(2, 2, 2)
    assert all(isinstance(s, GridSites) for s in stage_sites(mask, (16, 16), "dense"))
    packed = stage_sites(mask, (16, 16), "sparse")
    assert all(isinstance(s, PackedSites) for s in packed)
    assert [s.index.shape[1] for s in packed] == [64 * 1, 16, 4, 1]  # 1 visible patch of 4
    with pytest.raises(ModelError, match="choose one of sparse, dense"):
        stage_sites(mask, (16, 16), "minkowsky")


def test_bad_masks_are_refused_with_the_fix():
    model = encoder()
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(ModelError, match="bool tensor"):
        model.forward_features(x, torch.zeros(2, 2, 2), "sparse")
    with pytest.raises(ModelError, match="multiple of 32"):
        model.forward_features(x, torch.zeros(2, 4, 4, dtype=torch.bool), "sparse")
