"""The pretrain job end to end on the real (atto) model: kill and resume, bad files, exports."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import fcmae
from fcmae.cli import main
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.pretrain.job import run

# One thread per process: both runs may share the CPU, and equal thread counts keep float
# reductions in the same order, which bit-identical resume relies on.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(16):
        (root / f"class{i % 2}").mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"class{i % 2}" / f"{i}.png")
    return root


def command(data, out, epochs=6):
    return [
        sys.executable,
        "-m",
        "fcmae",
        "pretrain",
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--input-size",
        "64",
        "--batch-size",
        "4",
        "--effective-batch",
        "none",
        "--epochs",
        str(epochs),
        "--warmup-epochs",
        "1",
        "--save-every",
        "1",
        "--num-workers",
        "0",
        "--blr",
        "0.01",
        "--keep-last",
        "2",
    ]


# The CLI, with a callback that kills its own process (SIGKILL: no cleanup, as a preempted job)
# after optimizer step 10, which is in epoch 3 of 4 steps each.
KILLED_AT_STEP_10 = """
import os, signal, sys
import fcmae.pretrain.job
from fcmae.cli import main
from fcmae.train.callbacks import Callback

class Kill(Callback):
    def on_step_end(self, ctx):
        if ctx.step == 10:
            os.kill(os.getpid(), signal.SIGKILL)

run = fcmae.pretrain.job.run
fcmae.pretrain.job.run = lambda cfg, callbacks=(): run(cfg, [*callbacks, Kill()])
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_run_resumes_to_the_same_final_weights(image_dir, tmp_path):
    full = subprocess.Popen(
        command(image_dir, tmp_path / "full"),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    cut = subprocess.run(
        [sys.executable, "-c", KILLED_AT_STEP_10, *command(image_dir, tmp_path / "cut")[3:]],
        env=ENV,
        capture_output=True,
        timeout=300,
    )
    assert cut.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "cut" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == [
        "checkpoint-0001.pth",
        "checkpoint-0002.pth",
    ]
    resumed = subprocess.run(
        command(image_dir, tmp_path / "cut"), env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout
    assert full.wait(timeout=300) == 0, full.stderr.read()

    for name in ["checkpoint-0006.pth", "encoder-0006.pth"]:
        a = torch.load(tmp_path / "full" / "checkpoints" / name, weights_only=True)["model"]
        b = torch.load(checkpoints / name, weights_only=True)["model"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    logged = [
        json.loads(line)["step"]
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if '"type": "step"' in line
    ]
    assert logged == list(range(1, 25))


def test_pretraining_skips_broken_files_and_exports_a_loadable_encoder(image_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in sorted(image_dir.rglob("*.png"))[:8]:
        (data / path.name).write_bytes(path.read_bytes())
    (data / "broken.png").write_bytes(b"\x89PNG truncated")
    cfg = resolve(
        PretrainConfig,
        flags={
            "data": str(data),
            "output_dir": str(tmp_path / "run"),
            "input_size": 64,
            "batch_size": 4,
            "effective_batch": None,
            "epochs": 2,
            "warmup_epochs": 1,
            "num_workers": 0,
            "device": "cpu",
            "in_chans": 1,
            "channels_last": True,
            "recon_every": 1,
        },
    )
    result = run(cfg)
    epochs = [
        json.loads(line)
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if '"type": "epoch"' in line
    ]
    assert sum(r["skipped_images"] for r in epochs) >= 1  # broken.png falls in every epoch
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "broken.png" in log
    # the recipe's 0.6 of the 4 patches of a 64-px image: said once, with what it really masks
    assert log.count("Mask ratio 0.6 masks 3 of the 4 patches per image, a share of 0.75") == 1
    assert result["checkpoint"].endswith("checkpoint-0002.pth")

    export = torch.load(tmp_path / "run" / "checkpoints" / "encoder-0002.pth", weights_only=True)
    classifier = fcmae.create_model("convnextv2_atto", num_classes=10, in_chans=1)
    missing, unexpected = classifier.load_state_dict(export["model"], strict=False)
    assert unexpected == [] and sorted(missing) == [
        "head.bias",
        "head.weight",
        "norm.bias",
        "norm.weight",
    ]
    full = torch.load(result["checkpoint"], weights_only=True)["model"]
    assert torch.equal(
        full["encoder.stages.3.1.pwconv2.weight"], export["model"]["stages.3.1.pwconv2.weight"]
    )
    assert "mask_token" in full and "pred.weight" in full  # the decoder is in the full one


def test_pretraining_writes_reconstructions_that_visualize_and_plot_reproduce(
    image_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    cfg = resolve(
        PretrainConfig,
        flags={
            "data": str(image_dir),
            "output_dir": str(out),
            "input_size": 128,
            "batch_size": 4,
            "effective_batch": None,
            "epochs": 2,
            "warmup_epochs": 1,
            "num_workers": 0,
            "device": "cpu",
            "recon_every": 1,
            "patch_size": 64,
            "mask_ratio": 0.5,
        },
    )
    run(cfg)
    for epoch in (1, 2):  # 8 rows of 128-px images, 4 columns
        with Image.open(out / "recon" / f"epoch-{epoch:04d}.png") as png:
            assert png.size == (4 * 128 + 5 * 4, 20 + 8 * 128 + 9 * 4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("recon")] == [4, 8]

    # The command draws the same picture from the checkpoint: same images, masks and weights.
    ckpt = out / "checkpoints" / "checkpoint-0002.pth"
    assert (
        main(
            [
                "visualize",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(image_dir),
                "--output",
                str(tmp_path / "again.png"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "2 of 4 patches of 64 px masked" in capsys.readouterr().out
    with Image.open(tmp_path / "again.png") as a, Image.open(out / "recon" / "epoch-0002.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))

    assert main(["visualize", "--checkpoint", str(out / "checkpoints" / "encoder-0002.pth")]) == 1
    err = capsys.readouterr().err
    assert "holds no decoder" in err and "not an encoder export" in err and err.count("\n") == 1

    assert main(["plot", str(out), "--output", str(tmp_path / "curves.png")]) == 0
    with Image.open(tmp_path / "curves.png") as png:
        assert png.size == (1200, 480)  # loss and lr panels; no accuracy in pretraining
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fcmae: error: ") and "empty" in err and err.count("\n") == 1
