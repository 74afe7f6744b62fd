"""Layer ids and lr scales of layer-wise decay, as the official fine-tuning code assigns them
(single: one id per block; group: the 12 groups of base and larger)."""

import pytest
import torch

import fcmae
from fcmae.finetune.layer_decay import layer_decay_groups, layer_id

BASE = (3, 3, 27, 3)


@pytest.mark.parametrize(
    "name,expected",
    [
        ("downsample_layers.0.0.weight", 1),
        ("stages.0.0.dwconv.weight", 1),
        ("stages.0.2.grn.gamma", 3),
        ("downsample_layers.1.1.weight", 4),
        ("stages.1.0.norm.bias", 4),
        ("stages.2.26.pwconv2.weight", 33),
        ("downsample_layers.3.0.bias", 34),
        ("stages.3.2.pwconv1.bias", 36),
        ("norm.weight", 37),
        ("head.weight", 37),
    ],
)
def test_single_ids(name, expected):
    assert layer_id(name, BASE, "single") == expected


@pytest.mark.parametrize(
    "name,expected",
    [
        ("downsample_layers.0.1.weight", 0),
        ("stages.0.2.dwconv.weight", 1),
        ("downsample_layers.1.0.weight", 2),
        ("stages.1.1.pwconv1.weight", 2),
        ("downsample_layers.2.1.weight", 3),
        ("stages.2.0.norm.weight", 3),
        ("stages.2.2.norm.weight", 3),
        ("stages.2.3.norm.weight", 4),
        ("stages.2.26.grn.beta", 11),
        ("downsample_layers.3.1.bias", 12),
        ("stages.3.0.dwconv.bias", 12),
        ("norm.bias", 13),
        ("head.bias", 13),
    ],
)
def test_group_ids(name, expected):
    assert layer_id(name, BASE, "group") == expected


def test_groups_scale_lr_and_spare_norms_biases_and_grn_from_weight_decay():
    model = fcmae.create_model("convnextv2_atto", num_classes=10)  # depths 2,2,6,2: L = 12
    groups = layer_decay_groups(model, weight_decay=0.3, decay=0.9, mode="single")
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)
    assert by_param[id(named["head.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["downsample_layers.0.0.weight"])]["lr_scale"] == pytest.approx(0.9**12)
    assert by_param[id(named["stages.3.1.pwconv1.weight"])]["lr_scale"] == pytest.approx(0.9)
    assert by_param[id(named["stages.3.1.pwconv1.weight"])]["weight_decay"] == 0.3
    for name in (
        "stages.1.0.grn.gamma",
        "stages.1.0.pwconv1.bias",
        "norm.weight",
        "stages.0.0.norm.weight",
    ):
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    torch.optim.AdamW(groups)  # valid optimizer groups
