"""The shared training loop, on a tiny stand-in model (the engine knows no model)."""

import io
import json
import logging
import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import fcmae
from fcmae.config.commands import TrainConfig
from fcmae.errors import UserError
from fcmae.run.files import temporary_name
from fcmae.run.manifest import Manifest
from fcmae.run.run import Run
from fcmae.train.callbacks import Callback
from fcmae.train.distributed import DistInfo
from fcmae.train.engine import Engine
from fcmae.train.failures import NonFiniteLoss
from fcmae.train.optim import lr_at, param_groups
from fcmae.train.progress import Progress
from fcmae.train.runtime import Runtime, seed_everything


class Pairs(Dataset):
    """x (4,) -> y = sum(x) + noise, fixed by the index."""

    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def make_model():
    # Dropout makes the run depend on the random state, which resume must restore.
    return nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Dropout(0.2), nn.Linear(16, 1))


def mse_step(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y), {"abs_err": (model(x) - y).abs().mean()}


def config(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path / "run"),
        device="cpu",
        epochs=4,
        warmup_epochs=1,
        batch_size=8,
        effective_batch=None,
        blr=0.5,
        min_lr=0.0,
        weight_decay=0.0,
        betas=(0.9, 0.999),
        num_workers=0,
        save_every=1,
    )
    return TrainConfig(**{**values, **overrides})


def train(cfg, step=mse_step, dataset=None, model=make_model, **fit_kwargs):
    """A run as a job opens it, fitting a fresh model(); returns (the model, final record)."""
    runtime = Runtime.for_training(cfg)
    with Run.open(cfg, runtime.dist) as run:
        seed_everything(cfg.seed)
        trained = model()
        result = Engine(cfg, run, runtime).fit(trained, dataset or Pairs(), step, **fit_kwargs)
    return trained, result


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def test_lr_warms_up_linearly_then_follows_a_half_cosine():
    lr = lambda e: lr_at(e, base_lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=12)  # noqa: E731
    assert lr(0) == 0 and lr(1) == pytest.approx(0.5) and lr(2) == pytest.approx(1.0)
    assert lr(7) == pytest.approx(0.55)  # half way through the cosine: the mean
    assert lr(12) == pytest.approx(0.1)
    assert lr(2.5) > lr(3) > lr(11)


def test_no_weight_decay_on_biases_norms_grn_and_mask_token():
    model = fcmae.create_model("fcmae_convnextv2_atto")
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "mask_token" in skipped and "encoder.stages.0.0.grn.gamma" in skipped
    assert "encoder.stages.0.0.grn.beta" in skipped and "encoder.stages.0.0.norm.weight" in skipped
    assert all(n.endswith(".weight") and "norm" not in n for n in decayed)
    assert "encoder.stages.0.0.pwconv1.weight" in decayed and "pred.weight" in decayed
    assert len(skipped) + len(decayed) == len(names)


