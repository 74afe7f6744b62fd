"""The ConvNeXt V2 core: sizes, registry, and parity with timm's independent implementation."""

import pytest
import timm
import torch
from helpers import randomize_

import fcmae
from fcmae.models import SIZES, ModelError
from fcmae.weights.timm_names import from_timm, to_timm

# Millions of parameters with a 1000-class head, per size: the official README's model table,
# here to two decimals (timm's convnextv2_* models count the same).
PARAMS_M = {
    "atto": 3.71,
    "femto": 5.23,
    "pico": 9.07,
    "nano": 15.62,
    "tiny": 28.64,
    "base": 88.72,
    "large": 197.96,
    "huge": 660.29,
}


@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_has_the_published_parameter_count(size):
    with torch.device("meta"):
        model = fcmae.create_model(f"convnextv2_{size}")
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(PARAMS_M[size], abs=0.006)


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(ModelError, match="convnextv2_atto.*fcmae_convnextv2_tiny"):
        fcmae.create_model("convnextv2_small")


@pytest.mark.parametrize("size,image", [("atto", 64), ("tiny", 64), ("nano", 96)])
def test_same_logits_as_timm_and_round_trip(size, image):
    reference = timm.create_model(f"convnextv2_{size}", num_classes=10).eval()
    randomize_(reference, seed=1, scale=0.05)
    ours = fcmae.create_model(f"convnextv2_{size}", num_classes=10).eval()
    ours.load_state_dict(from_timm(reference.state_dict()))
    x = torch.randn(2, 3, image, image)
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert (got - expected).abs().max() < 1e-4
    assert got.abs().max() > 1e-3  # a meaningful comparison, not two zeros

    back = to_timm(ours.state_dict())
    original = reference.state_dict()
    assert back.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(back[key], value), key


def test_any_in_chans_num_classes_and_stage_outputs():
    model = fcmae.create_model("convnextv2_atto", in_chans=1, num_classes=7).eval()
    x = torch.randn(3, 1, 96, 64)
    assert model(x).shape == (3, 7)
    stages = model.forward_stages(x)
    assert [tuple(s.shape) for s in stages] == [
        (3, 40, 24, 16),
        (3, 80, 12, 8),
        (3, 160, 6, 4),
        (3, 320, 3, 2),
    ]
    assert torch.equal(stages[-1], model.forward_features(x))


def test_head_init_scale_and_drop_path():
    model = fcmae.create_model("convnextv2_atto", head_init_scale=0.001, drop_path_rate=0.1)
    assert model.head.weight.std() < 0.02 * 0.01
    rates = [
        block.drop_path.drop_prob
        for stage in model.stages
        for block in stage
        if hasattr(block.drop_path, "drop_prob")
    ]
    assert len(rates) == sum(model.depths) - 1  # the first block gets rate 0
    assert rates[-1] == pytest.approx(0.1)
    model.train()
    x = torch.randn(4, 3, 64, 64)
    assert not torch.equal(
        model.forward_features(x), model.forward_features(x)
    )  # stochastic depth is live


def test_bare_encoder_has_the_official_pt_only_keys():
    encoder = fcmae.create_model("convnextv2_atto", head=False)
    keys = set(encoder.state_dict())
    assert not any(k.startswith(("norm.", "head.")) for k in keys)
    assert {
        "downsample_layers.0.0.weight",
        "downsample_layers.0.1.weight",
        "downsample_layers.1.0.weight",
        "downsample_layers.1.1.weight",
        "stages.0.0.dwconv.weight",
        "stages.0.0.pwconv1.weight",
        "stages.0.0.grn.gamma",
        "stages.3.1.pwconv2.bias",
    } <= keys
    assert encoder.state_dict()["stages.0.0.grn.gamma"].shape == (1, 1, 1, 160)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(encoder(x), encoder.forward_features(x))
