"""pipeline/cluster.py without a cluster: address forms, the workers' environment, and the
address torch.distributed's backend would advertise (the two-host behaviour is in
test_train_two_hosts.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline import cluster, ray_address, tracking
from pipeline.errors import UserError
from pipeline.params import load_params
from vae_core import distributed


@pytest.mark.parametrize(
    "address, says",
    [
        ("ray://head:10001", "Ray Client addresses (ray://head:10001) are not supported"),
        ("head", "expected auto or host:port, got 'head'"),
        ("http://head:8265", "expected auto or host:port"),
    ],
)
def test_unusable_address_is_one_line(address, says):
    with pytest.raises(UserError, match="^cluster.address: ") as err:
        ray_address.check_address(address)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_worker_env_has_the_uri_credentials_params_and_forwarded_values(params_file, monkeypatch):
    path = params_file(
        cluster={"worker_env": {"GLOO_SOCKET_IFNAME": "eth1"}, "forward_env": ["S3_SECRET"]}
    )
    monkeypatch.setenv("S3_SECRET", "s3cr3t")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # MLflow's own, sent unnamed
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    env = cluster.worker_env(load_params(path), "http://mlflow:5000")
    assert env == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "GLOO_SOCKET_IFNAME": "eth1",
        "S3_SECRET": "s3cr3t",
    }


def test_a_login_in_mlflows_credentials_file_reaches_the_workers(
    params_file, monkeypatch, tmp_path
):
    # other nodes have no ~/.mlflow/credentials: the login MLflow reads from it here is sent
    # as its variables (a variable wins over the file, as in MLflow's read_mlflow_creds)
    for name in tracking.MLFLOW_CREDENTIALS + (
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(
        "[mlflow]\nmlflow_tracking_username = bob\nmlflow_tracking_password = pw2\n"
    )
    params = load_params(params_file())
    env = cluster.worker_env(params, "http://mlflow:5000")
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("bob", "pw2")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    env = cluster.worker_env(params, "http://mlflow:5000")
    assert (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) == ("carol", "pw2")


def test_forwarding_an_unset_variable_is_one_line(params_file, monkeypatch):
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    params = load_params(params_file(cluster={"forward_env": ["NOT_SET_HERE"]}))
    with pytest.raises(UserError, match="^cluster.forward_env: NOT_SET_HERE is not set"):
        cluster.worker_env(params, "sqlite:///x.db")


def _ip_address(interface: str) -> str:
    """The interface's IPv4 address as iproute2 reports it (an independent reference)."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", interface], capture_output=True)
    return out.stdout.decode().split()[3].split("/")[0]


@pytest.mark.parametrize("use_gpu", [False, True])
def test_collective_address_follows_the_ifname_variable(monkeypatch, use_gpu):
    variable = distributed.IFNAME_VARIABLE[use_gpu]
    monkeypatch.setenv(variable, "lo")
    assert distributed.collective_address(use_gpu) == (f"{variable}=lo", _ip_address("lo"))
    monkeypatch.setenv(variable, "nosuchif0")
    assert distributed.collective_address(use_gpu) == (f"{variable}=nosuchif0", None)


# ----------------------------------------------------------------------------- shared cores


@pytest.mark.parametrize(
    "argv, is_train",
    [
        (["/v/bin/python", "-m", "pipeline.cli", "train", "--params", "p.yaml"], True),  # dvc.yaml
        (["/v/bin/python", "/v/bin/retina-vae", "train"], True),  # console script via its shebang
        (["retina-vae", "train", "--params", "p.yaml"], True),
        (["/bin/sh", "-c", "python -m pipeline.cli train"], False),  # the shell DVC wraps it in
        (["/v/bin/python", "-m", "pipeline.cli", "evaluate"], False),
        (["retina-vae", "exps"], False),
        (["ray::RayTrainWorker.__init__"], False),
        ([], False),
    ],
)
def test_train_stage_command_lines(argv, is_train):
    assert cluster.is_train_stage(argv) is is_train


def test_other_trainings_finds_a_running_train_command_line_and_not_this_process():
    argv = [sys.executable, "-c", "import time; time.sleep(120)", "-m", "pipeline.cli", "train"]
    other = subprocess.Popen(argv)
    try:
        assert other.pid in cluster.other_trainings()
    finally:
        other.kill()
        other.wait()
    assert other.pid not in cluster.other_trainings()


@pytest.mark.parametrize(
    "workers, cpus, others, cores, share",
    [
        (2, 1, [11], 2, 1),  # -j 2 on 2 cores, default 2 workers: told to take 1
        (1, 1, [11], 2, None),  # sized as the README says: silent
        (2, 1, [], 2, None),  # alone: silent
        (4, 2, [11, 12, 13], 16, 4),  # -j 4 on 16 cores: 4 CPUs each
        (2, 2, [11, 12, 13], 16, None),  # 4 of 16: its share exactly
        (1, 1, [11, 12, 13], 2, None),  # more experiments than cores: 1 is the least there is
        (2, 1, [11, 12, 13], 2, 1),
    ],
)
def test_shared_cores_warning_says_the_share_for_j_n(
    params_file, workers, cpus, others, cores, share
):
    path = params_file(train={"num_workers": workers, "cpus_per_worker": cpus})
    line = cluster.shared_cores_warning(load_params(path), others, cores)
    if share is None:
        assert line is None
        return
    assert f"dvc exp run -j {len(others) + 1}` set" in line
    assert f"train.num_workers x train.cpus_per_worker <= {share} " in line
    assert "\n" not in line
