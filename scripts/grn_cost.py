"""What GRN costs: the ConvNeXt V2 training step against the same network without GRN.

    python scripts/grn_cost.py                          # tiny, 224 px, batch 16, eager
    python scripts/grn_cost.py --compile --profile      # also compiled; top ops of the sparse step

The network with ``grn=False`` is ConvNeXt V2 with V1's block (layer scale in place of GRN):
the same widths, GRN the only difference. For the fine-tuning step (classifier, AdamW) and the
sparse FCMAE step, V2 and V1 steps are interleaved in one process (V2, V1, V2, V1, ...), so a
drift in the machine's load falls on both; the table gives the median of each and their
ratio. Also: the bytes one block saves for its backward pass (saved-tensor hooks), with GRN and
without, and with ``--profile`` the top operators by self time of one sparse FCMAE step.

Run it against another checkout's package to compare (e.g. the commit before GRN's own
backward): ``PYTHONPATH=/path/to/checkout python scripts/grn_cost.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench import training_step

import fcmae
from fcmae.models.convnextv2 import Block


def interleaved(cell: dict, steps: int, warmup: int) -> tuple[float, float]:
    """Median step seconds of (V2, V1) for cell, their steps interleaved."""
    v2, _ = training_step({**cell, "grn": True})
    v1, _ = training_step({**cell, "grn": False})
    for _ in range(warmup):
        v2(), v1()
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(steps):
        for grn, step in ((True, v2), (False, v1)):
            start = time.perf_counter()
            step()
            times[grn].append(time.perf_counter() - start)
    return statistics.median(times[True]), statistics.median(times[False])


def saved_bytes(grn: bool, dim: int = 96, size: int = 56, batch: int = 16) -> int:
    """Bytes of the tensors one block saves for backward (stage 1 of tiny at 224 px)."""
    from fcmae.sites.grid import GridSites

    torch.manual_seed(0)
    block = Block(dim, grn=grn)
    x = torch.randn(batch, size, size, dim, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()  # a storage saved twice counts once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, GridSites())
    return sum(seen.values())


def profile(cell: dict) -> str:
    """The top operators by self CPU time of one sparse FCMAE step, as torch.profiler's table."""
    step, _ = training_step({**cell, "kind": "fcmae", "grn": True})
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="convnextv2_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also the compiled steps")
    parser.add_argument("--profile", action="store_true", help="top ops of the sparse step")
    args = parser.parse_args()
    print(
        f"fcmae from {fcmae.__file__}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("\n| step | compiled | V2 (s) | V1 (s) | V2 / V1 |\n|---|---|---|---|---|")
    for compiled in (False, True) if args.compile else (False,):
        for kind, name in (("classifier", "fine-tuning"), ("fcmae", "FCMAE, sparse")):
            cell = {"kind": kind, "model": args.model, "batch": args.batch, "size": args.size}
            v2, v1 = interleaved({**cell, "compile": compiled}, args.steps, args.warmup)
            print(
                f"| {name} | {'yes' if compiled else 'no'} | {v2:.3f} | {v1:.3f} | {v2 / v1:.2f} |"
            )
    with_grn, without = saved_bytes(True), saved_bytes(False)
    print(
        f"\nSaved for backward by one block (96 channels, 56x56, batch 16): with GRN "
        f"{with_grn / 2**20:.1f} MiB, without {without / 2**20:.1f} MiB."
    )
    if args.profile:
        cell = {"model": args.model, "batch": args.batch, "size": args.size}
        print("\nTop operators, one sparse FCMAE step:\n" + profile(cell))


if __name__ == "__main__":
    main()
