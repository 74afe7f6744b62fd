"""One command that measures a machine for fcmae, in minutes: what trains, how fast, in how much
memory, how many cores feed it, and whether the commands run.

    python scripts/device_report.py --device cuda --out report-h200     # under 8 minutes
    python scripts/device_report.py --device mps --out report-m3
    python scripts/device_report.py --device cpu --quick --out report-cpu

Writes OUT/report.json and OUT/report.md (after every section, so a report cut short still
says what it measured):

- steps: FCMAE training steps (forward, backward, AdamW: the engine's step) of tiny and base
  (atto with --quick) per backend (dense, sparse, minkowski where MinkowskiEngine is
  installed) and precision (fp32, bf16, fp16 on GPUs; fp32 on the CPU, bf16 with
  --cpu-bf16), then with channels-last and with --compile: images/s, the training memory
  (CUDA's allocator peak; on the CPU the peak resident set's growth), sparse/dense ratios.
  Each cell runs in a fresh process (scripts/bench.py's measure and fresh);
- V2 vs V1: a fine-tuning step and a sparse FCMAE step with and without GRN (grn=False:
  V1's blocks with layer scale), and the V2/V1 time ratio;
- data: the pretraining transform's decode-and-augment images/s on JPEG and PNG files, in
  the main process and with 1..N loader workers, so a user knows how many cores feed a GPU;
- commands: a few steps of `fcmae pretrain` and `fcmae finetune` through the CLI, and
  `torchrun -m fcmae pretrain` (gloo on the CPU, NCCL on CUDA), each "ok" or the sentence it
  failed with.

No failure stops the report: every cell records its error and the report goes on. Each cell
has a timeout, and the whole report a time budget (--budget, 450 s): a cell that no longer
fits is recorded as skipped.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # scripts/: bench, run as a module too

import bench  # noqa: E402

from fcmae.run.files import write_text_atomic  # noqa: E402

VERSION = 1
GPU_PRECISIONS = ("fp32", "bf16", "fp16")
GPU_DEFAULT = "bf16"  # the precision of the variant and V2/V1 rows on a GPU


@dataclass
class Plan:
    """What a report measures on one device."""

    device: str
    models: tuple[str, ...]
    batch: int
    size: int
    warmup: int
    steps: int
    precisions: tuple[str, ...]
    backends: tuple[str, ...]
    default_precision: str  # the variant (channels-last, compile) and V2/V1 rows
    variant_backends: tuple[str, ...]  # the backends measured with channels-last and compile
    compile_backends: tuple[str, ...]
    compile_channels_last: bool  # compile also with channels-last (a second compilation)
    data_workers: tuple[int, ...]
    data_images: int = 48
    data_seconds: float = 3.0
    commands: bool = True
    grn_rows: bool = True
    cell_timeout: float = 180.0
    budget_s: float = 450.0
    extra_cells: list[dict] = field(default_factory=list)  # cells added as they are (tests)


def _minkowski() -> bool:
    """Whether the minkowski backend imports here (MinkowskiEngine installed and built for
    this torch), as fcmae imports it."""
    try:
        importlib.import_module("fcmae.sites.minkowski")
    except Exception:  # noqa: BLE001 - not installed, or built for another torch
        return False
    return True


def _worker_counts(cores: int) -> tuple[int, ...]:
    counts, n = [0], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return tuple(counts + [cores])


def make_plan(device: str, quick: bool, cpu_bf16: bool = False, budget_s: float = 450) -> Plan:
    """The report's matrix for device ("cuda", "mps" or "cpu")."""
    gpu = device != "cpu"
    sparse_only = ("dense", "sparse")
    backends = sparse_only + (("minkowski",) if device != "mps" and _minkowski() else ())
    cores = os.cpu_count() or 1
    if gpu:
        return Plan(
            device,
            ("convnextv2_atto",) if quick else ("convnextv2_tiny", "convnextv2_base"),
            batch=64,
            size=224,
            warmup=3,
            steps=10,
            precisions=GPU_PRECISIONS,
            backends=backends,
            default_precision=GPU_DEFAULT,
            variant_backends=sparse_only,
            compile_backends=sparse_only,
            compile_channels_last=True,
            data_workers=_worker_counts(cores),
            budget_s=budget_s,
        )
    return Plan(
        device,
        ("convnextv2_atto",) if quick else ("convnextv2_tiny", "convnextv2_base"),
        batch=8,
        size=128 if quick else 224,
        warmup=1,
        steps=3 if quick else 5,
        precisions=("fp32", "bf16") if cpu_bf16 else ("fp32",),
        backends=backends,
        default_precision="fp32",
        variant_backends=("sparse",) if quick else sparse_only,
        compile_backends=("sparse",),
        compile_channels_last=not quick,  # a CPU compiles for minutes: once with --quick
        data_workers=_worker_counts(cores),
        cell_timeout=240.0,
        budget_s=budget_s,
    )


