"""configs/: the recipes as YAML, generated and checked in; and help that needs no torch."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fcmae.cli import COMMANDS
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.finetune.config import FinetuneConfig
from fcmae.models import CLASSIFIERS

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


@pytest.fixture(scope="module")
def writer():
    """scripts/write_configs.py as a module."""
    path = ROOT / "scripts" / "write_configs.py"
    spec = importlib.util.spec_from_file_location("write_configs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_files_are_what_the_recipes_resolve_to(writer):
    stale = writer.differing(ROOT)
    assert not stale, f"{[str(p) for p in stale]} differ: run python scripts/write_configs.py"


def test_check_lists_a_file_that_differs_or_is_missing(writer, tmp_path, capsys):
    assert writer.main([], root=tmp_path) == 0
    assert writer.main(["--check"], root=tmp_path) == 0
    edited = tmp_path / "configs/pretrain/convnextv2_tiny.yaml"
    edited.write_text(edited.read_text().replace("epochs: 1600", "epochs: 800"))
    (tmp_path / "configs/finetune/convnextv2_huge.yaml").unlink()
    capsys.readouterr()
    assert writer.main(["--check"], root=tmp_path) == 1
    out = capsys.readouterr().out
    assert "convnextv2_tiny.yaml" in out and "convnextv2_huge.yaml" in out
    assert out.count("\n") == 2


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("model", CLASSIFIERS)
def test_a_recipe_file_is_the_same_run_as_its_model_flag(stage, model):
    cls = STAGES[stage]
    from_file = resolve(cls, str(ROOT / f"configs/{stage}/{model}.yaml"), {"data": "X"})
    assert from_file == resolve(cls, None, {"model": model, "data": "X"})


# One process: every command's help and printed config, and after each, whether torch came in.
HELP_WITHOUT_TORCH = """
import contextlib, io, json, sys
from fcmae.cli import main

imported = {}
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit:
            pass
    imported[" ".join(argv)] = "torch" in sys.modules
print(json.dumps(imported))
"""


def test_help_and_print_config_import_no_torch():
    argvs = [["--help"]] + [[name, "--help"] for name in COMMANDS]
    argvs += [[name, *(["RUN"] if name == "plot" else []), "--print-config"] for name in COMMANDS]
    argvs += [["pretrain", "--data", "DIR", "--backend", "minkowski", "--print-config"]]
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH, json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout)
    assert len(imported) == len(argvs)
    assert not any(imported.values()), [argv for argv, came in imported.items() if came]
