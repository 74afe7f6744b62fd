"""Config layering (defaults < recipe < demo < --config < flags) and validation."""

import pytest

from fcmae.config import PretrainConfig, resolve, write_yaml
from fcmae.errors import ConfigError
from fcmae.models import CLASSIFIERS


def resolve_pretrain(config_file=None, flags=None):
    return resolve(PretrainConfig, config_file, flags)


@pytest.mark.parametrize("model", CLASSIFIERS)
def test_with_data_the_paper_recipe_applies(model):
    cfg = resolve_pretrain(flags={"data": "/data/imagenet", "model": model})
    assert (cfg.epochs, cfg.warmup_epochs, cfg.blr, cfg.weight_decay) == (1600, 40, 1.5e-4, 0.05)
    assert cfg.betas == (0.9, 0.95) and cfg.effective_batch == 4096
    assert (cfg.input_size, cfg.patch_size, cfg.mask_ratio, cfg.norm_pix_loss) == (
        224,
        32,
        0.6,
        True,
    )
    assert cfg.output_dir == f"runs/pretrain/{model}"


def test_without_data_the_demo_settings_apply_but_flags_still_win():
    cfg = resolve_pretrain()
    assert cfg.data is None and cfg.epochs < 100 and cfg.input_size < 224
    assert cfg.output_dir == "runs/demo"
    assert resolve_pretrain(flags={"epochs": 2, "input_size": 64}).epochs == 2


def test_config_file_overrides_recipe_and_flags_override_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: convnextv2_tiny\nepochs: 300\nblr: 1e-4\ndata: /x\n")
    cfg = resolve_pretrain(str(path), {"epochs": 50})
    assert cfg.model == "convnextv2_tiny" and cfg.epochs == 50
    assert cfg.blr == 1e-4  # YAML 1.1 reads "1e-4" as a string; accepted for a float key
    assert cfg.warmup_epochs == 40  # untouched keys keep the recipe


@pytest.mark.parametrize(
    "text, key",
    [
        ("epochz: 3\n", "epochz"),
        ("epochs: ten\n", "epochs"),
        ("epochs: 2.5\n", "epochs"),
        ("compile: 1\n", "compile"),
        ("batch_size: true\n", "batch_size"),
        ("betas: [0.9]\n", "betas"),
        ("model: resnet50\n", "model"),
        ("precision: fp8\n", "precision"),
    ],
)
def test_bad_keys_in_a_file_name_the_key_and_the_file(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        resolve_pretrain(str(path))
    assert repr(key) in str(e.value) and "bad.yaml" in str(e.value)


@pytest.mark.parametrize(
    "flags, key",
    [
        ({"input_size": 100}, "input_size"),
        ({"epochs": 0}, "epochs"),
        ({"warmup_epochs": 50, "epochs": 10}, "warmup_epochs"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"device": "gpu"}, "device"),
        ({"accum_iter": 0}, "accum_iter"),
        ({"lr": -1.0}, "lr"),
        ({"blr": 0.0}, "blr"),
        ({"lr": float("nan")}, "--lr must be a finite number"),
        ({"blr": float("inf")}, "--blr must be a finite number"),
        ({"clip_grad": -1.0}, "clip_grad"),
        ({"seed": -1}, "seed"),
        ({"patch_size": 0}, "patch_size"),
        ({"input_size": 0}, "input_size"),
        ({"input_size": -32}, "input_size"),
        ({"input_size": 64, "mask_ratio": 0.99}, "masks all 4 patches"),
    ],
)
def test_out_of_range_values_name_the_key(flags, key):
    with pytest.raises(ConfigError, match=key):
        resolve_pretrain(flags=flags)


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "does not exist"),
        ("a: [1\n", "not valid YAML"),
        ("- 1\n- 2\n", "mapping"),
    ],
)
def test_unusable_config_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve_pretrain(str(path))


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = resolve_pretrain(flags={"data": "/d", "clip_grad": 1.0, "seed": 3})
    write_yaml(cfg.to_dict(), tmp_path / "config.yaml")
    again = resolve_pretrain(str(tmp_path / "config.yaml"))
    assert again == cfg and isinstance(again, PretrainConfig)
