"""timm's feature API on fcmae's models: features_only, forward_intermediates, reset_classifier;
and a pretrained encoder export loading into the features model."""

from types import SimpleNamespace

import pytest
import torch
from helpers import encoder

import fcmae
from fcmae.models import SIZES, ModelError
from fcmae.pretrain.job import encoder_export
from fcmae.weights.layouts import load_into


def test_features_only_gives_the_stage_maps_timm_describes():
    dims = SIZES["tiny"][1]
    with torch.device("meta"):
        model = fcmae.create_model("convnextv2_tiny", features_only=True, out_indices=(0, 1, 2, 3))
        maps = model(torch.empty(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, dims[i], 16 >> i, 24 >> i) for i in range(4)]
    assert model.feature_info.channels() == list(dims)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels(2) == dims[2]


def test_features_of_some_stages_drop_the_stages_after_them():
    with torch.device("meta"):
        model = fcmae.create_model("convnextv2_atto", features_only=True, out_indices=(2, 0))
        maps = model(torch.empty(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 40, 16, 16), (1, 160, 4, 4)]
    assert model.feature_info.channels() == [40, 160]
    assert model.feature_info.reduction() == [4, 16]
    assert len(model.stages) == 3 and model.num_features == 160


def test_pretrained_encoder_export_loads_into_the_features_model(tmp_path):
    pretrain_model = fcmae.create_model("fcmae_convnextv2_atto")
    pretrain_model.encoder.load_state_dict(encoder(seed=3).state_dict())
    export = encoder_export(SimpleNamespace(pixel_stats="imagenet"))
    torch.save(export(pretrain_model), tmp_path / "encoder.pth")
    x = torch.randn(2, 3, 64, 64)
    expected = pretrain_model.encoder.forward_stages(x)

    model = fcmae.create_model("convnextv2_atto", features_only=True)
    assert load_into(model, tmp_path / "encoder.pth") == ([], [])
    for got, want in zip(model(x), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    first_two = fcmae.create_model("convnextv2_atto", features_only=True, out_indices=(0, 1))
    missing, unused = load_into(first_two, tmp_path / "encoder.pth")
    assert not missing and {key.split(".")[1] for key in unused} == {"2", "3"}  # the stage
    for got, want in zip(first_two(x), expected[:2], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_forward_intermediates_takes_indices_as_timm_does():
    model = encoder(seed=1).eval()
    x = torch.randn(2, 3, 64, 64)
    stages = model.forward_stages(x)
    final, maps = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert all(torch.equal(a, b) for a, b in zip(maps, stages, strict=True))
    # an int n: the last n stages; a list: those stages
    assert [m.shape[1] for m in model.forward_intermediates(x, 2, intermediates_only=True)] == [
        160,
        320,
    ]
    final, maps = model.forward_intermediates(x, [1], stop_early=True)
    assert torch.equal(maps[0], stages[1]) and torch.equal(final, stages[1])


@pytest.mark.parametrize("indices", [(4,), (-1,), (), 0, 5])
def test_stage_indices_outside_the_network_are_refused_naming_the_range(indices):
    with torch.device("meta"):
        model = fcmae.create_model("convnextv2_atto", head=False)
        with pytest.raises(ModelError, match=r"from (0 to 3|1 to 4)"):
            model.forward_intermediates(torch.empty(1, 3, 32, 32), indices)
        with pytest.raises(ModelError, match=r"from (0 to 3|1 to 4)"):
            fcmae.create_model("convnextv2_atto", features_only=True, out_indices=indices)


def test_features_only_of_an_autoencoder_names_the_encoder_to_create():
    with pytest.raises(ModelError, match="create convnextv2_atto with features_only=True"):
        fcmae.create_model("fcmae_convnextv2_atto", features_only=True)


def test_reset_classifier_replaces_the_head_as_timm_does():
    model = fcmae.create_model("convnextv2_atto", num_classes=10).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(4)
    assert model(x).shape == (2, 4) and model.head.bias.abs().max() == 0
    model.reset_classifier(0)
    assert torch.equal(model(x), pooled)
    with pytest.raises(ModelError, match="bare encoder"):
        fcmae.create_model("convnextv2_atto", head=False).reset_classifier(4)
