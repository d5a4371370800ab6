"""What happens when things fail around training (issue 18): real signals sent by PID, a real
``mlflow server`` started and killed here, the stage run as a separate process like a user runs
it. Each test prints a ``MEASURED`` line (pytest -s shows it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

import pipeline.train as train
from pipeline.params import load_params
from tests.conftest import REPO, _wait, free_port
from tests.pipeline.test_train import _registered, _runs, _steps


def _start_stage(
    params: Path, mark: str, stage: str = "train", env: dict[str, str] | None = None
) -> subprocess.Popen:
    """The stage as its own process group (a terminal's foreground job), its processes marked
    with ``mark`` in their environment (Ray's processes inherit it); ``env`` adds variables."""
    env = {**os.environ, **(env or {}), "RETINA_VAE_TEST_MARK": mark}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", stage, "--params", str(params)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a terminal's foreground job gets Ctrl-C even when this suite was started in the
        # background (`cmd &` in a script starts it with SIGINT ignored, and children inherit it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _marked(mark: str) -> list[int]:
    """PIDs of the live processes whose environment carries ``mark``."""
    needle = f"RETINA_VAE_TEST_MARK={mark}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and needle in (proc / "environ").read_bytes()
                and "zombie" not in (proc / "status").read_text().lower()
            ):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _images(params: Path, run_id: str) -> list[str]:
    """The run's image files (one per grid logged; MLflow adds a compressed copy of each)."""
    client = MlflowClient(train.tracking.resolve_tracking_uri(load_params(params).tracking))
    return [
        a.path
        for a in client.list_artifacts(run_id, "images")
        if "+compressed" not in a.path and a.path.endswith(".png")
    ]


def _grid_steps(paths: list[str], key: str) -> list[int]:
    return sorted(int(p.split("+step+")[1].split("+")[0]) for p in paths if f"/{key}+" in p)


# ----------------------------------------------------------------------------- Ctrl-C, SIGKILL


@pytest.mark.slow
def test_ctrl_c_marks_the_run_killed_exits_130_leaves_no_process_and_a_rerun_resumes(
    ray_session, processed, params_file, tmp_path
):
    # ray_session keeps another Ray instance running on this host meanwhile (a shared server);
    # enough epochs that the run is still training when Ctrl-C comes after the first checkpoint
    # (a tiny epoch takes well under a second)
    epochs = 30
    path = params_file(train={"epochs": epochs, "image_every": 10})
    mark = uuid.uuid4().hex
    stage = _start_stage(path, mark)
    _wait(lambda: _registered(tmp_path / "checkpoints", 0), 900, "the first checkpoint")
    assert _marked(mark), "the stage's processes are not visible"
    sent = time.monotonic()
    os.killpg(stage.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole job
    _, err = stage.communicate(timeout=300)
    took = time.monotonic() - sent

    assert stage.returncode == 130
    assert err.strip().splitlines()[-1] == "retina-vae train: interrupted"
    assert "Traceback" not in err and "Found multiple active Ray instances" not in err, err
    (run,) = _runs(path)
    assert run.info.status == "KILLED"
    _wait(lambda: not _marked(mark), 180, "the stage's processes to exit")
    gone = time.monotonic() - sent

    assert train.main(["--params", str(path)]) == 0  # resumes, in the same run
    (resumed,) = _runs(path)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    assert resumed.data.tags.get("retina_vae.resumed") == "true"
    assert _steps(path, run.info.run_id, "train/neg_elbo") == list(range(epochs))
    print(f"MEASURED Ctrl-C: exit 130 after {took:.1f} s, no process left after {gone:.1f} s")


@pytest.mark.slow
def test_driver_killed_right_after_a_logged_epoch_a_rerun_logs_each_step_once(
    ray_session, processed, params_file, tmp_path
):
    path = params_file(train={"epochs": 3, "image_every": 1})
    mark = uuid.uuid4().hex
    stage = _start_stage(path, mark)

    def epoch_1_logged() -> bool:
        if not list((tmp_path / "checkpoints").glob("*/run.json")):
            return False  # the stage is still creating the store: do not race it
        runs = _runs(path)
        return bool(runs) and 1 in _steps(path, runs[0].info.run_id, "train/neg_elbo")

    _wait(epoch_1_logged, 900, "epoch 2's metrics in MLflow")
    stage.send_signal(signal.SIGKILL)  # the driver only, right after the epoch was logged
    stage.communicate(timeout=60)
    checkpointed = _registered(tmp_path / "checkpoints", 1)
    sent = time.monotonic()
    _wait(lambda: not _marked(mark), 300, "the killed stage's processes to exit")
    gone = time.monotonic() - sent

    assert train.main(["--params", str(path)]) == 0
    (run,) = _runs(path)
    for key in ("train/neg_elbo", "val/kl", "train/lr"):
        assert _steps(path, run.info.run_id, key) == [0, 1, 2], key
    images = _images(path, run.info.run_id)
    assert _grid_steps(images, "reconstructions") == [0, 1, 2]
    assert _grid_steps(images, "prior_samples") == [0, 1, 2]
    print(
        f"MEASURED SIGKILL after epoch 2 was logged (its checkpoint committed: {checkpointed}): "
        "0 steps duplicated; the killed driver's Ray processes gone after "
        f"{gone:.1f} s"
    )


# ----------------------------------------------------------------------------- start-up


@ray.remote(num_cpus=2)
class _Hog:
    """Holds both CPUs of the test's Ray, as a node that never comes back would."""

    def ready(self) -> bool:
        return True


@pytest.mark.slow
def test_workers_that_cannot_start_end_in_one_line_and_a_failed_run(
    ray_session, processed, params_file, capsys
):
    path = params_file(train={"num_workers": 2, "startup_timeout_s": 5})
    hog = _Hog.remote()
    ray.get(hog.ready.remote(), timeout=300)
    try:
        started = time.monotonic()
        assert train.main(["--params", str(path)]) == 1
        took = time.monotonic() - started
    finally:
        ray.kill(hog)
    err = [ln for ln in capsys.readouterr().err.splitlines() if "retina-vae train" in ln]
    assert len(err) == 1, err
    assert "did not start within train.startup_timeout_s = 5 s" in err[0]
    (run,) = _runs(path)
    assert run.info.status == "FAILED"
    print(f"MEASURED workers never placed: one line after {took:.1f} s (timeout 5 s)")


# ----------------------------------------------------------------------------- tracking server


def test_tracking_server_down_at_start_is_one_line_and_deletes_nothing(
    processed, params_file, tmp_path, mlflow_server, capsys
):
    path = params_file(tracking={"uri": mlflow_server.uri})  # nothing listens there yet
    params = load_params(path)
    name = f"train-{train.params_hash(params)[:10]}-{train.data_hash(processed)[:10]}"
    finished = tmp_path / "checkpoints" / name  # a previous training of the same params
    finished.mkdir(parents=True)
    (finished / train.RUN_STATE).write_text('{"finished": true, "mlflow_run_id": "x"}')

    started = time.monotonic()
    assert train.main(["--params", str(path)]) == 1
    took = time.monotonic() - started
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(
        f"retina-vae train: error: tracking.uri: no MLflow tracking server "
        f"answers at {mlflow_server.uri}"
    )
    assert (finished / train.RUN_STATE).exists()  # nothing deleted
    print(f"MEASURED tracking server down at start: one line after {took:.1f} s")


BAD_URIS = {
    # case: (MLFLOW_TRACKING_URI, what the line says)
    "wrong scheme": ("htp://127.0.0.1:5055", "no MLflow store has the scheme htp://"),
    "host:port without scheme": ("127.0.0.1:5055", "has no scheme: a tracking server is http://"),
    "a folder (file store)": ("{tmp}/mlruns", "is a folder, MLflow's file store"),
    "sqlite file that is a folder": ("sqlite:///{tmp}", "cannot open the database"),
    "sqlite where a file is the folder": ("sqlite:///{tmp}/params.yaml/m.db", "cannot open the"),
}


@pytest.mark.parametrize("case", BAD_URIS)
def test_a_tracking_uri_mlflow_cannot_use_is_one_line_before_anything_starts(
    processed, params_file, tmp_path, monkeypatch, capsys, case
):
    """Before: a 55- to 195-line MLflow traceback, the sqlite one after 111 s of retries."""
    uri, says = BAD_URIS[case]
    path = params_file()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    assert train.main(["--params", str(path)]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("retina-vae train: error: tracking.uri: ") and says in line


@pytest.mark.slow
def test_tracking_server_dying_mid_training_costs_no_restart_and_loses_nothing(
    processed, params_file, tmp_path, mlflow_server, monkeypatch, capsys
):
    """The stage is given the server's address with a user and password in
    MLFLOW_TRACKING_URI, as an authenticated server is reached (MLflow sends them as HTTP
    basic auth; this server ignores them): they work, and the password is in no line printed
    (the driver's, rank 0's Ray worker's, MLflow's own "View run" link) and no run param."""
    uri = mlflow_server()
    with_password = uri.replace("http://", "http://alice:s3cret@")
    shown = uri.replace("http://", "http://alice:<redacted>@")
    path = params_file(
        train={"epochs": 3, "image_every": 1, "max_failures": 0}, tracking={"uri": uri}
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", with_password)  # wins over tracking.uri
    stage = _start_stage(path, uuid.uuid4().hex)
    client = MlflowClient(uri)

    def first_epoch_logged() -> bool:
        try:
            runs = _runs(path)
            return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "train/kl"))
        except Exception:
            return False

    _wait(first_epoch_logged, 900, "epoch 1's metrics on the server")
    (run,) = _runs(path)
    mlflow_server.stop()  # stays down until training has ended
    out, err = stage.communicate(timeout=900)

    # max_failures is 0: had a logging error killed rank 0, training would have failed
    assert stage.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("retina-vae train: error: training finished and ")
    assert f"the tracking server {shown} is unreachable" in last
    assert f"tracking server {shown} unreachable (" in err  # rank 0's line, from its worker
    assert "s3cret" not in out + err
    assert Path(load_params(path).paths.model).exists()
    assert err.count("unreachable (") == 1  # one line for the outage, however many epochs
    assert "Traceback" not in err

    mlflow_server()  # back: a re-run delivers what waited and finishes the run
    started = time.monotonic()
    capsys.readouterr()
    assert train.main(["--params", str(path)]) == 0
    took = time.monotonic() - started
    rerun = capsys.readouterr()
    assert "s3cret" not in rerun.out + rerun.err
    (done,) = _runs(path)
    assert done.info.run_id == run.info.run_id and done.info.status == "FINISHED"
    assert not [v for v in done.data.params.values() if "s3cret" in v]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/kl")] == [0, 1, 2]
    assert _grid_steps(_images(path, run.info.run_id), "reconstructions") == [0, 1, 2]
    print(f"MEASURED server down for epochs 2-3: 0 restarts, 0 steps lost; re-run {took:.0f} s")


REACH_CHECK = r"""
import sys
from vae_core import distributed
import pipeline.train as train
# Ray's workers (not this driver) reach the server only through a proxy that refuses: the
# single-host stand-in for a URI that only the head can reach
distributed.init_ray(None, runtime_env={"env_vars": {
    "http_proxy": "http://127.0.0.1:" + sys.argv[2], "no_proxy": ""}}, num_cpus=2)
sys.exit(train.main(["--params", sys.argv[1]]))
"""


@pytest.mark.slow
def test_tracking_uri_the_workers_cannot_reach_is_one_line_before_training(
    processed, params_file, tmp_path, mlflow_server
):
    uri = mlflow_server()
    path = params_file(tracking={"uri": uri})
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", REACH_CHECK, str(path), str(free_port())],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"retina-vae train: error: tracking.uri: {uri} answers here but not")
    assert "from Ray node" in last and "mlflow server --host 0.0.0.0" in last
    assert _runs(path) == []  # nothing started
    took = time.monotonic() - started
    print(f"MEASURED URI unreachable from the workers: one line, 0 runs, {took:.0f} s with Ray")
