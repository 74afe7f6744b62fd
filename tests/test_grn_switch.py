"""grn=False: the blocks of ConvNeXt V1 (no GRN, layer scale 1e-6), for the paper's ablation."""

import pytest
import torch
from helpers import assert_close_to_scale, encoder, features_and_grads, random_patch_mask

import fcmae
from fcmae.models.convnextv2 import Block
from fcmae.sites.grid import GridSites


def test_without_grn_the_blocks_hold_v1_layer_scale_and_no_grn():
    model = fcmae.create_model("fcmae_convnextv2_atto", grn=False)
    names = dict(model.named_parameters())
    assert not any("grn" in name for name in names)
    scale = names["encoder.stages.0.0.gamma"]
    assert scale.shape == (40,) and torch.all(scale == 1e-6)
    assert names["decoder.0.gamma"].shape == (512,)
    with_grn = fcmae.create_model("fcmae_convnextv2_atto")
    assert "encoder.stages.0.0.grn.gamma" in dict(with_grn.named_parameters())
    assert not hasattr(with_grn.encoder.stages[0][0], "gamma")


def test_a_v1_block_with_unit_layer_scale_is_a_v2_block_whose_grn_is_fresh():
    # A fresh GRN (gamma = beta = 0) is the identity, and a layer scale of 1 is too: the two
    # blocks then compute the same function of the same weights.
    torch.manual_seed(0)
    v2, v1 = Block(16), Block(16, grn=False)
    state = {k: v for k, v in v2.state_dict().items() if ".grn." not in f".{k}"}
    v1.load_state_dict({**state, "gamma": torch.ones(16)})
    x = torch.randn(2, 5, 5, 16)
    assert_close_to_scale(v1(x, GridSites()), v2(x, GridSites()))


@pytest.mark.parametrize("grn", [True, False])
def test_sparse_and_dense_backends_agree_without_grn(grn):
    model = encoder(grn=grn)
    mask = random_patch_mask(3, 4, 4, seed=5)
    x = torch.randn(3, 3, 128, 128)
    dense_out, dense_grads = features_and_grads(model, x, mask, "dense")
    sparse_out, sparse_grads = features_and_grads(model, x, mask, "sparse")
    assert_close_to_scale(sparse_out, dense_out)
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name
        assert_close_to_scale(sparse_grads[name], grad, name=name)


def test_fcmae_without_grn_trains_one_step():
    model = fcmae.create_model("fcmae_convnextv2_atto", grn=False)
    loss, pred, mask = model(torch.randn(2, 3, 64, 64))
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.stages[3][1].gamma.grad.abs().sum() > 0
