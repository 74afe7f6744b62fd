"""GRN's own backward pass against the paper's formula, written plainly here and left to
autograd: outputs and every gradient, on every layout of sites."""

import pytest
import torch
from helpers import assert_close_to_scale, random_patch_mask, randomize_

import fcmae
from fcmae.models.convnextv2 import Block
from fcmae.models.grn import _GRN, GRN
from fcmae.sites.grid import GridSites
from fcmae.sites.packed import PackedSites


def reference_grn(x, gamma, beta, visible=None):
    """The paper's GRN on x (N, H, W, C), statistics over each sample's visible sites:
    G = ||x||_2 over sites, N = G / (mean over channels of G + 1e-6), out = gamma x N + beta + x."""
    seen = x if visible is None else x * visible[..., None]
    norm = torch.linalg.vector_norm(seen, dim=(1, 2), keepdim=True)  # gradient 0 at 0
    scaled = norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)
    return gamma * (x * scaled) + beta + x


def random_grn(channels, seed=0):
    grn = GRN(channels)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        grn.gamma.copy_(torch.randn(grn.gamma.shape, generator=generator))
        grn.beta.copy_(torch.randn(grn.beta.shape, generator=generator))
    return grn


def grads(out, inputs, seed=1):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * weight.to(out.dtype)).sum(), inputs)


@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (3, 4, 4, 16), (1, 1, 3, 5)])
def test_dense_grn_equals_the_formula_with_every_gradient(shape):
    torch.manual_seed(sum(shape))
    grn = random_grn(shape[-1])
    x = torch.randn(shape, requires_grad=True)
    ours = grn(x, GridSites())
    expected = reference_grn(x, grn.gamma, grn.beta)
    assert_close_to_scale(ours, expected, tol=1e-6)
    inputs = (x, grn.gamma, grn.beta)
    for name, got, want in zip(
        ("x", "gamma", "beta"), grads(ours, inputs), grads(expected, inputs)
    ):
        assert_close_to_scale(got, want, tol=1e-6, name=name)


@pytest.mark.parametrize("sites", ["grid", "packed"])
def test_masked_grn_equals_the_formula_over_visible_sites(sites):
    torch.manual_seed(3)
    mask = random_patch_mask(3, 2, 2, ratio=0.5, seed=2).repeat_interleave(2, 1)
    visible = ~mask.repeat_interleave(2, 2)  # (3, 4, 4)
    visible[1] = False  # a sample with no visible site
    grn = random_grn(6)
    x = torch.randn(3, 4, 4, 6, requires_grad=True)
    expected = reference_grn(x, grn.gamma, grn.beta, visible)
    if sites == "grid":
        ours = grn(x, GridSites(visible))
        keep = visible
    else:
        packed = PackedSites(visible)
        ours = packed.exit(grn(packed.enter(x.permute(0, 3, 1, 2)), packed)).permute(0, 2, 3, 1)
        keep = visible
    # Compared where the layout holds features: every site (grid), the visible ones (packed).
    assert_close_to_scale(ours[keep], expected[keep], tol=1e-6)
    weight = torch.randn(x.shape) * keep[..., None]
    inputs = (x, grn.gamma, grn.beta)
    got = torch.autograd.grad((ours * weight).sum(), inputs)
    want = torch.autograd.grad((expected * weight).sum(), inputs)
    for name, a, b in zip(("x", "gamma", "beta"), got, want):
        assert torch.isfinite(a).all(), name
        assert_close_to_scale(a, b, tol=1e-6, name=name)


def test_a_channel_that_is_zero_everywhere_has_finite_gradients():
    grn = random_grn(4)
    x = torch.randn(2, 3, 3, 4)
    x[..., 1] = 0  # the norm is 0 there: where a hand-written backward divides by it
    x.requires_grad_(True)
    out = grn(x, GridSites())
    gx, gg, gb = grads(out, (x, grn.gamma, grn.beta))
    assert all(torch.isfinite(g).all() for g in (gx, gg, gb))
    want = grads(reference_grn(x, grn.gamma, grn.beta), (x,))[0]
    assert_close_to_scale(gx, want, tol=1e-6)


@pytest.mark.parametrize("sites", ["grid", "packed"])
def test_gradcheck_in_float64(sites):
    visible = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]])
    x = torch.randn(2, 2, 2, 3, dtype=torch.float64)
    if sites == "grid":
        layout, features = GridSites(visible), x
    else:
        layout = PackedSites(visible)
        features = layout.enter(x.permute(0, 3, 1, 2))
    gamma, beta = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (features, gamma, beta))
    assert torch.autograd.gradcheck(lambda *a: _GRN.apply(*a, layout), inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_features_keep_their_dtype_and_the_norm_is_taken_in_float32(dtype):
    grn = random_grn(8)
    x = torch.randn(2, 6, 6, 8)
    features = x.to(dtype).requires_grad_(True)
    out = grn(features, GridSites())
    assert out.dtype == dtype
    assert_close_to_scale(out.float(), reference_grn(x, grn.gamma, grn.beta).detach(), tol=2e-2)
    (gx,) = torch.autograd.grad(out.float().sum(), features)
    assert gx.dtype == dtype and torch.isfinite(gx).all()


def plain_grn_forward(self, x, sites):
    """GRN as the formula, through the sites' own statistics, left to autograd."""
    visible = sites.visible_only(x)
    dims = tuple(range(1, x.dim() - 1)) if x.dim() > 2 else None
    if dims is None:  # MinkowskiEngine rows: not used here
        raise AssertionError
    norm = torch.linalg.vector_norm(visible, dim=dims, keepdim=True)
    scaled = norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)
    return self.gamma.flatten() * (x * scaled) + self.beta.flatten() + x


@pytest.mark.parametrize(
    "backend, dtype, tol",
    # In float64 the two must be the same function. In float32 they round differently: the
    # plain formula itself lies up to 3e-6 (of scale) from the float64 result on this model,
    # so 1e-6 is below what float32 can hold them to; 5e-6 is the backends' agreement.
    [("sparse", torch.float64, 1e-10), ("dense", torch.float64, 1e-10), ("sparse", None, 5e-6)],
)
def test_fcmae_loss_and_gradients_are_those_of_the_plain_formula(backend, dtype, tol, monkeypatch):
    model = randomize_(fcmae.create_model("fcmae_convnextv2_atto", backend=backend), scale=0.1)
    images = torch.randn(2, 3, 64, 64)
    if dtype is not None:
        model, images = model.to(dtype), images.to(dtype)
    mask = torch.tensor([[0.0, 1, 1, 0], [1, 1, 0, 1]])

    def loss_and_grads():
        model.zero_grad()
        loss, _, _ = model(images, mask=mask)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, ours = loss_and_grads()
    monkeypatch.setattr(GRN, "forward", plain_grn_forward)
    plain_loss, plain = loss_and_grads()
    assert_close_to_scale(loss, plain_loss, tol=tol)
    for name, grad in plain.items():
        assert_close_to_scale(ours[name], grad, tol=tol, name=name)


@pytest.mark.parametrize("sites", ["grid", "packed"])
def test_a_block_traces_into_one_graph_for_torch_compile(sites):
    torch._dynamo.reset()
    block = Block(16)
    x = torch.randn(2, 8, 8, 16)
    if sites == "grid":
        layout = GridSites()
    else:
        layout = PackedSites(torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.3)
        x = layout.enter(x.permute(0, 3, 1, 2))
    explained = torch._dynamo.explain(lambda features: block(features, layout))(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
