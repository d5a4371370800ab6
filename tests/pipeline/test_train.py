"""The train stage end to end: real Ray workers, a real MLflow sqlite store, real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import pipeline.train as train
from pipeline.params import load_params
from pipeline.tracking import resolve_tracking_uri, using_uri
from tests.conftest import free_port, write_params, write_processed
from vae_core.checkpoint import load_checkpoint, read_checkpoint

# The kill helpers below run inside Ray workers: ship them by value, not by module name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _runs(params_path: Path) -> list:
    params = load_params(params_path)
    client = MlflowClient(resolve_tracking_uri(params.tracking))
    exp = client.get_experiment_by_name(params.tracking.experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def _steps(params_path: Path, run_id: str, key: str) -> list[int]:
    client = MlflowClient(resolve_tracking_uri(load_params(params_path).tracking))
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ----------------------------------------------------------------------------- kill helpers


class HoldingDataset:
    """Wraps a dataset; on rank 1, once ``after`` items were read and ``armed`` exists, it
    writes its pid to ``pid_file`` and waits there for the test to kill the process."""

    def __init__(self, inner, armed: str, pid_file: str, after: int) -> None:
        self.inner, self.armed, self.pid_file, self.after = inner, armed, pid_file, after
        self.calls = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        import ray.train

        self.calls += 1
        rank = ray.train.get_context().get_world_rank()
        if rank == 1 and self.calls > self.after and os.path.exists(self.armed):
            Path(self.pid_file).write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while os.path.exists(self.armed) and time.monotonic() < deadline:
                time.sleep(0.05)
        return self.inner[i]


class KillableData(train.ProcessedData):
    """ProcessedData whose train split holds rank 1 for the kill; logs every worker start."""

    armed = pid_file = starts = ""
    after = 0

    def __call__(self):
        with open(self.starts, "a") as f:
            f.write(f"{os.getpid()}\n")
        train_ds, val_ds = super().__call__()
        return HoldingDataset(train_ds, self.armed, self.pid_file, self.after), val_ds


def _arm(monkeypatch, tmp_path: Path, after: int) -> tuple[Path, Path, Path]:
    armed, pid_file, starts = tmp_path / "armed", tmp_path / "pid", tmp_path / "starts"
    armed.write_text("1")
    cls = type(
        "Killable",
        (KillableData,),
        {"armed": str(armed), "pid_file": str(pid_file), "starts": str(starts), "after": after},
    )
    monkeypatch.setattr(train, "ProcessedData", cls)
    return armed, pid_file, starts


def _registered(checkpoints: Path, epoch: int) -> bool:
    """Whether Ray's controller has committed the checkpoint of ``epoch`` (a report only
    counts once the controller has taken it in; a worker killed before that loses it)."""
    for snapshot in checkpoints.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if f"epoch_{epoch:06d}" in snapshot.read_text():
                return True
        except OSError:
            pass
    return False


def _killer(armed: Path, pid_file: Path, checkpoints: Path, epoch: int) -> threading.Thread:
    """SIGKILL rank 1 once it waits and the checkpoint of ``epoch`` is committed."""

    def run() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if pid_file.exists() and _registered(checkpoints, epoch):
                pid = int(pid_file.read_text())
                armed.unlink()
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


# ----------------------------------------------------------------------------- tests


def test_a_second_training_on_the_host_is_told_how_to_share_the_cores(
    ray_session, params_file, caplog, monkeypatch
):
    """`dvc exp run -j 2` on 2 cores: a train stage already runs (a real process with that
    command line); this one, asking 2 workers, says in one line to take 1 as it joins Ray."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # CI's machine, whatever this one has
    argv = [sys.executable, "-c", "import time; time.sleep(300)", "-m", "pipeline.cli", "train"]
    other = subprocess.Popen(argv)
    try:
        params = load_params(params_file(train={"num_workers": 2, "cpus_per_worker": 1}))
        train.connect(params, params.tracking.uri)
    finally:
        other.kill()
        other.wait()
    (line,) = [r.getMessage() for r in caplog.records if "other training" in r.getMessage()]
    assert line.startswith(f"train: 1 other training(s) run on this host (pid {other.pid}); ")
    assert "asks 2 worker(s) x 1 CPU of 2 cores" in line
    assert line.endswith("<= 1 - see README, Queued experiments")


