"""Every registered model keeps the same contract, as timm tests its registry: forward,
backward, forward_features, the stage outputs, and the sparse backend equal to the dense one.

Shapes and gradients of every size run on the meta device (no memory, no compute); values,
and sparse against dense, on the sizes small enough for a CPU test."""

import pytest
import torch
from helpers import assert_close_to_scale, random_patch_mask, randomize_

import fcmae
from fcmae.models import AUTOENCODERS, CLASSIFIERS, SIZES

SMALL = [f"convnextv2_{size}" for size in ("atto", "femto", "pico", "nano")]


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_shapes_and_gradients(name):
    dims = SIZES[name.removeprefix("convnextv2_")][1]
    with torch.device("meta"):
        model = fcmae.create_model(name, num_classes=5, in_chans=1)
        x = torch.empty(2, 1, 64, 96)
    stages = model.forward_stages(x)
    expected = [(2, dims[i], 16 >> i, 24 >> i) for i in range(4)]
    assert [tuple(s.shape) for s in stages] == expected
    features = model.forward_features(x)
    assert tuple(features.shape) == expected[-1]
    assert tuple(model.forward_head(features, pre_logits=True).shape) == (2, dims[-1])
    logits = model(x)
    assert tuple(logits.shape) == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_autoencoder_shapes_and_gradients(name):
    with torch.device("meta"):
        model = fcmae.create_model(name, backend="dense")
        imgs = torch.empty(2, 3, 64, 96)
    loss, pred, mask = model(imgs)
    assert loss.shape == () and tuple(pred.shape) == (2, 32 * 32 * 3, 2, 3)
    assert tuple(mask.shape) == (2, 6)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", SMALL)
def test_sparse_equals_dense_in_outputs_and_gradients(name):
    model = randomize_(fcmae.create_model(name, head=False), seed=2, scale=0.05)
    x = torch.randn(2, 3, 64, 96)
    mask = random_patch_mask(2, 2, 3, ratio=0.5, seed=1)
    outputs, grads = {}, {}
    for backend in ("dense", "sparse"):
        model.zero_grad()
        out = model.forward_features(x, mask, backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs[backend] = out.detach()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert outputs["sparse"].abs().max() > 0
    assert_close_to_scale(outputs["sparse"], outputs["dense"], name="features")
    for key, grad in grads["dense"].items():
        assert_close_to_scale(grads["sparse"][key], grad, tol=1e-5, name=key)