def test_fit_trains_and_writes_the_run_directory(tmp_path):
    cfg = config(tmp_path, keep_last=2)
    _, result = train(cfg, exports={"head": lambda m: m[3].state_dict()})
    run = tmp_path / "run"
    epochs = records(run, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4]
    assert epochs[-1]["loss"] < 0.5 * epochs[0]["loss"]
    steps = records(run, "step")
    assert len(steps) == 4 * 8 and [r["step"] for r in steps] == list(range(1, 33))
    assert {"loss", "lr", "img_per_s", "abs_err"} <= set(steps[0])
    assert records(run, "run")[0]["steps_per_epoch"] == 8
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert "output_dir: " in (run / "config.yaml").read_text()
    assert "Done. Checkpoint:" in (run / "log.txt").read_text()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["checkpoint-0003.pth", "checkpoint-0004.pth", "head-0003.pth", "head-0004.pth"]
    state = torch.load(run / "checkpoints" / "checkpoint-0004.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "rng", "config", "extra"} <= set(state)
    assert (state["epoch"], state["step"], state["config"]["epochs"]) == (4, 32, 4)
    assert result["checkpoint"].endswith("checkpoint-0004.pth")
    assert result["exports"] == {"head": str(run / "checkpoints" / "head-0004.pth")}


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    def step(model, batch):  # no dropout: both runs see the same function
        # Tiny gradients, so AdamW's eps makes the update depend on their scale too.
        pred = model[0](batch[0]).sum(1, keepdim=True)
        return 1e-7 * nn.functional.mse_loss(pred, batch[1]), {}

    big, _ = train(config(tmp_path / "a", batch_size=16, epochs=2), step)
    small, _ = train(config(tmp_path / "b", batch_size=4, accum_iter=4, epochs=2), step)
    [big_run] = records(tmp_path / "a" / "run", "run")
    [small_run] = records(tmp_path / "b" / "run", "run")
    assert (big_run["accum_iter"], small_run["accum_iter"]) == (1, 4)
    assert big_run["steps_per_epoch"] == small_run["steps_per_epoch"] == 4
    for p, q in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_each_epoch_sees_a_new_order_that_a_rerun_repeats(tmp_path):
    runtime = Runtime.for_training(config(tmp_path))
    order = lambda epoch: torch.cat([y for _, y in runtime.loader(Pairs(), 8, epoch)])  # noqa: E731
    assert not torch.equal(order(0), order(1)) and torch.equal(order(1), order(1))


def test_effective_batch_sets_accumulation_and_the_lr_rule(tmp_path):
    train(config(tmp_path, batch_size=4, effective_batch=32, blr=1e-3, epochs=1))
    [run] = records(tmp_path / "run", "run")
    assert run["effective_batch"] == 32 and run["accum_iter"] == 8
    assert run["lr"] == pytest.approx(1e-3 * 32 / 256) and run["steps_per_epoch"] == 2


def test_lr_follows_the_schedule_per_iteration(tmp_path):
    cfg = config(tmp_path, blr=256.0, min_lr=0.0, warmup_epochs=1, epochs=3, batch_size=8)
    train(cfg)  # lr = blr * 8 / 256 = 8
    lrs = [r["lr"] for r in records(tmp_path / "run", "step")]
    assert lrs[:3] == pytest.approx([0, 1, 2])  # warmup, 8 steps per epoch
    assert lrs[8] == pytest.approx(8.0) and lrs[-1] == pytest.approx(lr_at(2 + 7 / 8, 8, 0, 1, 3))


class Counter(Callback):
    """A callback with state, as fine-tuning's EMA will be."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, ctx):
        self.steps += 1

    def on_epoch_end(self, ctx):
        return {"val_metric": float(ctx.epoch)}

    def state_dict(self):
        return {"steps": torch.tensor(self.steps)}

    def load_state_dict(self, state):
        self.steps = int(state["steps"])


class StopAt(Callback):
    """Raises mid-epoch, standing in for a killed job."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, ctx):
        if ctx.step == self.step:
            raise KeyboardInterrupt


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    full, _ = train(config(tmp_path / "full"))
    cfg = config(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, callbacks=[StopAt(step=20)])  # in epoch 3; checkpoint-0002 is the last
    assert not (tmp_path / "cut" / "run" / "checkpoints" / "checkpoint-0003.pth").exists()
    resumed, result = train(cfg)
    assert (result["epoch"], result["step"]) == (4, 32)
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    steps = [r["step"] for r in records(tmp_path / "cut" / "run", "step")]
    assert steps == list(range(1, 33))  # the interrupted tail was purged, nothing doubled
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "cut" / "run" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("step/loss")] == list(range(1, 33))
    assert [e.step for e in events.Scalars("epoch/loss")] == [8, 16, 24, 32]


def test_callbacks_run_and_extra_state_is_checkpointed(tmp_path):
    counter = Counter()
    train(config(tmp_path, epochs=2), callbacks=[counter], extra_state={"counter": counter})
    assert counter.steps == 16
    assert [r["val_metric"] for r in records(tmp_path / "run", "epoch")] == [1.0, 2.0]
    again = Counter()
    train(config(tmp_path, epochs=3), callbacks=[again], extra_state={"counter": again})
    assert again.steps == 24  # restored 16, then one more epoch