@pytest.mark.slow
def test_two_workers_train_and_log_one_mlflow_run(ray_session, processed, params_file):
    path = params_file(
        train={"epochs": 2, "num_workers": 2, "image_every": 1},
        tracking={"register_model": "retina-encoder"},
    )
    params = load_params(path)
    assert train.main(["--params", str(path)]) == 0

    model = load_checkpoint(params.paths.model)
    extra = read_checkpoint(params.paths.model)["extra"]
    assert extra == {
        **train.checkpoint_extra(params, Path(params.paths.processed)),
        "mlflow_run_id": extra["mlflow_run_id"],
    }
    assert model.config.height == 32 and model.config.latent_dim == 4

    history = pd.read_csv(params.paths.train_history)
    assert history["epoch"].tolist() == [0, 1]
    assert np.isfinite(history[["train_neg_elbo", "val_neg_elbo"]].to_numpy()).all()
    metrics = json.loads(Path(params.paths.train_metrics).read_text())
    assert metrics["epochs"] == 2 and metrics["workers"] == 2
    assert metrics["val"]["neg_elbo"] == pytest.approx(history["val_neg_elbo"].iloc[-1])
    assert metrics["train"]["images"] == 64  # the global count: both ranks all-reduced

    runs = _runs(path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == extra["mlflow_run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.tags["data_hash"] == extra["data_hash"]
    for key in ("train/neg_elbo", "val/neg_elbo", "val/active_units", "train/images_per_s"):
        assert _steps(path, run.info.run_id, key) == [0, 1], key
    assert not [k for k in run.data.metrics if "kl_dim" in k]  # one table instead of J charts
    client = MlflowClient(resolve_tracking_uri(params.tracking))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "checkpoint" in artifacts and "images" in artifacts
    profile = Path(
        client.download_artifacts(run.info.run_id, "training/kl_per_dim.csv", str(path.parent))
    )
    profile = pd.read_csv(profile)
    assert list(profile.columns) == ["split", "epoch", "dim_0", "dim_1", "dim_2", "dim_3"]
    last_val = profile[(profile["split"] == "val") & (profile["epoch"] == 1)]
    assert last_val[[f"dim_{j}" for j in range(4)]].to_numpy().sum() == pytest.approx(
        history["val_kl"].iloc[-1], rel=1e-4
    )  # the dims add up to the KL of the history
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.source_run_id for m in logged] == [run.info.run_id]
    # the model carries the final epoch's metrics, the run's last values, not epoch 0's
    on_model = {
        m.key: (m.step, m.value) for m in client.get_logged_model(logged[0].model_id).metrics
    }
    assert on_model["val/neg_elbo"] == (1, pytest.approx(history["val_neg_elbo"].iloc[-1]))
    for key in ("train/neg_elbo", "val/neg_elbo", "val/active_units"):
        assert on_model[key] == (1, run.data.metrics[key]), key

    import mlflow.pyfunc

    with using_uri(resolve_tracking_uri(params.tracking)):
        served = mlflow.pyfunc.load_model(f"models:/{logged[0].model_id}")
    x = np.load(Path(params.paths.processed) / "val_images.npy")[:3].astype(np.float32) / 255
    assert served.predict(x).shape == (3, 4)  # images -> latent means

    # lineage: the data it learnt from, the code, the experiment's view; the registered model
    (data,) = run.inputs.dataset_inputs
    assert data.dataset.digest == extra["data_hash"][:36]
    assert json.loads(data.dataset.source) == {"uri": params.paths.processed}
    assert json.loads(data.dataset.profile)["train_images"] == 64
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_model_version("retina-encoder", "1").run_id == run.info.run_id
    with using_uri(resolve_tracking_uri(params.tracking)):
        registered = mlflow.pyfunc.load_model("models:/retina-encoder/1")
    np.testing.assert_allclose(registered.predict(x), served.predict(x), rtol=1e-6)


@pytest.mark.parametrize("made_with", ["graham", "none", None])
def test_the_checkpoint_extra_records_how_its_images_were_made(
    processed, params_file, caplog, made_with
):
    """What encode needs to prepare a new image as the training images were prepared, beside
    the hashes of the params and data: as preprocess recorded it beside the images (params
    edited since, with train run by hand, do not change what the images are), else the
    params' values with a warning."""
    if made_with:
        record = {"ingest.modality": "fundus", "preprocess.oct_aspect": "crop",
                  "preprocess.illumination": made_with}  # fmt: skip
        (processed / "preprocessing.json").write_text(json.dumps(record))
    path = params_file(
        ingest={"modality": "fundus"}, preprocess={"oct_aspect": "crop", "illumination": "graham"}
    )
    params = load_params(path)
    assert train.checkpoint_extra(params, processed) == {
        "params_hash": train.params_hash(params),
        "data_hash": train.data_hash(processed),
        "ingest.modality": "fundus",
        "preprocess.oct_aspect": "crop",
        "preprocess.illumination": made_with or "graham",
    }
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    expected = {
        "graham": [],
        "none": ["preprocess.illumination: the processed images were made with none; params "
                 "say graham: the model records none (re-run preprocess to train on images "
                 "made with graham)"],
        None: [f"{processed} does not record how its images were made (preprocessed before it "
               "was kept): the model records the params' ingest.modality, "
               "preprocess.oct_aspect, preprocess.illumination; re-run preprocess to record "
               "them"],
    }[made_with]  # fmt: skip
    assert warned == expected


@pytest.mark.slow
def test_view_objective_and_optimal_scale_train_under_ray_train_with_two_workers(
    ray_session, processed, params_file
):
    """Both views on each worker, DDP across two ranks: the extra terms reach the history and
    MLflow per epoch; validation (clean q(z|x)) reports no view term. The optimal-scale
    likelihood all-reduces each batch's error inside the step and saves its running scale."""
    views = {"view_mask_ratio": 0.5, "view_noise": 0.05, "consistency_weight": 1.0}
    path = params_file(
        train={"epochs": 2, "num_workers": 2, "contrastive_weight": 0.5, **views},
        model={"likelihood": "gaussian_optimal"},
    )
    assert train.main(["--params", str(path)]) == 0
    params = load_params(path)
    variance = load_checkpoint(params.paths.model).likelihood.variance
    assert variance.shape == (1,) and 0 < variance.item() < 1
    assert abs(variance.item() - 0.01) > 1e-6  # moved from its initial sigma = 0.1
    history = pd.read_csv(params.paths.train_history)
    terms = history[["train_consistency", "train_contrastive"]].to_numpy()
    assert terms.shape == (2, 2) and np.isfinite(terms).all() and (terms >= 0).all()
    assert not any(c.startswith("val_con") for c in history.columns)
    (run,) = _runs(path)
    assert run.data.params["train.consistency_weight"] == "1.0"
    assert _steps(path, run.info.run_id, "train/contrastive") == [0, 1]


@pytest.mark.parametrize(
    ("active", "kl_per_dim", "copies", "narrow"),
    [
        (16, [1.0] * 16, None, None),
        (4, [1.0] * 4 + [0.0] * 12, None, None),  # a quarter: no hint
        (3, [1.0] * 3 + [0.001] * 13, 13, None),
        (0, [0.0] * 8, 8, None),
        (2, [0.5] * 2 + [0.0] * 6, None, None),
        # IDRiD with a learned Gaussian scale: Var(mu) ~0.001 everywhere, posterior sd ~0.01,
        # KL of several nats per dim; nothing copies the prior
        (0, [6.0] * 16, None, 16),
        (0, [6.0] * 12 + [0.002] * 4, 4, 12),
        (3, [6.0] * 3 + [0.5] * 8 + [0.0] * 5, 5, 8),  # the 3 active units are not "narrow"
    ],
)
def test_active_units_summary_tells_collapse_from_a_narrow_latent(
    active, kl_per_dim, copies, narrow
):
    text = train.active_units_summary(float(active), kl_per_dim)
    assert text.startswith(f"{active} of {len(kl_per_dim)} latent units active")
    assert ("copy the prior" in text) is (copies is not None)
    assert ("free_bits" in text) is (copies is not None)
    if copies is not None:
        assert f"({copies} copy the prior" in text
    assert ("narrow posteriors" in text) is (narrow is not None)
    if narrow is not None:
        assert f"{narrow} carry KL >= 0.01 nats" in text


@pytest.mark.slow
def test_killed_worker_is_restored_from_the_last_checkpoint(
    ray_session, processed, params_file, tmp_path, monkeypatch
):
    path = params_file(train={"epochs": 3, "num_workers": 2, "max_failures": 2, "image_every": 5})
    # 64 images / 2 ranks = 32 items per rank and epoch: hold rank 1 inside epoch 1.
    armed, pid_file, starts = _arm(monkeypatch, tmp_path, after=32 + 4)
    killer = _killer(armed, pid_file, tmp_path / "checkpoints", epoch=0)
    assert train.main(["--params", str(path)]) == 0
    killer.join(timeout=5)

    assert not armed.exists(), "the worker was never killed"
    assert len(starts.read_text().split()) == 4  # 2 workers, started twice
    history = pd.read_csv(load_params(path).paths.train_history)
    assert history["epoch"].tolist() == [0, 1, 2]
    (run,) = _runs(path)
    assert run.info.status == "FINISHED"
    # Restored at epoch 1, not from scratch: epoch 0 was trained and logged exactly once.
    assert _steps(path, run.info.run_id, "train/neg_elbo") == [0, 1, 2]


@pytest.mark.slow
def test_rerun_after_interruption_resumes_in_the_same_mlflow_run(
    ray_session, processed, params_file, tmp_path, monkeypatch, capsys
):
    path = params_file(train={"epochs": 3, "num_workers": 2, "max_failures": 0, "image_every": 5})
    armed, pid_file, _ = _arm(monkeypatch, tmp_path, after=2 * 32 + 4)  # dies in epoch 2
    killer = _killer(armed, pid_file, tmp_path / "checkpoints", epoch=1)
    assert train.main(["--params", str(path)]) == 1
    killer.join(timeout=5)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("retina-vae train: error: training failed")
    (failed,) = _runs(path)
    assert failed.info.status == "FAILED"
    assert not Path(load_params(path).paths.model).exists()

    monkeypatch.undo()  # the plain data factory again
    assert train.main(["--params", str(path)]) == 0
    (run,) = _runs(path)
    assert run.info.run_id == failed.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("retina_vae.resumed") == "true"
    assert _steps(path, run.info.run_id, "train/neg_elbo") == [0, 1, 2]  # each epoch once
    history = pd.read_csv(load_params(path).paths.train_history)
    assert history["epoch"].tolist() == [0, 1, 2]


def test_missing_preprocess_outputs_is_one_line(tmp_path, capsys):
    path = write_params(tmp_path)
    assert train.main(["--params", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "train_images.npy: not found; run `retina-vae preprocess` first" in err[0]


def test_an_empty_val_split_is_one_line_before_anything_starts(tmp_path, capsys):
    """Its bound and active units would read 0: the best-looking run in a comparison."""
    write_processed(tmp_path, {"train": 16, "val": 0, "test": 4})
    path = write_params(tmp_path)
    assert train.main(["--params", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("retina-vae train: error: ")
    assert "val_images.npy: the val split is empty" in err[0]
    assert "raise preprocess.val_fraction" in err[0]
    assert not (tmp_path / "mlflow.db").exists()  # no run was opened


def test_unreachable_cluster_is_one_line(processed, params_file, capsys):
    path = params_file(cluster={"address": f"127.0.0.1:{free_port()}"})  # nobody there
    assert train.main(["--params", str(path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("retina-vae train: error: cluster.address:") and "unreachable" in line


@pytest.mark.slow
def test_use_gpu_without_gpu_is_one_line(ray_session, processed, params_file, capsys):
    path = params_file(train={"use_gpu": True})
    assert train.main(["--params", str(path)]) == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
    assert len(err) == 1 and "train.use_gpu is true but the Ray cluster has 0 GPU" in err[0]
    assert _runs(path) == []  # nothing was started


@pytest.mark.slow
def test_a_failure_after_training_marks_the_run_failed(
    ray_session, processed, params_file, tmp_path
):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the model's folder should be")  # write_outputs fails
    path = params_file(
        train={"epochs": 1, "num_workers": 2, "image_every": 5},
        paths={"model": str(blocked / "vae.pt")},
    )
    with pytest.raises(OSError):
        train.main(["--params", str(path)])
    (run,) = _runs(path)
    assert run.info.status == "FAILED"  # not left RUNNING


@pytest.mark.parametrize("key", ["cpu_bf16", "cpu_channels_last", "compile"])
def test_cpu_speed_switches_go_from_params_to_the_train_config(tmp_path, key):
    for value in (False, True):
        params = load_params(write_params(tmp_path, train={key: value}))
        assert getattr(train.train_config(params), key) is value
