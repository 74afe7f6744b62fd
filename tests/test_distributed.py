"""DDP on CPU: two processes launched by torchrun (gloo) end with identical weights.

This file is also the worker script that torchrun runs (see the bottom).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from mlflow import MlflowClient

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def launch(out: Path, mode: str, **env: str) -> subprocess.CompletedProcess:
    """torchrun, two processes, this file as the worker."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [__file__, str(out), mode],
        env={**ENV, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_two_processes_under_torchrun_end_with_identical_weights(tmp_path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    launched = launch(tmp_path, "train", MLFLOW_TRACKING_URI=store)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0]["init"][k], ranks[1]["init"][k]) for k in ranks[0]["init"])
    # Each rank saw its own shard and masks, so only gradient averaging keeps them equal.
    assert ranks[0]["first_batch"] != ranks[1]["first_batch"]
    final = [r["final"] for r in ranks]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    assert any(not torch.equal(final[0][k], ranks[0]["init"][k]) for k in final[0])
    # Only rank 0 writes: one log, one set of step records, one checkpoint.
    run = tmp_path / "run"
    steps = [
        line
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if '"type": "step"' in line
    ]
    assert len(steps) == 2 * 2  # 2 epochs x (32 images / 2 ranks / 4 per batch / 2 accum)
    assert '"world_size": 2' in (run / "metrics.jsonl").read_text()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-0002.pth"]
    assert "Traceback" not in launched.stderr and "Grad strides" not in launched.stderr
    # --track mlflow: one MLflow run, fed by rank 0 alone
    client = MlflowClient(store)
    (mirror,) = client.search_runs([client.get_experiment_by_name("fcmae").experiment_id])
    assert [m.step for m in client.get_metric_history(mirror.info.run_id, "step/loss")] == [
        1, 2, 3, 4
    ]  # fmt: skip


def test_a_stalled_process_stops_the_others_with_a_sentence(tmp_path):
    start = time.monotonic()
    launched = launch(tmp_path, "stall")
    assert launched.returncode != 0
    assert time.monotonic() - start < STALL_S  # the waiting rank gave up before the stall ended
    assert "fcmae: error: Process 0 waited more than 2 s for the others" in launched.stderr
    assert "waited more than 2 s" in (tmp_path / "run" / "log.txt").read_text()


STALL_S = 60  # rank 1 sleeps this long in its first step; the collective timeout is 2 s


def worker(out: Path, mode: str) -> None:
    from fcmae.config.commands import PretrainConfig
    from fcmae.config.schema import resolve
    from fcmae.data.images import Decoding
    from fcmae.data.sources import collate, data_source
    from fcmae.data.stats import imagenet
    from fcmae.data.transforms import pretrain_transform
    from fcmae.errors import UserError
    from fcmae.pretrain.job import build_model, train_step
    from fcmae.run.run import Run
    from fcmae.train.distributed import shutdown
    from fcmae.train.engine import Engine
    from fcmae.train.runtime import Runtime, seed_everything

    cfg = resolve(
        PretrainConfig,
        flags={
            "output_dir": str(out / "run"),
            "device": "cpu",
            "input_size": 64,
            "batch_size": 4,
            "accum_iter": 2,
            "epochs": 2,
            "warmup_epochs": 1,
            "save_every": 2,
            "demo_images": 32,
            "num_workers": 0,
            "dist_timeout": 2.0 if mode == "stall" else 600.0,
            "track": ("mlflow",) if mode == "train" else (),
        },
    )
    transform = pretrain_transform(cfg.input_size, imagenet(3))
    dataset, _ = data_source(None).unlabelled(transform, Decoding.for_model(3), cfg.demo_images)
    runtime = Runtime.for_training(cfg)
    rank = runtime.dist.rank
    seen = []

    def recording_step(model, batch):
        seen.append(batch.images.sum().item())
        if mode == "stall" and rank == 1:
            time.sleep(STALL_S)
        return train_step(model, batch)

    with Run.open(cfg, runtime.dist) as run:
        seed_everything(cfg.seed)
        model = build_model(cfg)
        init = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            Engine(cfg, run, runtime).fit(model, dataset, recording_step, collate_fn=collate)
        except UserError as e:
            print(f"fcmae: error: {e}", file=sys.stderr)
            os._exit(1)  # leave the stalled peer behind, as the CLI's exit would
    torch.save(
        {"init": init, "final": model.state_dict(), "first_batch": seen[0]},
        out / f"rank{rank}.pt",
    )
    shutdown()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
