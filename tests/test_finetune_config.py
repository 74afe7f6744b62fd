"""The fine-tuning recipes (the paper's per-size settings) and the commands' help."""

import dataclasses
import os

import pytest
from helpers import option_helps

from fcmae.cli import COMMANDS, main
from fcmae.config.schema import resolve
from fcmae.errors import ConfigError
from fcmae.finetune.config import FinetuneConfig, LinprobeConfig

# The paper's fine-tuning settings (its appendix; the official TRAINING.md for atto, tiny and
# base), typed in again: base lr, epochs, warmup, layer decay, mode, weight decay, drop path,
# mixup, cutmix, smoothing.
PAPER_TABLE = {
    "atto": (2e-4, 600, 0, 0.9, "single", 0.3, 0.1, 0, 0, 0.2),
    "femto": (2e-4, 600, 0, 0.9, "single", 0.05, 0, 0.3, 0.3, 0.2),
    "pico": (2e-4, 600, 0, 0.9, "single", 0.3, 0, 0.3, 0.3, 0.2),
    "nano": (2e-4, 600, 0, 0.9, "single", 0.3, 0.1, 0.5, 0.5, 0.2),
    "tiny": (8e-4, 300, 40, 0.9, "single", 0.05, 0.2, 0.8, 1.0, 0.1),
    "base": (6.25e-4, 100, 20, 0.6, "group", 0.05, 0.1, 0.8, 1.0, 0.1),
    "large": (6.25e-4, 100, 20, 0.6, "group", 0.05, 0.2, 0.8, 1.0, 0.1),
    "huge": (1.25e-3, 50, 10, 0.75, "group", 0.05, 0.3, 0.8, 1.0, 0.1),
}


@pytest.mark.parametrize("size", PAPER_TABLE)
def test_each_size_resolves_to_the_paper_recipe(size):
    cfg = resolve(FinetuneConfig, flags={"model": f"convnextv2_{size}"})
    assert (
        cfg.blr,
        cfg.epochs,
        cfg.warmup_epochs,
        cfg.layer_decay,
        cfg.layer_decay_mode,
        cfg.weight_decay,
        cfg.drop_path,
        cfg.mixup,
        cfg.cutmix,
        cfg.smoothing,
    ) == PAPER_TABLE[size]
    assert cfg.effective_batch == 1024 and cfg.betas == (0.9, 0.999)
    assert (cfg.head_init_scale, cfg.model_ema, cfg.model_ema_decay) == (0.001, True, 0.9999)
    assert (cfg.auto_augment, cfg.reprob) == ("rand-m9-mstd0.5-inc1", 0.25)
    assert (cfg.input_size, cfg.crop_pct) == (224, 0.875)
    assert cfg.output_dir == os.path.realpath(f"runs/finetune/convnextv2_{size}")


def test_printed_config_is_a_config_file_that_resolves_to_the_same(tmp_path, capsys):
    assert main(["finetune", "--model", "convnextv2_base", "--print-config"]) == 0
    path = tmp_path / "base.yaml"
    path.write_text(capsys.readouterr().out)
    assert resolve(FinetuneConfig, str(path)) == resolve(
        FinetuneConfig, flags={"model": "convnextv2_base"}
    )


def test_file_then_flags_override_the_recipe(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: convnextv2_base\nepochs: 30\nlayer_decay: 0.7\n")
    cfg = resolve(FinetuneConfig, str(path), {"epochs": 5, "warmup_epochs": 1, "mixup": 0.0})
    assert (cfg.model, cfg.epochs, cfg.layer_decay, cfg.mixup) == ("convnextv2_base", 5, 0.7, 0.0)
    assert cfg.layer_decay_mode == "group" and cfg.cutmix == 1.0  # untouched: the recipe


@pytest.mark.parametrize(
    "flags, key",
    [
        ({"layer_decay": 0.0}, "layer_decay"),
        ({"model": "convnextv2_tiny", "batch_size": 7}, "batch_size"),  # mixup pairs images
        ({"smoothing": 1.0}, "smoothing"),
        ({"auto_augment": "v0"}, "auto_augment"),
        ({"input_size": 16}, "input_size"),
        ({"crop_pct": 1.5}, "crop_pct"),
    ],
)
def test_out_of_range_values_name_the_key(flags, key):
    with pytest.raises(ConfigError, match=key):
        resolve(FinetuneConfig, flags=flags)


def test_linprobe_defaults_are_maes_protocol_with_adamw():
    cfg = resolve(LinprobeConfig)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.weight_decay) == (90, 10, 0.0)


def _helps(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return option_helps(capsys.readouterr().out)


@pytest.mark.parametrize("command", ["finetune", "eval", "linprobe", "knn", "export"])
def test_help_lists_every_option_with_its_default(command, capsys):
    helps = _helps(command, capsys)
    for f in dataclasses.fields(COMMANDS[command].config):
        flag = f"--{f.name.replace('_', '-')}"
        assert "default: " in helps[flag] or "(required)" in helps[flag], flag


def test_finetune_help_shows_the_recipe_of_every_size(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for size, (blr, epochs, warmup, decay, mode, *_) in PAPER_TABLE.items():
        row = " ".join(
            next(line for line in lines if line.startswith(f"convnextv2_{size} ")).split()
        )
        assert row.startswith(f"convnextv2_{size} {blr:g} {epochs}/{warmup} {decay:g} ({mode})")
    helps = _helps("finetune", capsys)
    assert "(default: 0.0002)" in helps["--blr"] and "(default: 0.9)" in helps["--layer-decay"]


def test_the_recipe_reaches_the_printed_config(capsys):
    assert main(["finetune", "--model", "convnextv2_huge", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "blr: 0.00125" in text and "layer_decay_mode: group" in text