def _cell(plan: Plan, section: str, model: str, **keys: Any) -> dict[str, Any]:
    cell = {"section": section, "model": model, "device": plan.device, "batch": plan.batch}
    cell.update(size=plan.size, warmup=plan.warmup, steps=plan.steps)
    cell.update(precision=plan.default_precision, backend="sparse")
    return {**cell, **keys}


def step_cells(plan: Plan) -> list[dict[str, Any]]:
    """The matrix, most telling first: a report cut short by its budget loses compile last."""
    cells = [
        _cell(plan, "steps", model, backend=backend, precision=precision)
        for model in plan.models
        for backend in plan.backends
        for precision in plan.precisions
        if backend != "minkowski" or precision == "fp32"  # MinkowskiEngine has no half kernels
    ]
    if plan.grn_rows:
        for model in plan.models:
            cells += [
                _cell(plan, "grn", model, kind="classifier", grn=True),
                _cell(plan, "grn", model, kind="classifier", grn=False),
                _cell(plan, "grn", model, grn=False),
            ]
    for model in plan.models:
        cells += [
            _cell(plan, "variants", model, backend=b, channels_last=True)
            for b in plan.variant_backends
        ]
    for channels_last in (False, True) if plan.compile_channels_last else (False,):
        cells += [
            _cell(plan, "variants", model, backend=b, compile=True, channels_last=channels_last)
            for model in plan.models
            for b in plan.compile_backends
        ]
    return cells + plan.extra_cells


class Clock:
    """The report's time budget: how long a cell may still take."""

    def __init__(self, budget_s: float):
        self.start, self.budget_s = time.monotonic(), budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allow(self, wanted: float) -> float:
        """Seconds a cell that wants `wanted` may run: what is left of the budget (less a
        reserve for writing the report), 0 when too little is left to be worth starting."""
        left = self.budget_s - self.elapsed() - 5
        return min(wanted, left) if left >= 10 else 0.0

    def skipped(self) -> dict[str, Any]:
        return {"status": "skipped", "error": f"the report's {self.budget_s:.0f} s were spent"}


def run_cell(cell: dict[str, Any], clock: Clock, timeout: float) -> dict[str, Any]:
    """One cell in a fresh process: the cell with its status, measurement or error."""
    allowed = clock.allow(timeout)
    if not allowed:
        return {**cell, **clock.skipped()}
    start = time.monotonic()
    measured = bench.fresh({k: v for k, v in cell.items() if k in bench.CELL}, allowed)
    status = "error" if "error" in measured else "ok"
    return {**cell, "status": status, **measured, "wall_s": round(time.monotonic() - start, 1)}


