"""A checkpoint of C input channels in a network of N (fcmae.weights.channels: exact in both
directions), and pretraining's --init (fcmae.weights.init) from every layout read_weights reads."""

import argparse
import logging

import pytest
import torch
from helpers import randomize_
from test_weights import official_sparse_layout

import fcmae
from fcmae.run.checkpointer import Checkpoints, TrainState
from fcmae.run.manifest import Manifest
from fcmae.train.distributed import DistInfo
from fcmae.weights.channels import STEM, adapt_stem, channel_map
from fcmae.weights.init import init_fcmae
from fcmae.weights.layouts import adapt_weights, check_fits, load_into, read_weights

ATTO = "convnextv2_atto"


def repeated(image, channels):
    """image with channel k = image's channel k mod its channel count, for k < channels."""
    return image[:, [k % image.shape[1] for k in range(channels)]]


def snapshot(state):
    return {k: v.clone() for k, v in state.items()}


def one_sentence(error):
    text = str(error.value)
    return "\n" not in text and text.endswith(".") and ". " not in text


@pytest.fixture(scope="module")
def encoder3():
    return randomize_(fcmae.create_model(ATTO, head=False), seed=7, scale=0.05).eval()


@pytest.mark.parametrize("in_chans", [1, 2, 5, 6])
def test_the_adapted_stem_gives_the_original_networks_features(encoder3, in_chans):
    weights = read_weights(encoder3.state_dict())
    before = snapshot(weights.network)
    adapted = adapt_weights(weights, in_chans)
    model = fcmae.create_model(ATTO, in_chans=in_chans, head=False).eval()
    assert load_into(model, adapted) == ([], [])
    small = torch.randn(2, min(in_chans, 3), 64, 64)
    big = repeated(small, max(in_chans, 3))
    ours, theirs = (small, big) if in_chans < 3 else (big, small)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(ours), encoder3.forward_features(theirs), rtol=1e-4, atol=1e-4
        )
    assert adapted.in_chans == in_chans and adapted.network[STEM].shape[1] == in_chans
    assert weights.in_chans == 3 and weights.network.keys() == before.keys()
    assert all(torch.equal(weights.network[k], v) for k, v in before.items())
    assert torch.equal(
        adapted.network["downsample_layers.0.0.bias"], before["downsample_layers.0.0.bias"]
    )


def test_the_rule_is_timms_where_timms_is_exact_and_folds_otherwise():
    from timm.models._manipulate import adapt_input_conv

    weight = torch.randn(8, 3, 4, 4)
    for in_chans in (1, 6):
        torch.testing.assert_close(adapt_stem(weight, in_chans), adapt_input_conv(in_chans, weight))
    six = torch.randn(8, 6, 4, 4)
    torch.testing.assert_close(
        adapt_stem(six, 2), torch.stack([six[:, 0::2].sum(1), six[:, 1::2].sum(1)], 1)
    )
    assert torch.equal(channel_map(5, 3).sum(dim=0), torch.ones(3, dtype=torch.float64))
    assert torch.equal(channel_map(3, 3), torch.eye(3, dtype=torch.float64))
    assert adapt_stem(weight.half(), 5).dtype == torch.float16


def test_load_into_a_classifier_of_other_channels_adapts_and_says_how(caplog):
    source = randomize_(fcmae.create_model(ATTO, num_classes=4), seed=2, scale=0.05).eval()
    model = fcmae.create_model(ATTO, num_classes=4, in_chans=1).eval()
    with caplog.at_level(logging.INFO, logger="fcmae"):
        assert load_into(model, source.state_dict()) == ([], [])
    assert "3 -> 1 channels: stem kernels summed" in caplog.text
    assert f"adapted {STEM} (40, 3, 4, 4) -> (40, 1, 4, 4)" in caplog.text
    gray = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(gray), source(repeated(gray, 3)), rtol=1e-4, atol=1e-4)

    weights = read_weights(source.state_dict(), "--pretrained")
    with pytest.raises(fcmae.UserError, match="takes 3-channel images but --in-chans is 1") as e:
        check_fits(weights, ATTO, 1, True)
    assert one_sentence(e)
    check_fits(weights, ATTO, 1, True, adapt=True)
    with pytest.raises(fcmae.UserError, match="pass --model convnextv2_atto"):
        check_fits(weights, "convnextv2_femto", 1, True, adapt=True)
    with pytest.raises(fcmae.UserError, match="pass --grn"):
        check_fits(weights, ATTO, 1, False, adapt=True)


