"""Shared test helpers."""

import re
import socket

import torch
import torch.nn.functional as F
from torch import nn

import fcmae


def randomize_(module, seed=0, scale=0.2):
    """Give every parameter random values, so GRN, LayerNorm affine and biases
    are all exercised (a fresh GRN is the identity). LayerNorm weights stay near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for submodule in module.modules():
            for name, param in submodule.named_parameters(recurse=False):
                noise = scale * torch.randn(param.shape, generator=generator)
                centre = 1.0 if isinstance(submodule, nn.LayerNorm) and name == "weight" else 0.0
                param.copy_(centre + noise)
    return module


def random_patch_mask(n, h, w, ratio=0.6, seed=0):
    """(N, h, w) bool, True = masked, with exactly int(h*w*(1-ratio)) visible per sample."""
    generator = torch.Generator().manual_seed(seed)
    keep = int(h * w * (1 - ratio))
    ranks = torch.rand(n, h * w, generator=generator).argsort(1).argsort(1)
    return (ranks >= keep).view(n, h, w)


def assert_close_to_scale(actual, expected, tol=5e-6, name=""):
    """max |actual - expected| <= tol * max |expected|: fp32 agreement relative to the
    tensor's own scale (element-wise relative error is meaningless near zero)."""
    scale = expected.abs().max()
    error = (actual - expected).abs().max()
    assert error <= tol * scale, f"{name}: max error {error:.3g} vs scale {scale:.3g}"


def write_image_folder(root, classes=3, per_class=8, size=40, seed=0):
    """An ImageFolder of PNGs at root/class<i>/: class i is the image whose colour channel
    i % 3 is bright, under pixel noise, so that a few steps of training can separate them."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.full(3, 60) + 140 * (np.arange(3) == c % 3)
            pixels = base + rng.integers(-50, 50, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def option_helps(help_text):
    """{flag: its whole help, whitespace normalised} from argparse's --help output."""
    helps, current = {}, None
    for line in help_text.splitlines():
        match = re.match(r"  (--[\w-]+)", line)
        if match:
            current = match[1]
            helps[current] = line
        elif current and line.startswith("   "):
            helps[current] += " " + line
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in helps.items()}


def encoder(seed=0, **kwargs):
    """A ConvNeXt V2-Atto encoder with every parameter random (see randomize_)."""
    return randomize_(
        fcmae.create_model("convnextv2_atto", head=False, **kwargs), seed=seed, scale=0.1
    )


def features_and_grads(model, x, mask, backend):
    """The encoder's output, and the gradient of every parameter for a fixed output weighting."""
    model.zero_grad()
    out = model.forward_features(x, mask, backend)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def uneven_mask():
    """Per-sample visible counts 1, 16 (all), 7 and 0 on a 4x4 patch grid."""
    mask = torch.ones(4, 4, 4, dtype=torch.bool)
    mask[0, 2, 1] = False
    mask[1] = False
    mask[2].view(-1)[torch.tensor([0, 3, 5, 6, 9, 12, 15])] = False
    return mask


def grn_by_hand(block, x, visible):
    """One block with GRN statistics taken per sample over its visible sites,
    written out site by site. x (N, H, W, C), visible (N, H, W) bool."""
    y = F.conv2d(
        (x * visible[..., None]).permute(0, 3, 1, 2),
        block.dwconv.weight,
        block.dwconv.bias,
        padding=3,
        groups=x.shape[-1],
    ).permute(0, 2, 3, 1)
    y = F.gelu(block.pwconv1(block.norm(y)))
    out = []
    for sample, keep in zip(y, visible):
        sites = sample[keep]  # (K, 4C)
        norm = sites.pow(2).sum(0).sqrt()
        scaled = norm / (norm.mean() + 1e-6)
        sites = block.grn.gamma.flatten() * sites * scaled + block.grn.beta.flatten() + sites
        out.append(block.pwconv2(sites))
    return x[visible] + torch.cat(out)


def free_port() -> int:
    """A local TCP port nothing listens on (once this returns)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