def _key(row: dict[str, Any], *without: str) -> tuple:
    keys = ("kind", "model", "precision", "compile", "channels_last", "grn", "backend")
    return tuple(row.get(k, bench.CELL.get(k)) for k in keys if k not in without)


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """sparse/dense and minkowski/dense speed (images/s over images/s) of FCMAE steps alike
    in everything but the backend."""
    ok = {_key(r): r for r in rows if r.get("status") == "ok"}
    out = []
    for key, dense in ok.items():
        row = dict(zip(("kind", "model", "precision", "compile", "channels_last", "grn"), key))
        if row["kind"] != "fcmae" or key[-1] != "dense":
            continue
        for backend in ("sparse", "minkowski"):
            other = ok.get(key[:-1] + (backend,))
            if other:
                row[f"{backend}_over_dense"] = round(other["img_s"] / dense["img_s"], 3)
        if len(row) > 6:
            out.append(row)
    return out


def grn_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """V2 (GRN) over V1-style (grn=False) step time, for the fine-tuning step and the sparse
    FCMAE step: > 1 means GRN costs that much more time. From each cell's fastest step, which
    other load on the machine disturbs least (the cells run minutes apart)."""
    ok = {_key(r): r for r in rows if r.get("status") == "ok"}
    out = []
    for key, v1 in ok.items():
        kind, model, precision, compiled, channels_last, grn, backend = key
        v2 = ok.get((kind, model, precision, compiled, channels_last, True, backend))
        if grn or compiled or channels_last or v2 is None:
            continue
        if kind == "fcmae" and backend != "sparse":
            continue
        step = "fine-tuning" if kind == "classifier" else "sparse FCMAE"
        out.append(
            {
                "step": step,
                "model": model,
                "precision": precision,
                "v2_img_s": round(v2["img_s"], 2),
                "v1_img_s": round(v1["img_s"], 2),
                "v2_over_v1_time": round(v2["min_step_s"] / v1["min_step_s"], 3),
            }
        )
    return out


