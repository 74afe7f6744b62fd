"""Which parameters take weight decay, by name, against independent statements of the official
rules: pretraining's timm add_weight_decay (timm's own implementation of it) and fine-tuning's
optim_factory rule (1-D, biases, names ending in .gamma or .beta)."""

import pytest
from timm.optim import param_groups_weight_decay

import fcmae
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.train.optim import param_groups


def split(model, groups):
    """(decayed names, exempt names) of AdamW groups."""
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | exempt == set(names.values()) and not decayed & exempt
    return decayed, exempt


@pytest.mark.parametrize("grn", [True, False])
def test_pretraining_decays_what_the_official_pretraining_decays(grn):
    model = fcmae.create_model("fcmae_convnextv2_atto", grn=grn)
    cfg = resolve(PretrainConfig, flags={"data": "DIR"})
    assert cfg.decay_grn  # the recipe's default: the official groups
    ours = split(model, param_groups(model, 0.05, skip_declared=not cfg.decay_grn))
    assert ours == split(model, param_groups_weight_decay(model, 0.05))  # timm's, no skip list
    decayed, _ = ours
    assert "mask_token" in decayed
    assert ("encoder.stages.0.0.grn.gamma" in decayed) == grn


def test_no_decay_grn_exempts_grn_and_the_mask_token_as_fine_tuning_does():
    model = fcmae.create_model("fcmae_convnextv2_atto")
    decayed, exempt = split(model, param_groups(model, 0.05, skip_declared=True))
    expected_exempt = {
        name
        for name, p in model.named_parameters()
        if p.ndim == 1 or name.endswith((".bias", ".gamma", ".beta")) or name == "mask_token"
    }
    assert exempt == expected_exempt
    assert {"encoder.stages.2.5.grn.beta", "decoder.0.grn.gamma", "mask_token"} <= exempt


def test_the_engines_default_groups_follow_the_fine_tuning_rule():
    model = fcmae.create_model("convnextv2_atto", num_classes=10)
    _, exempt = split(model, param_groups(model, 0.05))
    official = {
        name
        for name, p in model.named_parameters()
        if p.ndim == 1 or name.endswith((".bias", ".gamma", ".beta"))
    }
    assert exempt == official
