"""Experiment trackers as sinks of the Run, against the real libraries: an MLflow tracking
server started here (`mlflow server`, SQLite backend) and the embedded SQLite store, read back
with mlflow.MlflowClient; W&B offline, read back with the wandb package's own reader of its
run files."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from helpers import free_port, write_image_folder
from mlflow import MlflowClient

from fcmae.cli import main
from fcmae.config.commands import PretrainConfig
from fcmae.config.schema import resolve
from fcmae.pretrain import job
from fcmae.train.callbacks import Callback

TINY = {
    "epochs": 2,
    "demo_images": 16,
    "batch_size": 8,
    "input_size": 64,
    "recon_every": 1,
    "num_workers": 0,
    "device": "cpu",
}


def args(out, **extra):
    """`fcmae pretrain` on 16 demo crops of 64 px, to out."""
    values = {**TINY, "output_dir": out, **extra}
    argv = ["pretrain"]
    for key, value in values.items():
        flag = f"--{key.replace('_', '-')}"
        argv += [flag, *value] if isinstance(value, tuple) else [flag, str(value)]
    return argv


class Server:
    """`mlflow server` on a free local port, its store and artifacts in root."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        command = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--backend-store-uri", f"sqlite:///{self.root / 'store.db'}"]
        command += ["--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)
        self.process = None


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    write_image_folder(root / "train", classes=2, per_class=6, size=64, seed=0)
    write_image_folder(root / "val", classes=2, per_class=3, size=64, seed=1)
    return root


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A fresh working folder, no tracking URI: the default store is ./runs/mlflow.db."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return tmp_path


def tracked_id(run: Path, uri: str) -> str:
    return json.loads((run / "trackers.json").read_text())["mlflow"][uri]


def expected_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """TYPE/KEY -> [(step, value)] of every number of the step and epoch records."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["type"] not in ("step", "epoch"):
            continue
        for key, value in record.items():
            if key not in ("type", "step") and type(value) in (int, float):
                out.setdefault(f"{record['type']}/{key}", []).append((record["step"], value))
    return out


def artifacts(client: MlflowClient, run_id: str, under=None) -> dict[str, int]:
    found = {}
    for f in client.list_artifacts(run_id, under):
        found.update(artifacts(client, run_id, f.path) if f.is_dir else {f.path: f.file_size})
    return found


def assert_mirrors(client: MlflowClient, run_id: str, run: Path) -> None:
    """The MLflow run holds the run directory: parameters = config.yaml, every metric's
    history = metrics.jsonl, the documents, pictures and final export."""
    mlflow_run = client.get_run(run_id)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert mlflow_run.data.params == {key: str(value) for key, value in config.items()}
    expected = expected_metrics(run)
    assert set(mlflow_run.data.metrics) == set(expected)
    for key, points in expected.items():
        history = client.get_metric_history(run_id, key)
        assert sorted((m.step, m.value) for m in history) == sorted(points), key
    held = artifacts(client, run_id)
    epochs = config["epochs"]
    files = ["config.yaml", "identity.yaml", f"checkpoints/encoder-{epochs:04d}.pth"]
    files += [f"recon/{p.name}" for p in (run / "recon").glob("*.png")]
    for name in files:
        assert held[name] == (run / name).stat().st_size, name
    assert not any(name.startswith("checkpoints/checkpoint-") for name in held)


def test_the_embedded_store_mirrors_a_run_and_its_resume(here, capsys):
    run = here / "runs" / "a"
    assert main(args(run, track=("mlflow",))) == 0
    uri = f"sqlite:///{here / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = tracked_id(run, uri)
    assert_mirrors(client, run_id, run)
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.info.run_name == "runs/a"
    assert client.get_experiment(mlflow_run.info.experiment_id).name == "fcmae"
    tags = mlflow_run.data.tags
    assert tags["fcmae.version"] == "0.1.0" and tags["fcmae.command"] == "fcmae pretrain"
    identity = yaml.safe_load((run / "identity.yaml").read_text())["settings"]
    assert {key: tags[key] for key in identity} == {k: str(v) for k, v in identity.items()}
    assert (here / "runs" / "mlartifacts").is_dir()  # artifacts beside the store

    # a resume with a change accepted (and more epochs) continues the same MLflow run
    more = args(run, track=("mlflow",), epochs=3, mask_ratio=0.5, accept_changes="mask_ratio")
    assert main(more) == 0
    assert tracked_id(run, uri) == run_id
    assert len(client.search_runs([mlflow_run.info.experiment_id])) == 1
    tags = client.get_run(run_id).data.tags
    assert tags["fcmae.changed.mask_ratio"] == "0.6 -> 0.5" and tags["mask_ratio"] == "0.5"
    assert tags["fcmae.changed.epochs"] == "2 -> 3"
    params = client.get_run(run_id).data.params
    assert params["mask_ratio"] == "0.6"  # MLflow keeps a parameter's first value
    history = client.get_metric_history(run_id, "step/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    expected = expected_metrics(run)
    assert sorted((m.step, m.value) for m in history) == sorted(expected["step/loss"])
    held = artifacts(client, run_id)
    assert (
        held["checkpoints/encoder-0003.pth"]
        == (run / "checkpoints/encoder-0003.pth").stat().st_size
    )
    downloaded = Path(client.download_artifacts(run_id, "config.yaml", str(here)))
    assert downloaded.read_bytes() == (run / "config.yaml").read_bytes()  # the new one
    assert tags["fcmae.accepted.mask_ratio"] == "0.6 -> 0.5 at step 4"
    back = args(run, track=("mlflow",), epochs=4, mask_ratio=0.6, accept_changes="mask_ratio")
    assert main(back) == 0  # the setting back at the parameter's value: no stale tag
    tags = client.get_run(run_id).data.tags
    assert "fcmae.changed.mask_ratio" not in tags and tags["mask_ratio"] == "0.6"
    assert tags["fcmae.accepted.mask_ratio"] == "0.6 -> 0.5 at step 4; 0.5 -> 0.6 at step 6"
    assert "fcmae.changed.accept_changes" not in tags


def test_a_server_stopped_mid_run_costs_one_warning_and_track_adds_the_rest(
    here, tmp_path_factory, monkeypatch
):
    server = Server(tmp_path_factory.mktemp("server"))
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)

    class StopTheServer(Callback):
        def on_epoch_end(self, ctx):
            if ctx.epoch == 1:
                server.stop()  # really: the process ends, its port refuses

    run = here / "runs" / "b"
    cfg = resolve(
        PretrainConfig, flags={**TINY, "epochs": 3, "output_dir": str(run), "track": ("mlflow",)}
    )
    try:
        job.run(cfg, [StopTheServer()])  # training goes on
        said = (run / "log.txt").read_text()
        assert said.count(f"MLflow at {server.uri} failed") == 1
        assert "fcmae track" in said
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2, 3]
        assert (run / "checkpoints" / "encoder-0003.pth").is_file()
        assert len(list((run / "recon").glob("*.png"))) == 3

        untracked = here / "runs" / "c"  # trained without a tracker
        assert main(args(untracked)) == 0
        assert not (untracked / "trackers.json").exists()

        server.start()  # back, on the same port and store
        client = MlflowClient(server.uri)
        run_id = tracked_id(run, server.uri)
        assert len(client.get_metric_history(run_id, "step/loss")) < 6  # what it missed
        assert main(["track", str(run), str(untracked), "--track", "mlflow"]) == 0
        assert tracked_id(run, server.uri) == run_id
        for folder in (run, untracked):
            assert_mirrors(client, tracked_id(folder, server.uri), folder)
            assert client.get_run(tracked_id(folder, server.uri)).info.status == "FINISHED"

        def snapshot():
            runs = client.search_runs([client.get_experiment_by_name("fcmae").experiment_id])
            return [
                (
                    r.info.run_id,
                    r.info.end_time,
                    r.data.params,
                    r.data.tags,
                    {k: len(client.get_metric_history(r.info.run_id, k)) for k in r.data.metrics},
                    artifacts(client, r.info.run_id),
                )
                for r in runs
            ]

        before = snapshot()
        assert main(["track", str(run), str(untracked), "--track", "mlflow"]) == 0
        assert snapshot() == before  # the second call adds nothing
    finally:
        server.stop()


def test_a_sweep_is_a_parent_run_with_its_points_nested(here, labelled, monkeypatch):
    out = here / "runs" / "sweep"
    argv = ["sweep", "--data", str(labelled / "train"), "--eval-data", str(labelled)]
    argv += ["--set", "mask_ratio=0.5,0.75", "--probe-epochs", "0", "--knn-k", "3"]
    argv += ["--monitor-data", str(labelled), "--monitor-every", "1"]
    argv += ["--input-size", "64", "--batch-size", "4", "--effective-batch", "none"]
    argv += ["--epochs", "2", "--warmup-epochs", "0", "--recon-every", "0", "--num-workers", "0"]
    argv += ["--device", "cpu", "--output-dir", str(out), "--track", "mlflow", "wandb"]
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(here / "no-netrc"))  # W&B offline
    assert main(argv) == 0
    uri = f"sqlite:///{here / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    parent = tracked_id(out, uri)
    assert client.get_run(parent).data.tags["fcmae.command"] == "fcmae sweep"
    assert client.get_run(parent).data.params["set"] == "mask_ratio"
    assert "mask_ratio" not in client.get_run(parent).data.params  # swept: no one value
    held = artifacts(client, parent)
    for name in ("results.csv", "results.md", "results.png", "sweep.yaml"):
        assert held[name] == (out / name).stat().st_size
    experiment = client.get_run(parent).info.experiment_id
    points = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["sweep.value"] for r in points) == ["0.5", "0.75"]
    for point in points:
        assert point.data.tags["sweep.key"] == "mask_ratio"
        folder = out / f"mask_ratio={point.data.tags['sweep.value']}"
        assert point.info.run_id == tracked_id(folder, uri)
        assert_mirrors(client, point.info.run_id, folder)
        knn = client.get_metric_history(point.info.run_id, "epoch/knn_acc1")  # the monitor
        assert [m.step for m in knn] == [r[0] for r in expected_metrics(folder)["epoch/knn_acc1"]]
        assert len(knn) == 2
    assert len(client.search_runs([experiment])) == 3  # the probes are not runs of their own
    groups = {}  # W&B: the sweep's run and its points' in one group
    for offline in (here / "runs" / "wandb").glob("offline-run-*"):
        for kind, record in wandb_records(offline):
            if kind == "run":
                groups[record.run.display_name] = record.run.run_group
    points = [f"runs/sweep/mask_ratio={v}" for v in ("0.5", "0.75")]
    assert groups == dict.fromkeys(["runs/sweep", *points], "runs/sweep")

    # the same sweep uploaded from its files into another store: the same nesting, once
    other = f"sqlite:///{here / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert main(["track", str(out), "--track", "mlflow"]) == 0
    client = MlflowClient(other)
    parent = tracked_id(out, other)
    nested = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(r.data.tags["sweep.value"] for r in nested) == ["0.5", "0.75"]
    for point in nested:
        folder = out / f"mask_ratio={point.data.tags['sweep.value']}"
        assert_mirrors(client, point.info.run_id, folder)
    before = [(r.info.run_id, r.info.end_time) for r in client.search_runs([experiment])]
    assert main(["track", str(out), "--track", "mlflow"]) == 0
    assert [(r.info.run_id, r.info.end_time) for r in client.search_runs([experiment])] == before


def wandb_records(run_dir: Path):
    """(kind, record) of a W&B offline run's .wandb file, read by wandb's own datastore."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(next(run_dir.glob("*.wandb"))))
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        yield record.WhichOneof("record_type"), record


def wandb_history(run_dir: Path) -> dict[str, list]:
    """name -> [(step, value)] of a W&B offline run's history; a picture by its caption."""
    history = {}
    for kind, record in wandb_records(run_dir):
        for item in record.history.item if kind == "history" else ():
            name, *part = item.nested_key or [item.key]  # a picture: recon/caption, ...
            if part in ([], ["caption"]):
                value = (record.history.step.num, json.loads(item.value_json))
                history.setdefault(name, []).append(value)
    return history


def test_wandb_offline_holds_the_config_and_the_history(here, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(here / "no-netrc"))  # not logged in: offline
    run = here / "runs" / "w"
    assert main(args(run, track=("wandb",))) == 0
    kept = json.loads((run / "trackers.json").read_text())["wandb"]
    offline = list((here / "runs" / "wandb").glob(f"offline-run-*-{kept['id']}"))
    assert len(offline) == 1
    config, history = {}, wandb_history(offline[0])
    for kind, record in wandb_records(offline[0]):
        if kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        if kind == "run":
            assert record.run.display_name == "runs/w"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {key: config[key] for key in saved} == saved
    for key, points in expected_metrics(run).items():
        assert history[key] == points, key
    pictures = history["recon"]
    assert pictures == [(2, "epoch-0001.png"), (4, "epoch-0002.png")]  # at their epochs' steps
    files = offline[0] / "files"
    assert (files / "fcmae" / "config.yaml").read_bytes() == (run / "config.yaml").read_bytes()
    assert kept["exports"] == ["encoder-0002.pth"] and kept["step"] == 4

    # `fcmae track` uploads a run trained without W&B whole, epoch records too
    plain = here / "runs" / "plain"
    assert main(args(plain)) == 0
    assert main(["track", str(plain), "--track", "wandb"]) == 0
    uploaded = json.loads((plain / "trackers.json").read_text())["wandb"]["id"]
    (folder,) = (here / "runs" / "wandb").glob(f"offline-run-*-{uploaded}")
    history = wandb_history(folder)
    for key, points in expected_metrics(plain).items():
        assert history[key] == points, key

    # `fcmae track` adds nothing to what the run sent, and a resume continues the same run
    assert main(["track", str(run), "--track", "wandb"]) == 0
    assert len(list((here / "runs" / "wandb").glob("offline-run-*"))) == 2
    assert main(args(run, track=("wandb",), epochs=3)) == 0
    again = json.loads((run / "trackers.json").read_text())["wandb"]
    assert again["id"] == kept["id"] and again["step"] == 6
    resumed = sorted((here / "runs" / "wandb").glob(f"offline-run-*-{kept['id']}"))
    steps = [r.history.step.num for kind, r in wandb_records(resumed[-1]) if kind == "history"]
    assert len(resumed) == 2 and steps == [5, 6]  # only the new steps


@pytest.mark.parametrize("save_every, kept", [(1, 4), (10, 0)])  # a checkpoint at step 4, none
def test_an_interrupted_run_resumed_says_which_steps_mlflow_holds_twice(here, save_every, kept):
    class Interrupt(Callback):
        def on_step_end(self, ctx):
            if ctx.step == 6:  # step 5 logged, after the checkpoint of epoch 2 if any
                raise KeyboardInterrupt

    run = here / "runs" / "i"
    flags = {**TINY, "epochs": 3, "output_dir": str(run), "track": ("mlflow",)}
    flags["save_every"] = save_every
    with pytest.raises(KeyboardInterrupt):
        job.run(resolve(PretrainConfig, flags=flags), [Interrupt()])
    uri = f"sqlite:///{here / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = tracked_id(run, uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert main(args(run, track=("mlflow",), epochs=3, save_every=save_every)) == 0
    said = (run / "log.txt").read_text()
    assert f"holds what the interrupted run logged after step {kept}, up to step 5" in said
    assert client.get_run(run_id).data.tags["fcmae.relogged_after_step"] == str(kept)
    history = sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "step/loss"))
    assert [step for step, _ in history] == sorted([*range(1, 7), *range(kept + 1, 6)])
    latest = max(
        client.get_metric_history(run_id, "step/loss"), key=lambda m: (m.step, m.timestamp)
    )
    assert (latest.step, latest.value) == expected_metrics(run)["step/loss"][-1]
