"""Pretraining throughput on this machine, and the loss curve of the demo run.

    python scripts/pretrain_throughput.py                      # atto and tiny at 224, then the demo
    python scripts/pretrain_throughput.py --models atto --steps 3 --skip-demo

Throughput: full pretraining steps (random mask, encoder with the default backend, decoder,
loss, backward, AdamW) on random images in fp32, as `fcmae pretrain` runs them on a CPU; the
median of the timed steps after warm-up, as images/s. Demo: runs the README's demo command
(`python -m fcmae pretrain`, into a temporary directory) and prints its loss per epoch from
metrics.jsonl and its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.data.sources import Batch
from fcmae.pretrain.job import build_model, train_step
from fcmae.train.optim import param_groups


def throughput(model_name: str, input_size: int, batch_size: int, steps: int, warmup: int) -> dict:
    """Median images/s of full training steps on random (N, 3, s, s) images."""
    cfg = resolve(
        PretrainConfig,
        flags={"model": f"convnextv2_{model_name}", "data": "unused", "input_size": input_size},
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    groups = param_groups(model, cfg.weight_decay, skip_declared=not cfg.decay_grn)
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=cfg.betas)
    images = torch.randn(batch_size, cfg.in_chans, input_size, input_size)
    labels = torch.zeros(batch_size, dtype=torch.long)
    batch = Batch(images, labels, torch.zeros(batch_size, dtype=torch.bool))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss, _ = train_step(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {
        "model": f"convnextv2_{model_name}",
        "input_size": input_size,
        "batch": batch_size,
        "backend": cfg.backend,
        "threads": torch.get_num_threads(),
        "s_per_step": round(seconds, 3),
        "img_per_s": round(batch_size / seconds, 1),
    }


def demo(out_dir: Path) -> dict:
    """Run the demo command; return its wall time and per-epoch losses."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fcmae", "pretrain", "--output-dir", str(out_dir)],
        check=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    first_step = next(r for r in records if r["type"] == "step")
    return {
        "wall_s": round(wall, 1),
        "first_step_loss": round(first_step["loss"], 4),
        "epoch_loss": [round(r["loss"], 4) for r in epochs],
        "img_per_s": round(statistics.median(r["img_per_s"] for r in epochs), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["atto", "tiny"])
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    results: dict = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "throughput": []}
    print("| model | input | batch | backend | threads | s/step | images/s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        r = throughput(name, args.input_size, args.batch_size, args.steps, args.warmup)
        results["throughput"].append(r)
        print(
            f"| {r['model']} | {r['input_size']} | {r['batch']} | {r['backend']} | "
            f"{r['threads']} | {r['s_per_step']} | {r['img_per_s']} |",
            flush=True,
        )
    if not args.skip_demo:
        with tempfile.TemporaryDirectory() as tmp:
            d = results["demo"] = demo(Path(tmp) / "demo")
        print(
            f"\ndemo: {d['wall_s']} s wall, {d['img_per_s']} img/s (median epoch), loss at "
            f"the first step {d['first_step_loss']}"
        )
        print("| epoch | " + " | ".join(str(e) for e in range(1, len(d["epoch_loss"]) + 1)) + " |")
        print("|---" * (len(d["epoch_loss"]) + 1) + "|")
        print("| loss | " + " | ".join(f"{x:.3f}" for x in d["epoch_loss"]) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
