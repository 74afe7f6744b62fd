"""GRN and the Linear after it, with their own backward passes (folded into per-sample weights,
and unfolded), against the paper's formula written plainly here and left to autograd: outputs
and every gradient, on every layout of sites."""

import pytest
import torch
from helpers import assert_close_to_scale, random_patch_mask, randomize_

import fcmae
from fcmae.models.convnextv2 import Block
from fcmae.models.grn import _GRN, GRN, _FoldedGRNLinear
from fcmae.sites.grid import GridSites
from fcmae.sites.packed import PackedSites
from fcmae.sites.rows import channel_norms


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


def random_linear(channels, out_features=5, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(channels, out_features)


PATHS = ["folded", "unfolded"]


def grn_linear(grn, linear, x, sites, path):
    """linear(GRN(x)) by one of the two ways of fcmae.models.grn, whatever GRN.forward would
    choose for this shape."""
    gamma, beta = grn.gamma.flatten(), grn.beta.flatten()
    if path == "folded":
        return _FoldedGRNLinear.apply(x, gamma, beta, linear.weight, linear.bias, sites)
    return linear(_GRN.apply(x, gamma, beta, sites))


def grads(out, inputs, seed=1):
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad((out * weight.to(out.dtype)).sum(), inputs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(2, 5, 7, 8), (3, 4, 4, 16), (1, 1, 3, 5)])
def test_dense_grn_equals_the_formula_with_every_gradient(shape, path):
    torch.manual_seed(sum(shape))
    grn, linear = random_grn(shape[-1]), random_linear(shape[-1])
    x = torch.randn(shape, requires_grad=True)
    ours = grn_linear(grn, linear, x, GridSites(), path)
    expected = linear(reference_grn(x, grn.gamma, grn.beta))
    assert_close_to_scale(ours, expected, tol=1e-6)
    inputs = (x, grn.gamma, grn.beta, linear.weight, linear.bias)
    for name, got, want in zip(
        ("x", "gamma", "beta", "weight", "bias"), grads(ours, inputs), grads(expected, inputs)
    ):
        assert_close_to_scale(got, want, tol=1e-6, name=name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sites", ["grid", "packed"])
def test_masked_grn_equals_the_formula_over_visible_sites(sites, path):
    torch.manual_seed(3)
    mask = random_patch_mask(3, 2, 2, ratio=0.5, seed=2).repeat_interleave(2, 1)
    visible = ~mask.repeat_interleave(2, 2)  # (3, 4, 4)
    visible[1] = False  # a sample with no visible site
    grn, linear = random_grn(6), random_linear(6)
    x = torch.randn(3, 4, 4, 6, requires_grad=True)
    expected = linear(reference_grn(x, grn.gamma, grn.beta, visible))
    if sites == "grid":
        ours = grn_linear(grn, linear, x, GridSites(visible), path)
    else:
        packed = PackedSites(visible)
        features = packed.enter(x.permute(0, 3, 1, 2))
        ours = packed.exit(grn_linear(grn, linear, features, packed, path)).permute(0, 2, 3, 1)
    # Compared where the layout holds features: every site (grid), the visible ones (packed).
    assert_close_to_scale(ours[visible], expected[visible], tol=1e-6)
    weight = torch.randn(expected.shape) * visible[..., None]
    inputs = (x, grn.gamma, grn.beta, linear.weight, linear.bias)
    got = torch.autograd.grad((ours * weight).sum(), inputs)
    want = torch.autograd.grad((expected * weight).sum(), inputs)
    for name, a, b in zip(("x", "gamma", "beta", "weight", "bias"), got, want):
        assert torch.isfinite(a).all(), name
        assert_close_to_scale(a, b, tol=1e-6, name=name)


@pytest.mark.parametrize("path", PATHS)
def test_a_channel_that_is_zero_everywhere_has_finite_gradients(path):
    grn, linear = random_grn(4), random_linear(4)
    x = torch.randn(2, 3, 3, 4)
    x[..., 1] = 0  # the norm is 0 there: where a hand-written backward divides by it
    x.requires_grad_(True)
    inputs = (x, grn.gamma, grn.beta, linear.weight, linear.bias)
    got = grads(grn_linear(grn, linear, x, GridSites(), path), inputs)
    assert all(torch.isfinite(g).all() for g in got)
    want = grads(linear(reference_grn(x, grn.gamma, grn.beta)), inputs)
    for name, a, b in zip(("x", "gamma", "beta", "weight", "bias"), got, want):
        assert_close_to_scale(a, b, tol=1e-6, name=name)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("sites", ["grid", "packed"])
def test_gradcheck_in_float64(sites, path):
    visible = torch.tensor([[[True, False], [True, True]], [[False, True], [False, False]]])
    x = torch.randn(2, 2, 2, 3, dtype=torch.float64)
    if sites == "grid":
        layout, features = GridSites(visible), x
    else:
        layout = PackedSites(visible)
        features = layout.enter(x.permute(0, 3, 1, 2))
    grn, linear = random_grn(3).double(), random_linear(3, out_features=2).double()

    def function(features, gamma, beta, weight, bias):
        grn.gamma, grn.beta = gamma, beta
        linear.weight, linear.bias = weight, bias
        return grn_linear(grn, linear, features, layout, path)

    inputs = (features, grn.gamma, grn.beta, linear.weight, linear.bias)
    inputs = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    del grn.gamma, grn.beta, linear.weight, linear.bias  # plain tensors from here on
    assert torch.autograd.gradcheck(function, inputs)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_features_keep_their_dtype_and_the_norm_is_taken_in_float32(dtype, path):
    grn, linear = random_grn(8).to(dtype), random_linear(8).to(dtype)
    x = torch.randn(2, 6, 6, 8)
    features = x.to(dtype).requires_grad_(True)
    out = grn_linear(grn, linear, features, GridSites(), path)
    assert out.dtype == dtype
    expected = torch.nn.functional.linear(
        reference_grn(x, grn.gamma.float(), grn.beta.float()),
        linear.weight.float(),
        linear.bias.float(),
    )
    assert_close_to_scale(out.float(), expected.detach(), tol=2e-2)
    got = torch.autograd.grad(out.float().sum(), (features, grn.gamma, linear.weight))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in got)


