"""The FCMAE model: masking, decoder, loss, and its encoder as the core's backbone."""

import pytest
import torch
from helpers import assert_close_to_scale, randomize_

import fcmae
from fcmae.models import ModelError


def tiny_fcmae(**kwargs):
    kwargs.setdefault("decoder_dim", 32)
    return fcmae.create_model("fcmae_convnextv2_atto", **kwargs)


def test_forward_shapes_and_a_loss_on_masked_patches():
    model = tiny_fcmae()
    imgs = torch.randn(2, 3, 128, 96)
    loss, pred, mask = model(imgs)
    assert pred.shape == (2, 32 * 32 * 3, 4, 3)
    assert mask.shape == (2, 12) and mask.dtype == torch.float32
    assert mask.sum(1).tolist() == [12 - int(12 * 0.4)] * 2
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_random_mask_matches_the_recipe_and_is_repeatable():
    model = tiny_fcmae()
    first = model.random_mask(8, 224, 224, torch.Generator().manual_seed(3))
    again = model.random_mask(8, 224, 224, torch.Generator().manual_seed(3))
    other = model.random_mask(8, 224, 224, torch.Generator().manual_seed(4))
    assert first.shape == (8, 49)
    assert (first.sum(1) == 30).all()  # 19 of 49 kept at ratio 0.6
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({tuple(row.tolist()) for row in first}) == 8  # chosen per sample


def test_loss_counts_masked_patches_only():
    model = tiny_fcmae()
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    pred = torch.randn(2, 3072, 2, 2)
    loss = model.forward_loss(imgs, pred, mask)
    changed = pred.clone()
    changed[0, :, 0, 1] += 5  # patch 1 of sample 0 is visible
    assert model.forward_loss(imgs, changed, mask) == loss
    changed[0, :, 0, 0] += 5  # patch 0 is masked
    assert model.forward_loss(imgs, changed, mask) > loss


def test_norm_pix_loss_standardises_each_target_patch():
    imgs = torch.randn(1, 3, 32, 32) * 7 + 3
    mask = torch.ones(1, 1)
    target = fcmae.create_model("fcmae_convnextv2_atto").patchify(imgs)
    standardised = ((target - target.mean()) / (target.var() + 1e-6) ** 0.5).view(1, 3072, 1, 1)
    raw = target.view(1, 3072, 1, 1)
    assert tiny_fcmae().forward_loss(imgs, standardised, mask) < 1e-8
    assert tiny_fcmae(norm_pix_loss=False).forward_loss(imgs, raw, mask) == 0


def test_a_given_mask_is_used_as_is():
    model = tiny_fcmae()
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[True, False, False, True], [False, True, True, True]])
    _, _, used = model(imgs, mask=mask)
    assert torch.equal(used, mask.float())


@pytest.mark.parametrize(
    "kwargs,pred_channels",
    [
        (dict(patch_size=64), 64 * 64 * 3),
        (dict(in_chans=1), 32 * 32 * 1),
        (dict(decoder_depth=2, decoder_dim=64), 32 * 32 * 3),
    ],
)
def test_patch_size_channels_and_decoder_shape(kwargs, pred_channels):
    model = tiny_fcmae(**kwargs)
    imgs = torch.randn(2, kwargs.get("in_chans", 3), 128, 128)
    loss, pred, mask = model(imgs)
    p = kwargs.get("patch_size", 32)
    assert pred.shape == (2, pred_channels, 128 // p, 128 // p)
    assert mask.shape == (2, (128 // p) ** 2)
    assert len(model.decoder) == kwargs.get("decoder_depth", 1)


def test_large_patches_predict_each_patch_as_a_whole():
    model = tiny_fcmae(patch_size=64, norm_pix_loss=False)
    imgs = torch.randn(1, 3, 128, 128)
    _, pred, mask = model(imgs, mask=torch.tensor([[1.0, 0, 0, 0]]))
    # pred, read back as an image, must hold the target's layout: a perfect
    # reconstruction of patch 0 gives zero loss.
    perfect = pred.detach().clone()
    perfect[:, :, 0, 0] = model.patchify(imgs)[:, 0]
    assert model.forward_loss(imgs, perfect, mask) == 0


def test_backends_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    dense = randomize_(tiny_fcmae(backend="dense"), seed=2, scale=0.1)
    sparse = tiny_fcmae(backend="sparse")
    sparse.load_state_dict(dense.state_dict())
    imgs = torch.randn(3, 3, 96, 96)
    mask = dense.random_mask(3, 96, 96, torch.Generator().manual_seed(0))
    for model in (dense, sparse):
        model(imgs, mask=mask)[0].backward()
    grads = dict(dense.named_parameters())
    for name, param in sparse.named_parameters():
        assert_close_to_scale(param.grad, grads[name].grad, name=name)


def test_encoder_state_dict_is_the_backbone_of_a_classifier():
    model = tiny_fcmae()
    classifier = fcmae.create_model("convnextv2_atto", num_classes=5)
    missing, unexpected = classifier.load_state_dict(model.encoder.state_dict(), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert unexpected == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(patch_size=48), "not a multiple of 32"),
        (dict(mask_ratio=1.0), r"outside \(0, 1\)"),
        (dict(mask_ratio=0), r"outside \(0, 1\)"),
        (dict(backend="minkowsky"), "choose one of sparse, dense"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ModelError, match=message):
        tiny_fcmae(**kwargs)


@pytest.mark.parametrize(
    "imgs,mask,message",
    [
        (torch.randn(2, 3, 80, 64), None, "not a multiple of the patch size"),
        (torch.randn(2, 1, 64, 64), None, "set in_chans"),
        (torch.randn(2, 3, 64, 64), torch.zeros(2, 2, 2), r"need \(2, 4\)"),
        (torch.randn(2, 3, 64, 64), torch.full((2, 4), 0.5), "only 0/1"),
        (torch.randn(2, 3, 64, 64), torch.zeros(2, 4), "hides no patch"),
    ],
)
def test_bad_inputs_are_refused(imgs, mask, message):
    with pytest.raises(ModelError, match=message):
        tiny_fcmae()(imgs, mask=mask)
