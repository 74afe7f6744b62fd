"""Checkpoint layouts in (the official sparse one built here as the official
``remap_checkpoint_keys`` undoes it), and the one "build the model this file holds"."""

import argparse
import re

import pytest
import torch
from helpers import randomize_

import fcmae
from fcmae.sites.kernels import from_me_kernel, to_me_kernel
from fcmae.weights.layouts import LAYOUTS, build_model, load_into, read_weights


def official_sparse_layout(model):
    """Our FCMAE state dict written the way the official main_pretrain.py saves it:
    encoder. prefix, MinkowskiEngine kernels (offsets column-major), .ln/.linear
    wrappers, (1, C) biases and GRN; dense stem and decoder."""
    out = {}
    for key, value in model.state_dict().items():
        if not key.startswith("encoder.") or key.startswith("encoder.downsample_layers.0."):
            out[key] = value.clone()
            continue
        name = key
        if ".dwconv." in key or re.match(r"encoder\.downsample_layers\.\d\.1\.", key):
            if key.endswith("weight"):
                name = key[: -len("weight")] + "kernel"
                k = value.shape[-1]
                flat = value.transpose(3, 2).reshape(value.shape[0], value.shape[1], k * k)
                value = flat[:, 0].permute(1, 0) if ".dwconv." in key else flat.permute(2, 1, 0)
            else:
                value = value.view(1, -1)
        elif ".norm." in key or re.match(r"encoder\.downsample_layers\.\d\.0\.", key):
            name = re.sub(r"\.(weight|bias)$", r".ln.\1", key)
        elif ".pwconv" in key:
            name = re.sub(r"\.(weight|bias)$", r".linear.\1", key)
        elif ".grn." in key:
            value = value.view(1, -1)
        out[name] = value.clone()
    return out


@pytest.fixture
def source():
    return randomize_(fcmae.create_model("fcmae_convnextv2_atto"), seed=3, scale=0.05)


def same_output(a, b):
    imgs = torch.randn(2, 3, 64, 64)
    mask = a.random_mask(2, 64, 64, torch.Generator().manual_seed(0))
    return torch.equal(a(imgs, mask=mask)[1], b(imgs, mask=mask)[1])


def test_official_pretraining_checkpoint_loads(source, tmp_path):
    state = official_sparse_layout(source)
    assert state["encoder.stages.0.0.dwconv.kernel"].shape == (49, 40)
    assert state["encoder.downsample_layers.1.1.kernel"].shape == (4, 40, 80)
    assert (
        "encoder.stages.0.0.norm.ln.weight" in state
        and "encoder.stages.0.0.pwconv1.linear.weight" in state
    )
    path = tmp_path / "checkpoint-799.pth"
    torch.save(
        {
            "model": state,
            "optimizer": {},
            "epoch": 799,
            "scaler": {},
            "args": argparse.Namespace(model="convnextv2_atto"),
        },
        path,
    )
    target = fcmae.create_model("fcmae_convnextv2_atto")
    assert load_into(target, path) == ([], [])
    assert same_output(source, target)


def test_pt_only_encoder_loads_into_fcmae_and_classifier(source):
    encoder_only = {"model": source.encoder.state_dict()}
    target = fcmae.create_model("fcmae_convnextv2_atto")
    missing, unexpected = load_into(target, encoder_only)
    assert (
        unexpected == []
        and "mask_token" in missing
        and all(not k.startswith("encoder.") for k in missing)
    )
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(target.encoder.state_dict()[key], value)

    classifier = fcmae.create_model("convnextv2_atto", num_classes=3)
    missing, unexpected = load_into(classifier, official_sparse_layout(source))
    assert (
        sorted(missing) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
        and unexpected == []
    )
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(classifier.forward_features(x), source.encoder.forward_features(x))


def test_unknown_keys_are_reported_by_name(source):
    state = dict(source.state_dict(), **{"encoder.extra.weight": torch.zeros(1)})
    del state["pred.bias"]
    missing, unexpected = load_into(fcmae.create_model("fcmae_convnextv2_atto"), state)
    assert missing == ["pred.bias"] and unexpected == ["encoder.extra.weight"]


