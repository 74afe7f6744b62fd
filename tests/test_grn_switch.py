"""grn=False: the blocks of ConvNeXt V1 (no GRN, layer scale 1e-6), for the paper's ablation."""

import pytest
import torch
from helpers import (
    assert_close_to_scale,
    encoder,
    features_and_grads,
    random_patch_mask,
    write_image_folder,
)

import fcmae
from fcmae.cli import main
from fcmae.errors import ConfigError, UserError
from fcmae.experiments.sweep import parse_set
from fcmae.models.convnextv2 import Block
from fcmae.sites.grid import GridSites
from fcmae.weights.layouts import load_into, read_weights


def test_without_grn_the_blocks_hold_v1_layer_scale_and_no_grn():
    model = fcmae.create_model("fcmae_convnextv2_atto", grn=False)
    names = dict(model.named_parameters())
    assert not any("grn" in name for name in names)
    scale = names["encoder.stages.0.0.gamma"]
    assert scale.shape == (40,) and torch.all(scale == 1e-6)
    assert names["decoder.0.gamma"].shape == (512,)
    with_grn = fcmae.create_model("fcmae_convnextv2_atto")
    assert "encoder.stages.0.0.grn.gamma" in dict(with_grn.named_parameters())
    assert not hasattr(with_grn.encoder.stages[0][0], "gamma")


def test_a_v1_block_with_unit_layer_scale_is_a_v2_block_whose_grn_is_fresh():
    # A fresh GRN (gamma = beta = 0) is the identity, and a layer scale of 1 is too: the two
    # blocks then compute the same function of the same weights.
    torch.manual_seed(0)
    v2, v1 = Block(16), Block(16, grn=False)
    state = {k: v for k, v in v2.state_dict().items() if ".grn." not in f".{k}"}
    v1.load_state_dict({**state, "gamma": torch.ones(16)})
    x = torch.randn(2, 5, 5, 16)
    assert_close_to_scale(v1(x, GridSites()), v2(x, GridSites()))


@pytest.mark.parametrize("grn", [True, False])
def test_sparse_and_dense_backends_agree_without_grn(grn):
    model = encoder(grn=grn)
    mask = random_patch_mask(3, 4, 4, seed=5)
    x = torch.randn(3, 3, 128, 128)
    dense_out, dense_grads = features_and_grads(model, x, mask, "dense")
    sparse_out, sparse_grads = features_and_grads(model, x, mask, "sparse")
    assert_close_to_scale(sparse_out, dense_out)
    for name, grad in dense_grads.items():
        assert grad.abs().max() > 0, name
        assert_close_to_scale(sparse_grads[name], grad, name=name)


def test_fcmae_without_grn_trains_one_step():
    model = fcmae.create_model("fcmae_convnextv2_atto", grn=False)
    loss, pred, mask = model(torch.randn(2, 3, 64, 64))
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.stages[3][1].gamma.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def no_grn_run(tmp_path_factory):
    """One epoch of --no-grn pretraining on a few images: (images, run directory)."""
    images = tmp_path_factory.mktemp("images")
    write_image_folder(images / "train", classes=2, per_class=4, size=64)
    write_image_folder(images / "val", classes=2, per_class=2, size=64, seed=1)
    out = tmp_path_factory.mktemp("no_grn")
    args = ["--data", str(images / "train"), "--output-dir", str(out), "--input-size", "64"]
    args += ["--batch-size", "4", "--effective-batch", "none", "--epochs", "1"]
    args += ["--warmup-epochs", "0", "--device", "cpu", "--num-workers", "0", "--no-grn"]
    assert main(["pretrain", *args, "--recon-every", "0"]) == 0
    return images, out


def test_a_no_grn_run_records_the_switch_and_its_encoder_has_no_grn(no_grn_run):
    _, out = no_grn_run
    assert "grn: false" in (out / "config.yaml").read_text()
    weights = read_weights(out / "checkpoints" / "encoder-0001.pth")
    assert not weights.grn and "stages.0.0.gamma" in weights.network


def test_fine_tuning_a_no_grn_encoder_needs_no_grn(no_grn_run, tmp_path, capsys):
    images, out = no_grn_run
    args = ["finetune", "--pretrained", str(out / "checkpoints" / "encoder-0001.pth")]
    args += ["--data", str(images), "--input-size", "64", "--batch-size", "4", "--epochs", "1"]
    args += ["--effective-batch", "none", "--device", "cpu", "--num-workers", "0"]
    args += ["--output-dir", str(tmp_path / "ft")]
    assert main(args) == 1
    assert "without GRN (layer scale instead)" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()  # refused before the run directory is made
    assert main([*args, "--no-grn"]) == 0
    encoder = str(out / "checkpoints" / "encoder-0001.pth")
    assert main(["export", "--checkpoint", encoder, "--output", str(tmp_path / "x.pth")]) == 1
    assert "timm's convnextv2 models cannot hold" in capsys.readouterr().err


def test_a_grn_encoder_into_a_no_grn_model_is_refused_by_name():
    encoder = fcmae.create_model("convnextv2_atto", head=False)
    with pytest.raises(UserError, match=r"with GRN but the model is built without GRN .*--grn"):
        load_into(
            fcmae.create_model("convnextv2_atto", head=False, grn=False), encoder.state_dict()
        )


def test_a_sweep_over_grn_says_which_values_it_takes():
    with pytest.raises(ConfigError, match="must be true or false, got 'maybe'"):
        parse_set("grn=true,maybe")
    assert parse_set("grn=true,false") == ("grn", [True, False])
