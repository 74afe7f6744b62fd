"""Time one FCMAE training step (forward, backward, AdamW) per backend.

    python scripts/bench.py --model convnextv2_tiny --batch 16 --size 224
    python scripts/bench.py --backends dense,sparse,minkowski   # minkowski: MinkowskiEngine
    python scripts/bench.py --backends sparse --grad-checkpointing   # encoder blocks recomputed

Each backend runs in a fresh process, so its peak memory is its own. Peak memory
is what training adds on top of the built model and batch (activations,
gradients, optimizer state): on CUDA from the allocator's peak, on CPU from the
process's peak resident set (on MPS: the driver's allocation after the steps, as MPS
keeps no peak). Prints a markdown table.

The measuring lives here once: ``measure(cell)`` times a step as the engine takes it (its
Runtime for device, precision, autocast and compile; its AdamW), and ``fresh(cell, timeout)``
runs it in a new process; scripts/device_report.py runs its whole matrix through them.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

# The keys of a cell, with their defaults: what one measurement runs.
CELL = {
    "kind": "fcmae",  # "fcmae": a pretraining step; "classifier": a fine-tuning step
    "model": "convnextv2_tiny",
    "backend": "sparse",  # fcmae only
    "device": "cpu",
    "precision": "fp32",
    "batch": 16,
    "size": 224,
    "mask_ratio": 0.6,
    "grn": True,  # False: ConvNeXt V2 blocks without GRN, with layer scale (V1's)
    "compile": False,
    "channels_last": False,
    "grad_checkpointing": False,
    "warmup": 2,
    "steps": 5,
}


def _build(cell: dict[str, Any]) -> Any:
    """The model a cell trains and its loss: loss_fn(model, images, labels)."""
    import torch.nn.functional as F

    import fcmae

    if cell["kind"] == "classifier":
        model = fcmae.create_model(cell["model"], num_classes=1000, grn=cell["grn"])
        return model, lambda m, images, labels: F.cross_entropy(m(images), labels)
    model = fcmae.create_model(
        f"fcmae_{cell['model']}",
        backend=cell["backend"],
        mask_ratio=cell["mask_ratio"],
        grn=cell["grn"],
    )
    return model, lambda m, images, labels: m(images)[0]


def training_step(cell: dict[str, Any]) -> tuple[Any, Any]:
    """(step, device): step() runs one of cell's training steps as the engine takes it
    (autocast, scaled backward, AdamW, zero grads) on fixed random images, and waits for the
    device."""
    import torch

    from fcmae.train.optim import adamw, param_groups
    from fcmae.train.runtime import Runtime

    cell = {**CELL, **cell}
    torch.manual_seed(0)
    runtime = Runtime(cell["device"], cell["precision"], num_workers=0)
    device = runtime.device
    model, loss_fn = _build(cell)
    model.set_grad_checkpointing(cell["grad_checkpointing"])
    model.to(device).train()
    images = torch.randn(cell["batch"], 3, cell["size"], cell["size"], device=device)
    labels = torch.randint(0, 1000, (cell["batch"],), device=device)
    if cell["channels_last"]:
        model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = adamw(param_groups(model, 0.05), (0.9, 0.95), device)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.precision == "fp16")
    wrapped = runtime.wrap(model, cell["compile"])

    def step() -> None:
        with runtime.autocast():
            loss = loss_fn(wrapped, images, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        _synchronize(device)

    return step, device


def measure(cell: dict[str, Any]) -> dict[str, Any]:
    """Time cell's training steps in this process: {"step_s", "min_step_s", "img_s",
    "peak_gib", "memory"}.

    step_s: the median of cell["steps"] steps after cell["warmup"] (compilation falls in the
    warm-up). The step is the engine's: autocast, scaled backward, AdamW, zero grads.
    """
    cell = {**CELL, **cell}
    step, device = training_step(cell)
    baseline = _memory_gib(device)
    times = []
    for i in range(cell["warmup"] + cell["steps"]):
        start = time.perf_counter()
        step()
        if i >= cell["warmup"]:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "step_s": seconds,
        "min_step_s": min(times),  # the least disturbed by other load on the machine
        "img_s": cell["batch"] / seconds,
        "peak_gib": _memory_gib(device) - baseline,
        "memory": MEMORY[device.type],
    }


MEMORY = {
    "cuda": "CUDA allocator peak",
    "cpu": "peak resident set growth",
    "mps": "MPS driver allocation after the steps",
}


def _synchronize(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _memory_gib(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def sentence(error: BaseException) -> str:
    """An exception as one line: fcmae's own sentence, else its type and first line."""
    from fcmae.errors import UserError
    from fcmae.models import ModelError

    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    own = isinstance(error, (UserError, ModelError))
    line = text if own else f"{type(error).__name__}: {text}".strip()
    return line[:400].rstrip(": ")


def _child(cell_json: str) -> None:
    """The fresh process: one JSON line, the measurement or {"error": sentence}."""
    try:
        result = measure(json.loads(cell_json))
    except BaseException as e:  # noqa: BLE001 - every failure becomes the cell's sentence
        result = {"error": sentence(e)}
    print(json.dumps(result), flush=True)


def fresh(cell: dict[str, Any], timeout: float) -> dict[str, Any]:
    """measure(cell) in a new Python process, killed after timeout seconds; returns its dict,
    or {"error": one sentence} for a failure, a crash or a timeout."""
    child = [sys.executable, os.path.abspath(__file__), "--cell", json.dumps(cell)]
    try:
        done = subprocess.run(child, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        said = done.stderr.strip().splitlines() or [f"exited with status {done.returncode}"]
        return {"error": said[-1][:400]}


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="convnextv2_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--backends", default="dense,sparse", help="comma-separated")
    parser.add_argument("--device", default=None, help="default: cuda when there is one, else cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute the encoder's activations"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per backend")
    parser.add_argument("--cell", help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.cell:
        return _child(args.cell)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for backend in args.backends.split(","):
        cell = {key: getattr(args, key) for key in CELL if hasattr(args, key)}
        row = fresh({**cell, "backend": backend, "device": device}, args.timeout)
        if "error" in row:
            sys.exit(f"{backend}: {row['error']}")
        rows.append({"backend": backend, **row})
    base = rows[0]
    print(
        f"{args.model}, batch {args.batch}, {args.size}px, mask ratio {args.mask_ratio}, "
        f"{args.precision}{', grad checkpointing' if args.grad_checkpointing else ''}, "
        f"{device} ({torch.get_num_threads()} threads), median of {args.steps} steps\n"
    )
    print(
        f"| backend | step (s) | images/s | speed-up vs {base['backend']} | training memory (GiB) |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['step_s']:.2f} | {row['img_s']:.2f} | "
            f"{row['img_s'] / base['img_s']:.2f}x | {row['peak_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
