"""What the fine-tuning stage reads from a classifier checkpoint: head, class names, model."""

import torch
from helpers import randomize_

import fcmae
from fcmae.finetune.classifier import build_classifier, class_names, head_classes
from fcmae.finetune.probe import LinearProbe, is_probe
from fcmae.weights.layouts import read_weights


def probe_checkpoint(classes=3):
    encoder = fcmae.create_model("convnextv2_atto", head=False)
    probe = randomize_(LinearProbe(encoder, classes), seed=1, scale=0.05)
    probe.head[0].running_mean.normal_()
    return probe.eval(), read_weights({"model": probe.state_dict()})


def test_a_linear_probe_is_rebuilt_with_its_head():
    probe, weights = probe_checkpoint()
    assert is_probe(weights) and head_classes(weights) == 3 and weights.num_classes is None
    model = build_classifier(weights).eval()
    assert isinstance(model, LinearProbe)
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(model(x), probe(x))


def test_a_fine_tuned_classifier_is_rebuilt_as_it_is():
    classifier = randomize_(fcmae.create_model("convnextv2_atto", num_classes=4)).eval()
    weights = read_weights({"model": classifier.state_dict()})
    assert not is_probe(weights) and head_classes(weights) == 4
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(build_classifier(weights).eval()(x), classifier(x))


def test_an_encoder_has_no_head():
    encoder = fcmae.create_model("convnextv2_atto", head=False)
    assert head_classes(read_weights(encoder.state_dict())) is None


def test_class_names_come_from_a_training_checkpoint_or_an_export():
    state = fcmae.create_model("convnextv2_atto", num_classes=2).state_dict()
    training = {"model": state, "extra": {"classes": {"names": ["cat", "dog"]}}}
    assert class_names(read_weights(training)) == ["cat", "dog"]
    assert class_names(read_weights({"model": state, "classes": ["a", "b"]})) == ["a", "b"]
    assert class_names(read_weights({"model": state})) is None
