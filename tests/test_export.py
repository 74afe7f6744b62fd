"""Export to timm's layout, read back by timm itself."""

import pytest
import timm
import torch
from helpers import randomize_

import fcmae
from fcmae.finetune.config import ExportConfig
from fcmae.finetune.export import run as export
from fcmae.runlog import close_logging, setup_logging


def export_timm(source, destination):
    return export(ExportConfig(checkpoint=str(source), output=str(destination)))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_classifier_round_trips_through_timm(tmp_path, suffix):
    model = randomize_(fcmae.create_model("convnextv2_atto", num_classes=1000), scale=0.05).eval()
    torch.save({"model": model.state_dict(), "epoch": 1}, tmp_path / "ours.pth")
    assert export_timm(tmp_path / "ours.pth", tmp_path / f"timm{suffix}") == "convnextv2_atto"
    theirs = timm.create_model(
        "convnextv2_atto",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(tmp_path / f"timm{suffix}")),
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    assert (theirs(x) - model(x)).abs().max() < 1e-4


def test_a_pretrained_encoder_becomes_a_timm_backbone(tmp_path):
    pretrained = randomize_(fcmae.create_model("fcmae_convnextv2_atto"), scale=0.05)
    torch.save({"model": pretrained.state_dict()}, tmp_path / "fcmae.pth")
    export_timm(tmp_path / "fcmae.pth", tmp_path / "encoder.safetensors")
    backbone = timm.create_model(
        "convnextv2_atto",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "encoder.safetensors")),
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    assert (
        backbone.forward_features(x) - pretrained.encoder.forward_features(x)
    ).abs().max() < 1e-4


def test_an_unrelated_file_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(fcmae.UserError, match="no ConvNeXt V2 or FCMAE weights"):
        export_timm(tmp_path / "other.pth", tmp_path / "out.pth")


def test_the_export_says_how_timm_loads_it_and_leaves_no_temporary(tmp_path, capsys):
    model = fcmae.create_model("convnextv2_atto", num_classes=10, in_chans=1)
    torch.save({"model": model.state_dict()}, tmp_path / "ours.pth")
    handlers = setup_logging(None, 0)  # the console logging the CLI sets up
    try:
        export_timm(tmp_path / "ours.pth", tmp_path / "out" / "timm.safetensors")
    finally:
        close_logging(handlers)
    said = capsys.readouterr().out
    assert "a 10-class classifier" in said and "num_classes=10, in_chans=1" in said
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["timm.safetensors"]