def corrupt_the_newest_of_two_epochs(tmp_path):
    train(config(tmp_path, epochs=2))
    newest = tmp_path / "run" / "checkpoints" / "checkpoint-0002.pth"
    newest.write_bytes(newest.read_bytes()[:1000])
    return newest


@pytest.fixture
def said(caplog):
    """caplog of the "fcmae" logger, which a run stops propagating to the root logger."""
    logging.getLogger("fcmae").addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="fcmae")
    yield caplog
    logging.getLogger("fcmae").removeHandler(caplog.handler)


def test_resume_skips_a_corrupt_checkpoint_and_says_so(tmp_path, said):
    newest = corrupt_the_newest_of_two_epochs(tmp_path)
    _, result = train(config(tmp_path, epochs=2))
    assert "checkpoint-0002.pth cannot be read" in said.text
    assert "trying the previous one, checkpoint-0001.pth" in said.text
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "Resumed from" in log and "checkpoint-0001.pth (epoch 1, step 8)" in log
    assert result["epoch"] == 2
    assert torch.load(newest, weights_only=True)["epoch"] == 2  # epoch 2 trained again


def test_the_skipped_corrupt_checkpoint_is_in_the_runs_log(tmp_path):
    corrupt_the_newest_of_two_epochs(tmp_path)
    train(config(tmp_path, epochs=2))
    assert "checkpoint-0002.pth cannot be read" in (tmp_path / "run" / "log.txt").read_text()


def test_a_finished_run_has_nothing_to_do(tmp_path):
    train(config(tmp_path, epochs=1))
    _, result = train(config(tmp_path, epochs=1))
    assert (result["epoch"], result["step"]) == (1, 8)
    assert result["checkpoint"].endswith("checkpoint-0001.pth")
    assert "Nothing to do" in (tmp_path / "run" / "log.txt").read_text()
    assert len(records(tmp_path / "run", "step")) == 8  # not one step more


def test_resume_none_refuses_to_overwrite_checkpoints(tmp_path):
    train(config(tmp_path, epochs=1))
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(config(tmp_path, epochs=1, resume="none"))


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    train(config(tmp_path, epochs=1))
    with pytest.raises(UserError, match="does not fit this model"):
        train(config(tmp_path, epochs=2), model=lambda: nn.Linear(4, 1))


@pytest.mark.parametrize(
    "lr_flags, named", [({}, "--blr (e.g. 0.25)"), ({"lr": 0.2}, "--lr (e.g. 0.1)")]
)
def test_nan_loss_stops_without_saving_and_says_how_to_resume(tmp_path, lr_flags, named):
    def step(model, batch):
        loss, metrics = mse_step(model, batch)
        return (loss * math.nan if engine_step[0] >= 12 else loss), metrics

    class Track(Callback):
        def on_step_end(self, ctx):
            engine_step[0] = ctx.step

    engine_step = [0]
    with pytest.raises(NonFiniteLoss) as e:
        train(config(tmp_path, **lr_flags), step, callbacks=[Track()])
    message = str(e.value)
    assert "nan at epoch 2, step 5" in message and "checkpoint-0001.pth" in message
    assert f"--resume auto and a lower {named}." in message  # the run is fp32 already
    assert not (tmp_path / "run" / "checkpoints" / "checkpoint-0002.pth").exists()
    assert message in (tmp_path / "run" / "log.txt").read_text()


def test_exports_are_written_before_their_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "run" / "checkpoints"
    seen = []

    def head(model):  # the second export: the first is on disk, the checkpoint not yet
        seen.append(sorted(p.name for p in ckpt_dir.iterdir()))
        return {"model": model[3].state_dict()}

    exports = {"encoder": lambda m: {"model": m.state_dict()}, "head": head}
    train(config(tmp_path, epochs=2, keep_last=1), exports=exports)
    assert seen == [
        ["encoder-0001.pth"],
        ["checkpoint-0001.pth", "encoder-0001.pth", "encoder-0002.pth", "head-0001.pth"],
    ]
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert names == ["checkpoint-0002.pth", "encoder-0002.pth", "head-0002.pth"]


