"""`retina-vae ui` for real: a real `mlflow server` on a free port, the printed link fetched,
the run read back through MLflow's REST API, the command stopped by its PID."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from tests.conftest import free_port, write_params


@pytest.mark.slow
def test_ui_serves_the_store_and_prints_the_newest_runs_page(tmp_path):
    path = write_params(tmp_path)  # store: tmp_path/mlflow.db, experiment "test"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp_id = tracking.experiment_id(uri, "test")
    MlflowClient(uri).create_run(exp_id, start_time=1000, run_name="older")
    newest, _ = tracking.start_run(uri, "test", params={}, tags={}, run_name="model.latent_dim=8")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "pipeline.cli", "ui", "--params", str(path), "--port", str(port)]
    ui = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        printed = []
        for line in ui.stdout:  # the link comes once the server answers (or the command ends)
            printed.append(line)
            if "workflowType=" in line:
                break
        link = re.search(r"http://\S+", printed[-1]).group(0)
        base, page = link.split("/#/")
        assert base == f"http://127.0.0.1:{port}"
        assert page == f"experiments/{exp_id}/runs/{newest}?workflowType=machine_learning"
        assert "'model.latent_dim=8'" in printed[-1]  # the newest run, by name
        with urllib.request.urlopen(link) as response:  # the UI's page (the fragment stays here)
            assert response.status == 200 and "<html" in response.read().decode().lower()
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={newest}") as r:
            run = json.load(r)["run"]
        assert run["info"]["run_name"] == "model.latent_dim=8"
        assert run["info"]["experiment_id"] == exp_id
    finally:
        os.kill(ui.pid, signal.SIGTERM)  # the command stops its server on SIGTERM
        rest = ui.communicate(timeout=60)[0]
    assert ui.returncode == 0, rest


def test_ui_on_a_busy_port_is_one_line(tmp_path, capsys):
    from pipeline import ui

    path = write_params(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert ui.main(["--params", str(path), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        f"retina-vae ui: error: --port: 127.0.0.1:{port} is in use; pick another, "
        f"e.g. --port {port + 1}"
    )
    # said before the store is opened (the seconds a new store's migration takes)
    assert not (tmp_path / "mlflow.db").exists()