def test_a_checkpoint_of_another_size_is_refused_by_name(source):
    with pytest.raises(
        fcmae.UserError, match="checkpoint is convnextv2_atto and the model convnextv2_femto"
    ):
        load_into(fcmae.create_model("fcmae_convnextv2_femto"), source.state_dict())


def test_unreadable_files_are_refused(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(fcmae.UserError, match="cannot be read"):
        load_into(fcmae.create_model("convnextv2_atto"), bad)
    with pytest.raises(fcmae.UserError, match="does not exist"):
        load_into(fcmae.create_model("convnextv2_atto"), tmp_path / "missing.pth")


def test_timm_and_fine_tuned_layouts_load_into_a_classifier(tmp_path):
    import timm
    from safetensors.torch import save_file

    reference = randomize_(
        timm.create_model("convnextv2_atto", num_classes=4), seed=4, scale=0.05
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    expected = reference(x)
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    for path in (tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"):
        model = fcmae.create_model("convnextv2_atto", num_classes=4).eval()
        assert load_into(model, path) == ([], [])
        torch.testing.assert_close(model(x), expected)

    fine_tuned = fcmae.create_model("convnextv2_atto", num_classes=4).eval()
    load_into(fine_tuned, tmp_path / "model.safetensors")
    for key in ("model", "model_ema"):
        model = fcmae.create_model("convnextv2_atto", num_classes=4).eval()
        assert load_into(model, {key: fine_tuned.state_dict(), "epoch": 3}) == ([], [])
        assert torch.equal(model(x), fine_tuned(x))


@pytest.mark.parametrize("in_chans", [1, 4])
def test_timm_weights_of_other_input_channels_load(in_chans):
    import timm

    reference = randomize_(
        timm.create_model("convnextv2_atto", num_classes=4, in_chans=in_chans), seed=5, scale=0.05
    ).eval()
    x = torch.randn(2, in_chans, 64, 64)
    model = fcmae.create_model("convnextv2_atto", num_classes=4, in_chans=in_chans).eval()
    assert load_into(model, reference.state_dict()) == ([], [])
    torch.testing.assert_close(model(x), reference(x))
    features = fcmae.create_model("convnextv2_atto", features_only=True, in_chans=in_chans)
    missing, unused = load_into(features, reference.state_dict())
    assert missing == [] and {key.split(".")[0] for key in unused} == {"norm", "head"}
    _, maps = model.forward_intermediates(x, indices=(0, 1, 2, 3))
    for got, want in zip(features(x), maps, strict=True):
        torch.testing.assert_close(got, want)


def test_another_class_count_leaves_a_fresh_head(source):
    classifier = randomize_(fcmae.create_model("convnextv2_atto", num_classes=10))
    model = fcmae.create_model("convnextv2_atto", num_classes=3)
    fresh_head = model.head.weight.clone()
    missing, unexpected = load_into(model, classifier.state_dict())
    assert missing == ["head.weight", "head.bias"] and unexpected == []
    assert torch.equal(model.head.weight, fresh_head)
    assert torch.equal(model.norm.weight, classifier.norm.weight)


def test_an_unrelated_state_dict_is_refused():
    with pytest.raises(fcmae.UserError, match="holds no ConvNeXt V2 or FCMAE weights"):
        load_into(fcmae.create_model("convnextv2_atto"), {"fc.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("shape,depthwise", [((5, 1, 7, 7), True), ((6, 5, 2, 2), False)])
def test_minkowski_kernels_convert_both_ways(shape, depthwise):
    weight = torch.randn(shape)
    kernel = to_me_kernel(weight, depthwise)
    k = shape[-1]
    assert kernel.shape == ((k * k, 5) if depthwise else (k * k, 5, 6))
    dy, dx = 1, 0  # offset (dy, dx) is kernel row dx * k + dy: column-major
    assert torch.equal(
        kernel[dx * k + dy], weight[:, 0, dy, dx] if depthwise else weight[..., dy, dx].T
    )
    assert torch.equal(from_me_kernel(kernel), weight)


def test_the_layout_table_names_the_layout_each_file_is_read_as(source):
    import timm

    official = read_weights({"model": official_sparse_layout(source)})
    timm_state = timm.create_model("convnextv2_atto", num_classes=0).state_dict()
    assert official.layout == "official sparse pretraining"
    assert read_weights(timm_state).layout == "timm"
    assert read_weights(source.state_dict()).layout == "dense"
    assert LAYOUTS[-1].detect({}) and [layout.name for layout in LAYOUTS][-1] == "dense"


def test_a_checkpoints_plain_entries_are_kept_without_its_tensors(source):
    weights = read_weights(
        {
            "model": source.state_dict(),
            "epoch": 3,
            "extra": {"classes": {"names": ["a", "b"]}, "ema": {"w": torch.zeros(2)}},
            "config": {"mask_ratio": 0.5},
        }
    )
    assert weights.metadata["epoch"] == 3 and "model" not in weights.metadata
    assert weights.metadata["extra"] == {"classes": {"names": ["a", "b"]}, "ema": {}}
    assert weights.settings == {"mask_ratio": 0.5}


def pretraining_checkpoint(model, **settings):
    return read_weights({"model": model.state_dict(), "config": settings})


def test_build_model_gives_the_fcmae_a_checkpoint_was_trained_as():
    trained = randomize_(
        fcmae.create_model(
            "fcmae_convnextv2_atto",
            patch_size=64,
            mask_ratio=0.75,
            norm_pix_loss=False,
            decoder_depth=2,
            decoder_dim=64,
            backend="dense",
        ),
        seed=2,
        scale=0.05,
    )
    weights = pretraining_checkpoint(
        trained, patch_size=64, mask_ratio=0.75, norm_pix_loss=False, backend="dense"
    )
    model = build_model(weights, "fcmae")
    assert (model.patch_size, model.mask_ratio, model.norm_pix_loss, model.backend) == (
        64,
        0.75,
        False,
        "dense",
    )
    assert len(model.decoder) == 2 and model.mask_token.shape[1] == 64
    assert same_output(trained, model)
    assert build_model(weights, "fcmae", mask_ratio=0.5, backend=None).mask_ratio == 0.5


def test_build_model_falls_back_to_the_fcmaes_defaults_without_settings(source):
    model = build_model(read_weights(source.state_dict()), "fcmae")
    reference = fcmae.create_model("fcmae_convnextv2_atto")
    assert (model.patch_size, model.mask_ratio, model.norm_pix_loss, model.backend) == (
        reference.patch_size,
        reference.mask_ratio,
        reference.norm_pix_loss,
        reference.backend,
    )


def test_build_model_gives_the_encoder_and_the_classifier(source):
    encoder = build_model(read_weights(official_sparse_layout(source)), "encoder")
    x = torch.randn(1, 3, 64, 64)
    assert not hasattr(encoder, "head")
    assert torch.equal(encoder.forward_features(x), source.encoder.forward_features(x))
    classifier = randomize_(fcmae.create_model("convnextv2_atto", num_classes=5, in_chans=1))
    built = build_model(read_weights(classifier.state_dict()), "classifier").eval()
    x = torch.randn(1, 1, 64, 64)
    assert torch.equal(built(x), classifier.eval()(x))


def test_build_model_refuses_what_the_file_does_not_hold(source):
    encoder_only = read_weights({"model": source.encoder.state_dict()})
    with pytest.raises(fcmae.UserError, match="holds no decoder"):
        build_model(encoder_only, "fcmae")
    with pytest.raises(fcmae.UserError, match="has no classifier head"):
        build_model(encoder_only, "classifier")
    with pytest.raises(ValueError, match="unknown kind"):
        build_model(encoder_only, "detector")
