"""Weights by Hub name (timm/convnextv2_*), read from a Hugging Face cache built here: nothing
is downloaded (tests/conftest.py sets HF_HUB_OFFLINE=1)."""

from types import SimpleNamespace

import huggingface_hub
import pytest
import timm
import torch
from helpers import randomize_, write_image_folder
from safetensors.torch import save_file

import fcmae
from fcmae.cli import main
from fcmae.errors import UserError
from fcmae.weights.hub import hub_name
from fcmae.weights.layouts import load_into, read_weights

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline: HF_HOME's hub/ as huggingface_hub reads it (its constants
    are read from the environment once, at import, hence the patch)."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_weights(cache, repo, state, filename="model.safetensors"):
    """Put a state dict where huggingface_hub keeps repo's files: refs/main names the
    revision, snapshots/REVISION/ holds the files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(REVISION)
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"architecture": "convnextv2_atto"}')
    if filename.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, snapshot / filename)
    else:
        torch.save(state, snapshot / filename)


def timm_atto(num_classes=1000):
    return randomize_(
        timm.create_model("convnextv2_atto", pretrained=False, num_classes=num_classes),
        seed=1,
        scale=0.05,
    ).eval()


@pytest.mark.parametrize("prefix", ["", "hf-hub:"])
def test_a_cached_timm_release_loads_by_name_with_timms_outputs(hub_cache, prefix):
    reference = timm_atto()
    cache_weights(hub_cache, "timm/convnextv2_atto.fcmae_ft_in1k", reference.state_dict())
    model = fcmae.create_model("convnextv2_atto", num_classes=1000).eval()
    assert load_into(model, f"{prefix}timm/convnextv2_atto.fcmae_ft_in1k") == ([], [])
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-5, atol=1e-5)


def test_an_encoder_release_as_pytorch_model_bin_fills_an_fcmae_encoder(hub_cache):
    reference = timm_atto(num_classes=0)  # timm's .fcmae releases carry no classifier
    cache_weights(
        hub_cache, "timm/convnextv2_atto.fcmae", reference.state_dict(), "pytorch_model.bin"
    )
    weights = read_weights("timm/convnextv2_atto.fcmae", "--pretrained")
    assert (weights.source, weights.model, weights.num_classes) == (
        "timm/convnextv2_atto.fcmae",
        "convnextv2_atto",
        None,
    )
    model = fcmae.create_model("fcmae_convnextv2_atto")
    load_into(model, weights)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model.encoder.forward_features(images)
        torch.testing.assert_close(ours, reference.forward_features(images), rtol=1e-5, atol=1e-5)


def test_a_local_path_wins_over_a_hub_name(hub_cache, tmp_path, monkeypatch):
    local = fcmae.create_model("convnextv2_femto")
    (tmp_path / "timm").mkdir()
    torch.save({"model": local.state_dict()}, tmp_path / "timm" / "convnextv2_atto.fcmae")
    monkeypatch.chdir(tmp_path)
    assert hub_name("timm/convnextv2_atto.fcmae") is None
    assert read_weights("timm/convnextv2_atto.fcmae").model == "convnextv2_femto"


@pytest.mark.parametrize(
    "source, repo",
    [
        ("timm/convnextv2_tiny.fcmae", "timm/convnextv2_tiny.fcmae"),
        ("hf-hub:me/convnextv2_atto.mine", "me/convnextv2_atto.mine"),
        ("runs/encoder-0010.pth", None),
        ("/data/timm/convnextv2_tiny.fcmae", None),
        ("./convnextv2_tiny.fcmae", None),
    ],
)
def test_what_counts_as_a_hub_name(source, repo):
    assert hub_name(source) == repo


@pytest.mark.parametrize(
    "name, says",
    [
        ("timm/convnextv2_atto.fcmae", ["not cached", "HF_HUB_OFFLINE=1 prevents the download"]),
        ("timm/convnextv2_atto.bogus", ["not one of timm's", "timm/convnextv2_atto.fcmae_ft_in1k"]),
        ("timm/convnextv2_giant.fcmae", ["not one of timm's", "timm.list_pretrained"]),
        ("timm/resnet50.a1_in1k", ["nor a ConvNeXt V2 release", "checkpoint path"]),
    ],
)
def test_a_name_that_cannot_be_read_says_why_in_one_sentence(hub_cache, name, says):
    with pytest.raises(UserError) as refusal:
        read_weights(name, "--pretrained")
    message = str(refusal.value)
    assert all(part in message for part in says), message
    assert "\n" not in message and message.endswith("."), message


def test_a_repository_the_hub_does_not_know_is_named(hub_cache, monkeypatch):
    from huggingface_hub.utils import RepositoryNotFoundError

    def not_found(repo, filename):
        response = SimpleNamespace(headers={}, request=None, status_code=404)
        raise RepositoryNotFoundError(f"{repo} not found", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(UserError, match="does not exist on the Hugging Face Hub"):
        read_weights("someone/convnextv2_atto.missing")


def test_the_cli_refuses_a_name_not_in_the_cache_before_making_a_run(hub_cache, tmp_path, capsys):
    for split in ("train", "val"):
        write_image_folder(tmp_path / "data" / split, classes=2, per_class=1, size=32)
    args = ["finetune", "--data", str(tmp_path / "data"), "--output-dir", str(tmp_path / "out")]
    assert main([*args, "--pretrained", "timm/convnextv2_atto.fcmae"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "is not cached" in err and "HF_HUB_OFFLINE=1 prevents the download" in err, err
    assert not (tmp_path / "out").exists()
