"""scripts/device_report.py in a small form: atto at 64 px, one step, one backend, a failing
cell and a failing command that are recorded, not raised."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.fixture(scope="module")
def report_module():
    spec = importlib.util.spec_from_file_location("device_report", SCRIPTS / "device_report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_report"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def small_plan(module, **changes):
    values = dict(
        device="cpu",
        models=("convnextv2_atto",),
        batch=2,
        size=64,
        warmup=0,
        steps=1,
        precisions=("fp32",),
        backends=("sparse",),
        default_precision="fp32",
        variant_backends=(),
        compile_backends=(),
        compile_channels_last=False,
        data_workers=(0,),
        data_images=4,
        data_seconds=0.3,
        grn_rows=False,
        cell_timeout=120,
        budget_s=400,
    )
    return module.Plan(**{**values, **changes})


def test_a_small_report_records_every_section_and_its_failures(
    report_module, tmp_path, monkeypatch
):
    failing = [sys.executable, "-m", "fcmae", "pretrain", "--model", "convnextv2_bogus"]
    monkeypatch.setattr(
        report_module, "command_lines", lambda plan, tmp: [("fcmae pretrain", failing)]
    )
    plan = small_plan(report_module)
    plan.extra_cells = [report_module._cell(plan, "steps", "convnextv2_bogus")]
    report = report_module.build_report(plan, tmp_path / "out", quick=True)
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert {"version", "device", "plan", "steps", "ratios", "grn", "data", "feeding"} <= set(report)
    assert report["device"]["device"] == "cpu" and report["wall_s"] > 0
    good, bad = report["steps"]
    assert good["status"] == "ok" and good["img_s"] > 0 and good["peak_gib"] >= 0
    assert good["memory"] == "peak resident set growth" and good["backend"] == "sparse"
    assert bad["status"] == "error" and "unknown model 'fcmae_convnextv2_bogus'" in bad["error"]
    (data,) = report["data"]["rows"]
    assert data["workers"] == 0 and data["status"] == "ok" and data["img_s"] > 0
    (command,) = report["commands"]
    assert command["status"] == "error" and "invalid choice" in command["error"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert (
        "## Training steps" in markdown and "| steps | fcmae | atto | sparse | fp32 |" in markdown
    )
    assert "error: unknown model" in markdown and "## Commands" in markdown


def test_what_no_longer_fits_the_budget_is_skipped_not_run(report_module):
    clock = report_module.Clock(budget_s=0)
    plan = small_plan(report_module)
    row = report_module.run_cell(report_module._cell(plan, "steps", "convnextv2_atto"), clock, 60)
    assert row["status"] == "skipped" and "0 s were spent" in row["error"]


def test_the_matrices_hold_what_the_issue_asks(report_module, monkeypatch):
    monkeypatch.setattr(report_module, "_minkowski", lambda: True)
    gpu = report_module.step_cells(report_module.make_plan("cuda", quick=False))
    models = {c["model"] for c in gpu}
    assert models == {"convnextv2_tiny", "convnextv2_base"}
    assert {(c["backend"], c["precision"]) for c in gpu if c["section"] == "steps"} >= {
        ("dense", "fp16"),
        ("sparse", "bf16"),
        ("minkowski", "fp32"),
    }
    assert any(c.get("compile") and c.get("channels_last") for c in gpu)
    assert {c.get("kind", "fcmae") for c in gpu if c["section"] == "grn"} == {"fcmae", "classifier"}
    cpu = report_module.step_cells(report_module.make_plan("cpu", quick=True))
    assert {c["model"] for c in cpu} == {"convnextv2_atto"}
    assert {c["precision"] for c in cpu} == {"fp32"}
    assert [c["backend"] for c in cpu if c.get("compile")] == ["sparse"]


def test_ratios_pair_cells_alike_but_for_the_backend_or_grn(report_module):
    def row(img_s, **keys):
        return {"status": "ok", "model": "m", "precision": "bf16", "backend": "sparse"} | {
            "img_s": img_s,
            "step_s": 1 / img_s,
            "min_step_s": 1 / img_s,
            **keys,
        }

    rows = [
        row(10, backend="dense"),
        row(25),
        row(30, channels_last=True),  # no dense twin: no ratio
        row(20, grn=False),
        row(8, kind="classifier"),
        row(10, kind="classifier", grn=False),
        {"status": "error", "model": "m", "backend": "minkowski", "precision": "bf16"},
    ]
    (ratio,) = report_module.ratios(rows)
    assert ratio["sparse_over_dense"] == 2.5 and "minkowski_over_dense" not in ratio
    grn = {r["step"]: r["v2_over_v1_time"] for r in report_module.grn_ratios(rows)}
    assert grn == {"sparse FCMAE": 0.8, "fine-tuning": 1.25}
    data = [{"workers": 0, "status": "ok", "img_s_per_process": 50.0}]
    data.append({"workers": 2, "status": "ok", "img_s_per_process": 12.0})
    (feed,) = report_module.feeding(rows, data)  # V2's fastest sparse step: 30 images/s
    assert feed["step_img_s"] == 30 and feed["processes_needed"] == 3
