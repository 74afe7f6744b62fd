"""Time one FCMAE training step (forward, backward, AdamW) per backend.

    python scripts/bench.py --model convnextv2_tiny --batch 16 --size 224
    python scripts/bench.py --backends dense,sparse,minkowski   # minkowski: MinkowskiEngine
    python scripts/bench.py --backends sparse --grad-checkpointing   # encoder blocks recomputed

Each backend runs in a fresh process, so its peak memory is its own. Peak memory
is what training adds on top of the built model and batch (activations,
gradients, optimizer state): on CUDA from the allocator's peak, on CPU from the
process's peak resident set. Prints a markdown table.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import fcmae


def measure(args):
    """Run in the child process: time the steps of one backend, print one JSON line."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = fcmae.create_model(
        f"fcmae_{args.model}", backend=args.backend, mask_ratio=args.mask_ratio
    ).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    imgs = torch.randn(args.batch, 3, args.size, args.size, device=device)
    generator = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step():
        with autocast:
            loss, _, _ = model(imgs, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    baseline = _peak_gib(device)
    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = _peak_gib(device) - baseline
    print(
        json.dumps(
            {
                "backend": args.backend,
                "step_s": seconds,
                "img_s": args.batch / seconds,
                "peak_gib": peak,
            }
        )
    )


def _peak_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="convnextv2_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--backends", default="dense,sparse", help="comma-separated")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute the encoder's activations"
    )
    parser.add_argument("--backend", help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.backend:
        return measure(args)

    rows = []
    for backend in args.backends.split(","):
        child = [sys.executable, __file__, *sys.argv[1:], "--backend", backend]
        done = subprocess.run(child, capture_output=True, text=True, env=os.environ)
        if done.returncode:
            sys.exit(f"{backend}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(
        f"{args.model}, batch {args.batch}, {args.size}px, mask ratio {args.mask_ratio}, "
        f"{args.precision}{', grad checkpointing' if args.grad_checkpointing else ''}, "
        f"{args.device} ({torch.get_num_threads()} threads), median of {args.steps} steps\n"
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