def write_images(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """count photos-like files at ImageNet's typical size, half JPEG, half PNG."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    files = []
    for i in range(count):
        noise = rng.normal(0, 25, (h, w, 3))
        pixels = (ramp * rng.uniform(0.3, 1, 3) + noise).clip(0, 255).astype(np.uint8)
        path = folder / f"img{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
        Image.fromarray(pixels).save(path, **({"quality": 90} if i % 2 == 0 else {}))
        files.append(path)
    return files


def data_rates(plan: Plan, files: list[Path], clock: Clock) -> list[dict[str, Any]]:
    """Decode-and-augment images/s of the pretraining transform per loader worker count."""
    import torch
    from torch.utils.data import DataLoader

    from fcmae.data.images import Decoding
    from fcmae.data.sources import ImageFiles, collate
    from fcmae.data.stats import imagenet
    from fcmae.data.transforms import pretrain_transform

    rows = []
    for workers in plan.data_workers:
        if not clock.allow(plan.data_seconds + 30):
            rows.append({"workers": workers, **clock.skipped()})
            continue
        many = files * 1000  # never runs out within the timed seconds
        transform = pretrain_transform(224, imagenet(3))
        dataset = ImageFiles(many, [0] * len(many), transform, Decoding.for_model(3))
        row: dict[str, Any] = {"workers": workers}
        try:
            loader = DataLoader(
                dataset, 16, num_workers=workers, collate_fn=collate, timeout=60 if workers else 0
            )
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # one core per process, the main one included
            try:
                row.update(_time_loader(loader, plan.data_seconds))
            finally:
                torch.set_num_threads(threads)
            row["img_s_per_process"] = round(row["img_s"] / max(workers, 1), 1)
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, the report goes on
            row.update(status="error", error=bench.sentence(e))
        rows.append(row)
    return rows


def _time_loader(loader: Any, seconds: float) -> dict[str, Any]:
    """images/s once the workers run: the first batches, made while the others waited for
    the workers to start, are not timed."""
    batches = iter(loader)
    for _ in range(2 * loader.num_workers + 1):  # the batches prefetched while starting
        next(batches)
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        images += len(next(batches).images)
    elapsed = time.perf_counter() - start
    return {"img_s": round(images / elapsed, 1), "images": images}


def _write_class_folders(root: Path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, count in (("train", 8), ("val", 4)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.full((48, 48, 3), 60) + 140 * (np.arange(3) == c)
                pixels = pixels + rng.integers(-40, 40, (48, 48, 3))
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def command_lines(plan: Plan, tmp: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) of the commands the report runs: tiny settings, into tmp."""
    python = [sys.executable]
    common = ["--model", "convnextv2_atto", "--input-size", "64", "--batch-size", "8"]
    common += ["--effective-batch", "8", "--epochs", "1", "--warmup-epochs", "0"]
    common += ["--device", plan.device, "--num-workers", "0"]
    pretrain = ["pretrain", "--data", str(tmp / "command-images"), *common]
    encoder = tmp / "pretrain" / "checkpoints" / "encoder-0001.pth"
    finetune = ["finetune", "--data", str(tmp / "classes"), *common]
    finetune += ["--pretrained", str(encoder), "--output-dir", str(tmp / "finetune")]
    processes = _torchrun_processes(plan.device)
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    backend = {"cuda": "NCCL", "cpu": "gloo"}.get(plan.device, "no process group")
    if processes == 1:
        backend = "one process: no process group"
    return [
        (
            "fcmae pretrain",
            python + ["-m", "fcmae", *pretrain, "--output-dir", str(tmp / "pretrain")],
        ),
        ("fcmae finetune", python + ["-m", "fcmae", *finetune]),
        (
            f"torchrun --nproc_per_node {processes} -m fcmae pretrain ({backend})",
            python + [*torchrun, "-m", "fcmae", *pretrain, "--output-dir", str(tmp / "torchrun")],
        ),
    ]


def _torchrun_processes(device: str) -> int:
    """Two processes where the device allows (gloo on the CPU, NCCL on two or more GPUs), so
    the process group and DDP are exercised; fcmae starts no group for one process."""
    if device == "cpu":
        return 2
    if device == "cuda":
        import torch

        return min(2, torch.cuda.device_count())
    return 1


def run_command(name: str, argv: list[str], clock: Clock, timeout: float) -> dict[str, Any]:
    """ "ok", or the sentence the command failed with (fcmae's error line, else stderr's last)."""
    allowed = clock.allow(timeout)
    if not allowed:
        return {"name": name, "argv": argv, **clock.skipped()}
    start = time.monotonic()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=allowed, env=env)
        lines = done.stderr.strip().splitlines()
        errors = [line for line in lines if ": error: " in line] or lines[-1:]
        error = None if done.returncode == 0 else (errors[-1] if errors else "failed")
    except subprocess.TimeoutExpired:
        error = f"timed out after {allowed:.0f} s"
    wall = round(time.monotonic() - start, 1)
    status = "ok" if error is None else "error"
    return {"name": name, "argv": argv, "status": status, "error": error, "wall_s": wall}


