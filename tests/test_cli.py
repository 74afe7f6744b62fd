"""The command line: help, flag parsing, errors as one sentence."""

import dataclasses
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import option_helps

from fcmae.cli import COMMANDS, main
from fcmae.config.commands import PretrainConfig

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_cli(*args, exe=(sys.executable, "-m", "fcmae")):
    return subprocess.run([*exe, *args], capture_output=True, text=True, env=ENV, timeout=120)


def test_fcmae_help_and_python_m_fcmae_are_the_same():
    via_module = run_cli("--help")
    assert via_module.returncode == 0 and "pretrain" in via_module.stdout
    assert via_module.stdout.startswith("usage: fcmae ")
    script = Path(sys.executable).with_name("fcmae")
    if not script.exists():
        pytest.skip("the fcmae console script is not installed (pip install -e .)")
    assert run_cli("--help", exe=(str(script),)).stdout == via_module.stdout


def test_pretrain_help_lists_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())  # undo argparse's line wrapping
    helps = option_helps(out)
    for f in dataclasses.fields(PretrainConfig):
        flag = f"--{f.name.replace('_', '-')}"
        assert "default: " in helps[flag], flag  # shown, or stated by the help itself
    assert "training epochs (default: 30; with --data: 1600)" in text
    assert "--config FILE" in text and "torchrun" in text


def test_flags_reach_the_resolved_config(capsys):
    assert (
        main(
            [
                "pretrain",
                "--print-config",
                "--data",
                "/d",
                "--betas",
                "0.9",
                "0.99",
                "--clip-grad",
                "none",
                "--no-norm-pix-loss",
                "--accum-iter",
                "2",
                "--precision",
                "bf16",
            ]
        )
        == 0
    )
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["betas"] == [0.9, 0.99] and cfg["clip_grad"] is None
    assert cfg["norm_pix_loss"] is False and cfg["accum_iter"] == 2
    assert cfg["precision"] == "bf16" and cfg["epochs"] == 1600


def test_a_config_file_then_flags(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("model: convnextv2_tiny\nepochs: 300\nwarmup_epochs: 10\n")
    assert main(["pretrain", "--config", str(path), "--epochs", "20", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["model"], cfg["epochs"], cfg["warmup_epochs"]) == ("convnextv2_tiny", 20, 10)


def test_a_bad_flag_value_names_the_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--epochs", "ten"])
    assert e.value.code == 2 and "--epochs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "{cfg}"], "Unknown key 'learning_rate'"),
        (["--data", "{tmp}/nowhere"], "does not exist"),
        (["--input-size", "100"], "multiple of patch_size"),
    ],
)
def test_user_errors_are_one_line_without_traceback(tmp_path, capsys, args, message):
    (tmp_path / "c.yaml").write_text("learning_rate: 0.1\n")
    args = [a.format(cfg=tmp_path / "c.yaml", tmp=tmp_path) for a in args]
    assert main(["pretrain", "--output-dir", str(tmp_path / "run"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith("fcmae: error: ") and err.count("\n") == 1


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "pretrain" in capsys.readouterr().out


def test_a_job_logs_to_the_console_set_up_once_by_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "talking_job.py").write_text(
        "import logging\n\ndef run(cfg):\n    logging.getLogger('fcmae').info('job says hi')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    plot = dataclasses.replace(COMMANDS["plot"], job="talking_job:run")
    monkeypatch.setitem(COMMANDS, "plot", plot)
    assert main(["plot", str(tmp_path)]) == 0
    assert "job says hi" in capsys.readouterr().out
    assert not [h for h in logging.getLogger("fcmae").handlers if getattr(h, "_fcmae", False)]
