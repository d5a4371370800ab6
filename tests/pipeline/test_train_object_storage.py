"""Checkpoints on object storage (paths.checkpoints: s3://...), against a local S3-compatible
server (moto, tests/s3.py): the stage run as a user runs it, interrupted and resumed."""

from __future__ import annotations

import os
import subprocess
import time

import pandas as pd
import psutil
import pytest
from pyarrow import fs

from pipeline import run_store
from pipeline.params import load_params
from tests.conftest import free_port
from tests.pipeline.test_train import _runs, _steps
from tests.s3 import BUCKET, moto_s3

EPOCHS = 10


@pytest.mark.parametrize(
    "value, expected",
    [
        ("s3://bucket/x", "s3://bucket/x"),
        ("s3://bucket/x/", "s3://bucket/x"),
        ("gs://bucket/a/b", "gs://bucket/a/b"),
        ("ckpt", os.path.join(os.getcwd(), "ckpt")),
    ],
)
def test_storage_location_keeps_uris_and_makes_paths_absolute(value, expected):
    assert run_store.location(value) == expected


def _committed(uri: str) -> bool:
    """Whether Ray's controller has taken in a checkpoint (its snapshot names one), read from
    the object store as Ray wrote it. Checkpoints are committed in order: epoch 0 first."""
    filesystem, root = fs.FileSystem.from_uri(uri)
    selector = fs.FileSelector(root, recursive=True, allow_not_found=True)
    for info in filesystem.get_file_info(selector):
        if info.path.endswith("checkpoint_manager_snapshot.json"):
            with filesystem.open_input_stream(info.path) as f:
                if "epoch_0" in f.read().decode():
                    return True
    return False


def _kill_a_train_worker(stage: subprocess.Popen) -> None:
    """SIGKILL one Ray Train worker of this stage (a descendant of its process: its embedded
    Ray's workers, never another process on the machine)."""
    for proc in psutil.Process(stage.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                proc.kill()
                return
        except psutil.NoSuchProcess:
            continue
    raise AssertionError("no Ray Train worker found under the stage's process")


def _stage(params, env, cwd) -> subprocess.Popen:
    return subprocess.Popen(
        ["retina-vae", "train", "--params", str(params)],
        env=env,
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_checkpoints_on_s3_and_resume_after_a_failure(
    processed, params_file, tmp_path, monkeypatch
):
    with moto_s3("127.0.0.1", free_port()) as aws:
        for key, value in aws.items():  # for this test's own reads of the bucket
            monkeypatch.setenv(key, value)
        uri = f"s3://{BUCKET}/runs"
        path = params_file(
            # enough epochs (each ~0.3 s plus its S3 checkpoint) that the kill lands while the
            # run is training: the kill follows the first commit within a second
            train={"epochs": EPOCHS, "num_workers": 2, "image_every": 100, "max_failures": 0},
            paths={"checkpoints": uri},
            cluster={"forward_env": sorted(aws)},
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        first = _stage(path, env, tmp_path)
        deadline = time.monotonic() + 300
        while not _committed(uri) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[1][-2000:]  # still training
        _kill_a_train_worker(first)  # a lost node, say: no restarts left, the stage fails
        _, err = first.communicate(timeout=120)
        assert first.returncode == 1, err[-2000:]
        assert err.strip().splitlines()[-1].startswith("retina-vae train: error: training failed")
        assert not (tmp_path / "s3:").exists()  # the URI was not taken for a local path

        second = _stage(path, env, tmp_path)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 0, err[-2000:]

        assert "resuming after epoch" in err
        history = pd.read_csv(load_params(path).paths.train_history)
        assert history["epoch"].tolist() == list(range(EPOCHS))
        (run,) = _runs(path)
        assert run.info.status == "FINISHED"
        steps = _steps(path, run.info.run_id, "train/neg_elbo")
        # the second run went on from the S3 checkpoint: epoch 0 (committed there before the
        # kill) was trained and logged once
        assert sorted(set(steps)) == list(range(EPOCHS)) and steps.count(0) == 1
        filesystem, root = fs.FileSystem.from_uri(uri)
        names = {
            i.base_name for i in filesystem.get_file_info(fs.FileSelector(root, recursive=True))
        }
        assert {"run.json", "checkpoint.pt", f"epoch_{EPOCHS - 1:06d}"} <= names