def device_info(device: str, quick: bool) -> dict[str, Any]:
    import torch

    info = {
        "device": device,
        "quick": quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "minkowski": _minkowski(),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        info.update(cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    return info


def feeding(rows: list[dict[str, Any]], data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Loader processes (cores) one device needs for its fastest sparse FCMAE step (V2) of
    each model, at the best per-process decode rate measured."""
    rates = [r["img_s_per_process"] for r in data if r.get("status") == "ok" and r["workers"]]
    if not rates:
        return []
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("status") != "ok" or _key(r)[0] != "fcmae" or not r.get("grn", True):
            continue
        if r["backend"] == "sparse" and r["img_s"] > best.get(r["model"], {}).get("img_s", 0):
            best[r["model"]] = r
    per_process = max(rates)
    return [
        {
            "model": model,
            "step_img_s": round(r["img_s"], 1),
            "precision": r["precision"],
            "compile": r.get("compile", False),
            "processes_needed": int(-(-r["img_s"] // per_process)),
        }
        for model, r in best.items()
    ]


def _yes(value: Any) -> str:
    return "yes" if value else ""


def _number(row: dict[str, Any], key: str, digits: int = 2) -> str:
    value = row.get(key)
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else ""


def _status(row: dict[str, Any]) -> str:
    return "ok" if row.get("status") == "ok" else f"{row.get('status')}: {row.get('error')}"


def markdown(report: dict[str, Any]) -> str:
    """report.md: the report's tables."""
    info = report["device"]
    where = info.get("gpu") or f"{info['cpu_count']} CPU cores"
    lines = [
        f"# fcmae device report: {info['device']} ({where})",
        "",
        f"torch {info['torch']}, Python {info['python']}, {info['platform']}; "
        f"{info['torch_threads']} torch threads; load average at start "
        f"{', '.join(map(str, info['load_average']))}; MinkowskiEngine "
        f"{'installed' if info['minkowski'] else 'not installed'}"
        f"{'; --quick' if info['quick'] else ''}. Whole report: {report['wall_s']:.0f} s.",
    ]
    steps = [
        [r["section"], r.get("kind", "fcmae"), r["model"].removeprefix("convnextv2_")]
        + [r["backend"] if r.get("kind", "fcmae") == "fcmae" else "", r["precision"]]
        + [_yes(r.get("compile")), _yes(r.get("channels_last"))]
        + ["V2" if r.get("grn", True) else "V1 (no GRN)", f"{r['batch']} x {r['size']}"]
        + [_number(r, "img_s", 1), _number(r, "step_s", 3), _number(r, "peak_gib"), _status(r)]
        for r in report["steps"]
    ]
    lines += _table(
        "Training steps",
        ["section", "step", "model", "backend", "precision", "compile", "channels-last", "GRN"]
        + ["batch x px", "images/s", "step (s)", "memory (GiB)", "status"],
        steps,
    )
    lines += [
        "",
        "Forward, backward and AdamW as the engine steps; FCMAE mask ratio 0.6; median of the "
        "timed steps; memory: what training adds to the built model and batch.",
    ]
    lines += _ratio_lines(report) + _data_lines(report)
    commands = [[c["name"], c.get("wall_s", ""), _status(c)] for c in report["commands"]]
    lines += _table("Commands", ["command", "wall (s)", "result"], commands)
    return "\n".join(lines) + "\n"


def _table(title: str, header: list[str], rows: list[list[Any]]) -> list[str]:
    """A markdown section: its title, then a table."""
    lines = ["", f"## {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _ratio_lines(report: dict[str, Any]) -> list[str]:
    ratios_rows = [
        [r["model"], r["precision"], _yes(r["compile"]), _yes(r["channels_last"])]
        + [r.get("sparse_over_dense", ""), r.get("minkowski_over_dense", "")]
        for r in report["ratios"]
    ]
    grn_rows = [
        [r["step"], r["model"], r["precision"], r["v2_img_s"], r["v1_img_s"]]
        + [r["v2_over_v1_time"]]
        for r in report["grn"]
    ]
    return _table(
        "Sparse over dense (images/s ratio)",
        ["model", "precision", "compile", "channels-last", "sparse/dense", "minkowski/dense"],
        ratios_rows,
    ) + _table(
        "ConvNeXt V2 over V1-style blocks (grn=False, layer scale)",
        ["step", "model", "precision", "V2 images/s", "V1 images/s", "V2/V1 time (fastest)"],
        grn_rows,
    )


def _data_lines(report: dict[str, Any]) -> list[str]:
    data = report["data"]
    rows = [
        [r["workers"], _number(r, "img_s", 1), _number(r, "img_s_per_process", 1), _status(r)]
        for r in data["rows"]
    ]
    lines = _table("Data pipeline", ["loader workers", "images/s", "per process", "status"], rows)
    lines += ["", data["what"]]
    for f in report["feeding"]:
        lines.append(
            f"\n{f['model']}'s fastest sparse step ({f['precision']}"
            f"{', compiled' if f['compile'] else ''}) takes {f['step_img_s']} images/s: "
            f"{f['processes_needed']:.0f} loader process(es), a core each, feed it."
        )
    return lines


def write(report: dict[str, Any], out: Path) -> None:
    """OUT/report.json and OUT/report.md, each written atomically."""
    write_text_atomic(out / "report.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "report.md", markdown(report))


def build_report(plan: Plan, out: Path, quick: bool = False) -> dict[str, Any]:
    """Measure everything plan names and write OUT/report.json and report.md, rewritten after
    each section; returns the report."""
    clock = Clock(plan.budget_s)
    report: dict[str, Any] = {"version": VERSION, "device": device_info(plan.device, quick)}
    report.update(plan=asdict(plan), steps=[], ratios=[], grn=[], feeding=[], commands=[])
    what = (
        f"The pretraining transform (RandomResizedCrop to 224 px, flip, normalise) on "
        f"{plan.data_images} JPEG and PNG files of 500 x 375 px, one core per process."
    )
    report["data"] = {"what": what, "rows": []}

    def save() -> None:
        report["wall_s"] = round(clock.elapsed(), 1)
        write(report, out)

    with tempfile.TemporaryDirectory(prefix="fcmae-report-") as tmp:
        files = write_images(Path(tmp) / "images", plan.data_images)
        cells = step_cells(plan)
        for cell in cells[: _first_variant(cells)]:
            report["steps"].append(run_cell(cell, clock, plan.cell_timeout))
            report["ratios"], report["grn"] = ratios(report["steps"]), grn_ratios(report["steps"])
            save()
        report["data"]["rows"] = data_rates(plan, files, clock)
        report["feeding"] = feeding(report["steps"], report["data"]["rows"])
        save()
        if plan.commands:
            _write_class_folders(Path(tmp) / "classes")
            write_images(Path(tmp) / "command-images", 16)  # two steps of 8
            for name, argv in command_lines(plan, Path(tmp)):
                report["commands"].append(run_command(name, argv, clock, plan.cell_timeout))
                save()
        for cell in cells[_first_variant(cells) :]:
            report["steps"].append(run_cell(cell, clock, plan.cell_timeout))
            report["ratios"] = ratios(report["steps"])
            report["feeding"] = feeding(report["steps"], report["data"]["rows"])
            save()
    return report


def _first_variant(cells: list[dict[str, Any]]) -> int:
    """Where the channels-last and compile cells begin: they run after the commands."""
    return next((i for i, c in enumerate(cells) if c["section"] == "variants"), len(cells))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", required=True, choices=("cuda", "mps", "cpu"))
    parser.add_argument("--quick", action="store_true", help="atto only, a smaller matrix")
    parser.add_argument("--out", required=True, help="folder for report.json and report.md")
    parser.add_argument("--budget", type=float, default=450, help="seconds for the whole report")
    parser.add_argument("--cpu-bf16", action="store_true", help="on the CPU, bf16 rows too")
    args = parser.parse_args()
    import torch

    present = {"cpu": True, "cuda": torch.cuda.is_available()}
    present["mps"] = torch.backends.mps.is_available()
    if not present[args.device]:
        sys.exit(f"device_report: --device {args.device} is not available here; pass another.")
    plan = make_plan(args.device, args.quick, args.cpu_bf16, args.budget)
    report = build_report(plan, Path(args.out), args.quick)
    failed = [r for r in report["steps"] + report["commands"] if r.get("status") != "ok"]
    print(markdown(report))
    print(f"Wrote {args.out}/report.json and report.md ({len(failed)} cells not ok).")


if __name__ == "__main__":
    main()