def interrupt_the_save_of_epoch_2(tmp_path):
    """A run killed in the save of epoch 2: its first export written, then (as a kill while
    the checkpoint is written leaves it) the checkpoint's staging file. Returns their paths
    and the run's exports."""
    ckpt_dir = tmp_path / "run" / "checkpoints"

    def head(model):
        if (ckpt_dir / "encoder-0002.pth").exists():
            raise KeyboardInterrupt
        return {"model": model[3].state_dict()}

    exports = {"encoder": lambda m: {"model": m.state_dict()}, "head": head}
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path, epochs=2), exports=exports)
    half = temporary_name(Manifest(tmp_path / "run").claim(ckpt_dir / "checkpoint-0002.pth"))
    half.write_bytes(b"half a checkpoint")
    return [half, ckpt_dir / "encoder-0002.pth"], exports


def test_what_an_interrupted_save_of_the_run_left_is_cleaned_at_start(tmp_path, said):
    left, exports = interrupt_the_save_of_epoch_2(tmp_path)
    train(config(tmp_path, epochs=1), exports=exports)  # nothing to train: only the clean-up
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["checkpoint-0001.pth", "encoder-0001.pth", "head-0001.pth"]
    for path in left:
        assert f"Removing {path}, left by an interrupted save." in said.text


def test_the_clean_up_is_in_the_runs_log(tmp_path):
    left, exports = interrupt_the_save_of_epoch_2(tmp_path)
    train(config(tmp_path, epochs=1), exports=exports)
    assert f"Removing {left[0]}" in (tmp_path / "run" / "log.txt").read_text()


def test_out_of_memory_names_the_knob(tmp_path):
    def step(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with pytest.raises(UserError, match="lower --batch-size"):
        train(config(tmp_path), step)


def test_a_dataset_smaller_than_one_step_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="smaller than one optimizer step"):
        train(config(tmp_path, batch_size=128))


def test_output_dir_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="Cannot write .*file/run.*a part of the path is a file"):
        train(config(tmp_path, output_dir=str(tmp_path / "file" / "run")))
    assert (tmp_path / "file").read_text() == "x"


def test_fp16_needs_a_gpu_and_bf16_runs_on_cpu(tmp_path):
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        train(config(tmp_path, precision="fp16"))
    assert not (tmp_path / "run").exists()
    _, result = train(config(tmp_path, precision="bf16", epochs=1))
    assert records(tmp_path / "run", "run")[0]["precision"] == "bf16"
    assert math.isfinite(result["loss"])


def test_gradient_clipping_is_applied_and_logged(tmp_path):
    train(config(tmp_path, epochs=1, clip_grad=1e-3, blr=256.0))
    steps = records(tmp_path / "run", "step")
    assert all("grad_norm" in r for r in steps)


STEP = {"loss": 0.5, "lr": 1e-3, "img_per_s": 100.0}


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_redraws_one_line_on_a_terminal_and_prints_lines_in_a_file(caplog):
    terminal = Terminal()
    progress = Progress(epochs=2, steps_per_epoch=20, stream=terminal)
    for i in range(20):
        progress.update(0, i, STEP, eta_s=3725)
    progress.end_epoch()
    shown = terminal.getvalue()
    assert shown.startswith("\r") and shown.endswith("\n") and shown.count("\n") == 1
    assert "epoch 1/2  step 20/20  loss 0.5000  lr 1.00e-03  100.0 img/s  eta 1:02:05" in shown
    with caplog.at_level("INFO", logger="fcmae"):
        progress = Progress(epochs=2, steps_per_epoch=20, stream=io.StringIO())
        for i in range(20):
            progress.update(1, i, STEP, eta_s=0)
    assert len(caplog.records) == 10 and "step 20/20" in caplog.records[-1].message


def test_a_second_run_on_the_same_directory_is_refused_until_the_first_ends(tmp_path):
    cfg = config(tmp_path)
    with Run.open(cfg, DistInfo()) as first:
        first.begin()  # the lock is taken when the run begins writing
        with pytest.raises(UserError, match="Another run is using .*; wait for it to end"):
            with Run.open(cfg, DistInfo()) as second:
                second.begin()
    with Run.open(cfg, DistInfo()) as third:  # free again
        third.begin()