@pytest.fixture(scope="module")
def fcmae3():
    return randomize_(fcmae.create_model(f"fcmae_{ATTO}"), seed=3, scale=0.05)


def fresh_fcmae(**kwargs):
    model = fcmae.create_model(f"fcmae_{ATTO}", **kwargs)
    return model, snapshot(model.state_dict())


def assert_loaded(model, path, fresh, decoder_from_file):
    """Every encoder tensor is the file's (in fcmae's names); the decoder the file's exactly
    when it holds one, else the model's own fresh one."""
    weights = read_weights(path)
    state = model.state_dict()
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, weights.network[key]), key
    for key in (k for k in state if not k.startswith("encoder.")):
        want = weights.rest[key] if decoder_from_file else fresh[key]
        assert torch.equal(state[key], want), key


def test_init_from_the_official_pt_only_and_main_pretrain_files(fcmae3, tmp_path, caplog):
    pt_only = tmp_path / "convnextv2_atto_1k_224_fcmae.pt"
    torch.save({"model": fcmae3.encoder.state_dict()}, pt_only)
    main_pretrain = tmp_path / "checkpoint-799.pth"
    args = argparse.Namespace(model=ATTO, decoder_depth=1, decoder_embed_dim=512)
    torch.save({"model": official_sparse_layout(fcmae3), "epoch": 799, "args": args}, main_pretrain)
    for path, has_decoder in ((pt_only, False), (main_pretrain, True)):
        model, fresh = fresh_fcmae()
        with caplog.at_level(logging.INFO, logger="fcmae"):
            init_fcmae(model, str(path))
        assert_loaded(model, path, fresh, has_decoder)
        said = "decoder from the file" if has_decoder else "decoder freshly initialised"
        assert f"--init {path}: encoder from the file ({ATTO}, 3 channels); {said}" in caplog.text
        for key, value in fcmae3.encoder.state_dict().items():
            assert torch.equal(model.encoder.state_dict()[key], value)


def test_init_from_a_timm_state_dict_leaves_the_decoder_fresh(tmp_path):
    import timm
    from safetensors.torch import save_file

    reference = randomize_(timm.create_model(ATTO, num_classes=0), seed=4, scale=0.05)
    path = tmp_path / "model.safetensors"
    save_file(reference.state_dict(), path)
    model, fresh = fresh_fcmae()
    init_fcmae(model, str(path))
    assert read_weights(path).layout == "timm"
    assert_loaded(model, path, fresh, decoder_from_file=False)
    assert torch.equal(model.encoder.downsample_layers[0][0].weight, reference.stem[0].weight)