def test_the_folded_way_serves_samples_with_at_least_as_many_rows_as_outputs(monkeypatch):
    grn, linear = random_grn(8), random_linear(8, out_features=9)
    folded = []
    original = _FoldedGRNLinear.apply
    monkeypatch.setattr(_FoldedGRNLinear, "apply", lambda *a: folded.append(1) or original(*a))
    for size, expected in ((3, True), (2, False)):  # 9 rows per sample, then 4
        folded.clear()
        grn(torch.randn(2, size, size, 8), GridSites(), linear)
        assert bool(folded) is expected, size


def plain_grn_forward(self, x, sites, linear):
    """GRN as the formula, through the sites' own statistics, then ``linear``, left to
    autograd."""
    visible = sites.visible_only(x)
    dims = tuple(range(1, x.dim() - 1)) if x.dim() > 2 else None
    if dims is None:  # MinkowskiEngine rows: not used here
        raise AssertionError
    norm = torch.linalg.vector_norm(visible, dim=dims, keepdim=True)
    scaled = norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)
    return linear(self.gamma.flatten() * (x * scaled) + self.beta.flatten() + x)


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
    # Compiled, GRN runs unfolded (fcmae.models.grn) even where eager mode folds it, as here.
    torch._dynamo.reset()
    block = Block(16)
    x = torch.randn(2, 8, 8, 16)
    if sites == "grid":
        layout = GridSites()
    else:
        visible = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.3
        layout = PackedSites(visible)
        x = layout.enter(x.permute(0, 3, 1, 2))
    explained = torch._dynamo.explain(lambda features: block(features, layout))(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 1, 3), (3, 130, 5), (1, 64, 8)])  # rows 1, 2 chunks + 2, 1
def test_the_norm_grn_reads_is_the_l2_norm_over_rows_in_float32(shape, dtype):
    rows = torch.randn(shape).to(dtype)
    norms = channel_norms(rows)
    assert norms.dtype == torch.float32
    expected = torch.linalg.vector_norm(rows.double(), dim=1, keepdim=True)
    assert_close_to_scale(norms.double(), expected, tol=1e-6)
