"""Config layering (defaults < recipe < demo < --config < flags) and validation."""

import dataclasses
import os
from pathlib import Path

import pytest
from helpers import option_helps

from fcmae.cli import COMMANDS, main
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.config.yaml_io import write_yaml
from fcmae.errors import ConfigError
from fcmae.finetune.config import FinetuneConfig, LinprobeConfig
from fcmae.models import CLASSIFIERS, ModelError
from fcmae.models.masking import check_masking


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
    assert cfg.output_dir == os.path.realpath(f"runs/pretrain/{model}")


def test_without_data_the_demo_settings_apply_but_flags_still_win():
    cfg = resolve_pretrain()
    assert cfg.data is None and cfg.epochs < 100 and cfg.input_size < 224
    assert cfg.output_dir == os.path.realpath("runs/demo")
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


@pytest.mark.parametrize(
    "input_size, patch_size, mask_ratio, expected",
    [(224, 32, 0.6, (30, 49)), (64, 32, 0.6, (3, 4)), (192, 64, 0.75, (7, 9))],
)
def test_check_masking_counts_the_masked_patches(input_size, patch_size, mask_ratio, expected):
    assert check_masking(input_size, patch_size, mask_ratio) == expected


@pytest.mark.parametrize(
    "args, message",
    [
        ((224, 48, 0.6), "patch_size must be a multiple of 32"),
        ((200, 32, 0.6), "input_size must be a multiple of patch_size=32, got 200."),
        ((224, 32, 0.0), "mask_ratio must lie in (0, 1), got 0.0."),
        ((64, 32, 0.9), "mask_ratio 0.9 masks all 4 patches"),
    ],
)
def test_check_masking_refuses_in_one_sentence(args, message):
    with pytest.raises(ModelError) as e:
        check_masking(*args)
    assert message in str(e.value) and str(e.value).endswith((".", "..."))


def _outside(f):
    """A value just outside the declared range of field f, of the field's type."""
    within = f.metadata["within"]
    value = within.low - 1 if within.low_closed else within.low
    return (value, value) if "tuple" in str(f.type) else value


RANGED = [
    (name, f)
    for name, command in COMMANDS.items()
    for f in dataclasses.fields(command.config)
    if f.metadata.get("within")
]


@pytest.mark.parametrize("name, f", RANGED, ids=[f"{n} {f.name}" for n, f in RANGED])
def test_every_declared_range_is_checked_with_a_sentence_naming_the_key(name, f):
    cls = COMMANDS[name].config
    flags = {"data": "X"} if "data" in {g.name for g in dataclasses.fields(cls)} else {}
    with pytest.raises(ConfigError, match=rf"^{f.name} must .*, got .*\.$"):
        resolve(cls, None, {**flags, f.name: _outside(f)})


def test_no_recipe_repeats_a_dataclass_default():
    """Recipes are the only place their numbers live: a key a recipe sets has no default, or
    one that the recipe changes."""
    layers = [(PretrainConfig, {}), (PretrainConfig, {"data": "X"}), (LinprobeConfig, {})]
    layers += [(FinetuneConfig, {"model": m}) for m in CLASSIFIERS]
    for cls, chosen in layers:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for layer, values in cls.recipe(chosen):
            for key, value in values.items():
                assert fields[key].default != value, f"{layer} repeats {cls.__name__}.{key}"


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_a_recipe_file_prints_back_with_its_numbers_as_written(capsys, stage):
    """warmup_epochs: 40 stays 40 through --config and --print-config (a float key reads it as
    40.0), and so does a flag's 40."""
    path = Path(__file__).resolve().parents[1] / f"configs/{stage}/convnextv2_tiny.yaml"
    argv = [stage, "--config", str(path), "--data", "DIR", "--print-config"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    written = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert "warmup_epochs: 40" in written
    assert [line for line in written if line not in printed] == []
    assert main([*argv, "--warmup-epochs", "40"]) == 0
    assert "warmup_epochs: 40" in capsys.readouterr().out.splitlines()


def test_each_commands_weight_decay_help_says_what_that_command_decays(capsys):
    helps = {}
    for name in ("pretrain", "finetune", "linprobe", "sweep"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        helps[name] = option_helps(capsys.readouterr().out)["--weight-decay"]
    pretraining = "but 1-D tensors (norms) and biases: GRN's gamma and beta and the mask token"
    assert f"{pretraining} too, unless --no-decay-grn" in helps["pretrain"]
    assert helps["sweep"] == helps["pretrain"]  # the sweep pretrains
    assert "but 1-D tensors (norms), biases and GRN's gamma and beta" in helps["finetune"]
    assert "on the head's Linear weight alone" in helps["linprobe"]
