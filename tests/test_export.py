"""Export to timm's layout, read back by timm itself."""

import json

import pytest
import timm
import torch
import yaml
from helpers import assert_close_to_scale, randomize_
from safetensors.torch import load_file

import fcmae
from fcmae.cli import main
from fcmae.finetune import hub_folder
from fcmae.finetune.config import ExportConfig
from fcmae.finetune.export import run as export
from fcmae.run.logs import close_logging, setup_logging


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


def _finetune_run(root, classes=("cat", "dog", "emu")):
    """A fine-tuning run directory as fcmae writes one, its model random: RUN/config.yaml,
    identity.yaml, metrics.jsonl and checkpoints/checkpoint-0002.pth with the extra state."""
    model = randomize_(fcmae.create_model("convnextv2_atto", num_classes=len(classes)), scale=0.05)
    settings = {"model": "convnextv2_atto", "data": "/data/pets", "epochs": 2, "input_size": 64}
    settings |= {"crop_pct": 0.9, "effective_batch": 32, "pretrained": None}
    (root / "checkpoints").mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(settings))
    (root / "identity.yaml").write_text(yaml.safe_dump({"command": "fcmae finetune"}))
    epoch = {"type": "epoch", "epoch": 2, "step": 8, "loss": 1.1, "val_acc1": 50.0}
    (root / "metrics.jsonl").write_text(json.dumps(epoch | {"best_acc1": 66.7}) + "\n")
    extra = {"evaluator": {"acc1": 66.7, "epoch": 1, "weights": "EMA"}}
    extra["classes"] = {"names": list(classes)}
    checkpoint = {"model": model.state_dict(), "epoch": 2, "step": 8, "config": settings}
    torch.save(checkpoint | {"extra": extra}, root / "checkpoints" / "checkpoint-0002.pth")
    return model.eval(), root / "checkpoints" / "checkpoint-0002.pth"


def export_hub(source, folder):
    return export(ExportConfig(checkpoint=str(source), hub_dir=str(folder)))


def test_a_hub_folder_loads_in_timm_by_itself_and_gives_our_logits(tmp_path):
    model, checkpoint = _finetune_run(tmp_path / "run")
    assert export_hub(checkpoint, tmp_path / "hub") == "convnextv2_atto"
    assert sorted(p.name for p in (tmp_path / "hub").iterdir()) == sorted(hub_folder.FILES)
    theirs = timm.create_model(f"local-dir:{tmp_path / 'hub'}", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    assert_close_to_scale(theirs(x), model(x), tol=1e-5, name="logits")
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["num_classes"] == 3 and config["label_names"] == ["cat", "dog", "emu"]
    data = timm.data.resolve_data_config({}, model=theirs)
    assert tuple(data["input_size"]) == (3, 64, 64) and data["crop_pct"] == 0.9
    assert data["interpolation"] == "bicubic" and tuple(data["mean"]) == (0.485, 0.456, 0.406)
    card = (tmp_path / "hub" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "timm" and front["license"] == "other"
    for said in ("66.70 (EMA weights, epoch 1)", "`/data/pets`", "2 of 2 epochs", "256 images"):
        assert said in card
    assert "fcmae finetune" in card and "licence of these weights is their owner's" in card


def test_an_encoder_hub_folder_loads_without_a_head(tmp_path):
    pretrained = randomize_(fcmae.create_model("fcmae_convnextv2_atto", in_chans=1), scale=0.05)
    torch.save({"model": pretrained.state_dict()}, tmp_path / "fcmae.pth")
    export_hub(tmp_path / "fcmae.pth", tmp_path / "hub")
    x = torch.randn(2, 1, 64, 64)
    expected = pretrained.encoder.forward_features(x)
    for arguments in ({}, {"num_classes": 0}):
        backbone = timm.create_model(
            f"local-dir:{tmp_path / 'hub'}", pretrained=True, **arguments
        ).eval()
        assert backbone.num_classes == 0 and backbone.stem[0].in_channels == 1
        assert_close_to_scale(backbone.forward_features(x), expected, tol=1e-5)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "num_classes=0" in card and "No scores were recorded" in card
    assert "set `license:` above to the licence of their source" in card


def test_hub_dir_and_output_are_alternatives_and_no_grn_is_refused(tmp_path):
    both = ExportConfig(checkpoint="c.pth", output="o.pth", hub_dir="hub")
    with pytest.raises(fcmae.UserError, match="alternatives; pass one"):
        both.validate()
    with pytest.raises(fcmae.UserError, match="--output or --hub-dir is required"):
        export(ExportConfig(checkpoint="c.pth"))
    model = fcmae.create_model("convnextv2_atto", num_classes=10, grn=False)
    torch.save({"model": model.state_dict()}, tmp_path / "v1.pth")
    with pytest.raises(fcmae.UserError, match="without GRN"):
        export_hub(tmp_path / "v1.pth", tmp_path / "hub")
    assert not (tmp_path / "hub").exists()


def test_a_file_already_at_output_is_replaced_only_with_overwrite(tmp_path, capsys):
    model = fcmae.create_model("convnextv2_atto", num_classes=10)
    torch.save({"model": model.state_dict()}, tmp_path / "ours.pth")
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"the user's own file")
    argv = ["export", "--checkpoint", str(tmp_path / "ours.pth"), "--output", str(mine)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == (
        f"fcmae: error: --output would replace {mine.resolve()}, which already exists and was "
        f"not written by fcmae; pass --overwrite to replace it, or another --output.\n"
    )
    assert mine.read_bytes() == b"the user's own file"
    assert main([*argv, "--overwrite"]) == 0
    assert torch.equal(load_file(mine)["head.fc.weight"], model.head.weight)


def test_a_hub_folder_never_replaces_a_readme_it_did_not_write(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# The project's own README\n")
    model = fcmae.create_model("convnextv2_atto", num_classes=10)
    torch.save({"model": model.state_dict()}, tmp_path / "ours.pth")
    monkeypatch.chdir(project)
    assert main(["export", "--checkpoint", str(tmp_path / "ours.pth"), "--hub-dir", "."]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"fcmae: error: --hub-dir would replace {project.resolve()}/README.md")
    assert "--overwrite" in err and err.count("\n") == 1
    assert [p.name for p in project.iterdir()] == ["README.md"]
    assert (project / "README.md").read_text() == "# The project's own README\n"