def pretraining_run(model, root):
    """A real checkpoint of a pretraining run of model: (checkpoint-0001.pth, encoder-0001.pth)."""
    (root / "checkpoints").mkdir(parents=True)
    run = Checkpoints(root / "checkpoints", Manifest(root), DistInfo(), {"model": ATTO}, 1, seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    state = TrainState(model, optimizer, torch.amp.GradScaler(enabled=False), 1, epoch=1)
    # the encoder export as fcmae.pretrain.job.export_encoder writes it (that module is not
    # imported here: it pulls in the data pipeline)
    path = run.save(state, {"encoder": lambda m: {"model": m.encoder.state_dict()}})
    return path, run.file(1, "encoder")


def test_init_from_fcmaes_own_files_into_five_channels(fcmae3, tmp_path, caplog):
    checkpoint, encoder = pretraining_run(fcmae3, tmp_path / "run")
    model, fresh = fresh_fcmae()
    init_fcmae(model, str(checkpoint))
    assert_loaded(model, checkpoint, fresh, decoder_from_file=True)
    model, fresh = fresh_fcmae()
    init_fcmae(model, str(encoder))
    assert_loaded(model, encoder, fresh, decoder_from_file=False)

    model, fresh = fresh_fcmae(in_chans=5)
    with caplog.at_level(logging.INFO, logger="fcmae"):
        init_fcmae(model, str(checkpoint))
    file = read_weights(checkpoint)
    state = model.state_dict()
    assert torch.equal(state[f"encoder.{STEM}"], adapt_stem(file.network[STEM], 5))
    for key in ("pred.weight", "pred.bias"):
        assert torch.equal(state[key], fresh[key]) and state[key].shape != file.rest[key].shape
    for key, value in {**{f"encoder.{k}": v for k, v in file.network.items()}, **file.rest}.items():
        if key not in (f"encoder.{STEM}", "pred.weight", "pred.bias"):
            assert torch.equal(state[key], value), key
    assert "3 -> 5 channels: stem kernels repeated cyclically" in caplog.text
    assert "re-initialised: pred.weight, pred.bias" in caplog.text
    assert "stem adapted to 5); decoder from the file but its last layer" in caplog.text
    mask = model.random_mask(2, 64, 64, torch.Generator().manual_seed(0))
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_encoder(repeated(image, 5), mask),
            fcmae3.forward_encoder(image, mask),
            rtol=1e-4,
            atol=1e-4,
        )


def refused(model, source):
    before = snapshot(model.state_dict())
    with pytest.raises(fcmae.UserError) as e:
        init_fcmae(model, str(source))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing loaded
    assert one_sentence(e), str(e.value)
    return str(e.value)


def test_init_refuses_what_does_not_fit_in_one_sentence(fcmae3, tmp_path):
    path = tmp_path / "atto.pth"
    torch.save({"model": fcmae3.state_dict()}, path)
    femto = fcmae.create_model("fcmae_convnextv2_femto")
    assert refused(femto, path).endswith(
        "is a convnextv2_atto checkpoint but --model is convnextv2_femto; pass --model "
        "convnextv2_atto."
    )
    v1 = tmp_path / "v1.pth"
    torch.save(fcmae.create_model(f"fcmae_{ATTO}", grn=False).state_dict(), v1)
    assert refused(fcmae.create_model(f"fcmae_{ATTO}"), v1).endswith("; pass --no-grn.")
    narrow = tmp_path / "narrow.pth"
    torch.save(fcmae.create_model(f"fcmae_{ATTO}", decoder_dim=64).state_dict(), narrow)
    assert refused(fcmae.create_model(f"fcmae_{ATTO}"), narrow) == (
        f"--init {narrow} holds a decoder of depth 1 and width 64 but the model's has depth 1 "
        f"and width 512; pass --decoder-depth 1 --decoder-dim 64."
    )
    partial = {
        k: v for k, v in fcmae3.state_dict().items() if not k.startswith("encoder.stages.3.1.grn")
    }
    torch.save(partial, tmp_path / "partial.pth")
    assert refused(fcmae.create_model(f"fcmae_{ATTO}"), tmp_path / "partial.pth").endswith(
        "lacks encoder tensors the model needs (stages.3.1.grn.gamma, stages.3.1.grn.beta); "
        "pass a whole ConvNeXt V2 encoder or FCMAE checkpoint."
    )
    torch.save({"a": 1}, tmp_path / "dict.pth")
    assert refused(fcmae.create_model(f"fcmae_{ATTO}"), tmp_path / "dict.pth") == (
        f"{tmp_path / 'dict.pth'} (from --init) holds no ConvNeXt V2 or FCMAE weights of a "
        f"known size; pass an fcmae, official or timm ConvNeXt V2 checkpoint."
    )
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert "notes.txt cannot be read" in refused(
        fcmae.create_model(f"fcmae_{ATTO}"), tmp_path / "notes.txt"
    )
