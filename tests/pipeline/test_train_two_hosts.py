"""Issue 18 on a real two-host Ray cluster (tests/netns.py): token auth, Gloo's interface, Ray
Jobs, object-storage checkpoints. Each stage runs as the user would, `retina-vae train`, inside
one of the two network namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.params import load_params
from tests.netns import IFACE
from tests.pipeline.test_train import _runs
from tests.s3 import BUCKET, moto_s3

pytestmark = pytest.mark.slow

HEALTH = """
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)
except OSError:
    sys.exit(1)
"""
MLFLOW_PORT = 5055  # inside the head's namespace: its own loopback, so no clash with this host

LIST_BUCKET = f"""
import boto3
for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket={BUCKET!r}):
    for item in page.get("Contents", []):
        print(item["Key"])
"""


def _train(host, params, env) -> tuple[int, list[str], float]:
    """`retina-vae train` on ``host``: (exit code, stderr lines, seconds)."""
    start = time.monotonic()
    done = host.run(["retina-vae", "train", "--params", params], env=env, timeout=300)
    return done.returncode, done.stderr.strip().splitlines(), time.monotonic() - start


def test_bed_has_two_nodes_on_two_addresses(two_hosts):
    probe = "import ray; ray.init(); print(sorted(n['NodeManagerAddress'] for n in ray.nodes()))"
    out = two_hosts.worker.run(
        ["python", "-c", probe], env=two_hosts.env(RAY_ADDRESS=two_hosts.address), timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str([two_hosts.head.ip, two_hosts.worker.ip])


@pytest.mark.parametrize(
    "auth, extra, says",
    [
        # the token file alone (RAY_AUTH_TOKEN_PATH set, RAY_AUTH_MODE not): Ray sends no token
        (False, {}, "authentication required; set RAY_AUTH_MODE=token"),
        (True, {"RAY_AUTH_TOKEN": "0" * 64}, "authentication failed"),
    ],
    ids=["no-auth-mode", "wrong-token"],
)
def test_driver_refused_by_token_auth_says_authentication_in_one_line(
    two_hosts, processed, params_file, auth, extra, says
):
    path = params_file(cluster={"address": two_hosts.address})
    rc, err, seconds = _train(two_hosts.worker, path, two_hosts.env(auth=auth, **extra))
    print(f"one-line auth error after {seconds:.1f} s (stage start included)")
    assert rc == 1
    assert err[-1].startswith("retina-vae train: error: cluster.address: the Ray cluster at ")
    assert says in err[-1] and "\n" not in err[-1]


def test_data_stage_on_ray_refused_by_token_auth_says_authentication_in_one_line(
    two_hosts, params_file
):
    """The Ray Data engine (data.engine: ray) joins cluster.address through the same check."""
    path = params_file(
        demo={"patients": 2, "images_per_eye": 1},
        data={"engine": "ray"},
        cluster={"address": two_hosts.address},
    )
    env = two_hosts.env(auth=False)
    made = two_hosts.worker.run(["retina-vae", "demo", "--params", str(path)], env=env, timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    start = time.monotonic()
    done = two_hosts.worker.run(
        ["retina-vae", "ingest", "--params", str(path)], env=env, timeout=300
    )
    print(f"one-line auth error after {time.monotonic() - start:.1f} s (stage start included)")
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1
    assert err[-1].startswith("retina-vae ingest: error: cluster.address: the Ray cluster at ")
    assert "authentication required; set RAY_AUTH_MODE=token" in err[-1]
    assert not Path(load_params(path).paths.manifest).exists()  # nothing written


def test_loopback_collective_address_is_one_line_naming_gloo_socket_ifname(
    two_hosts, processed, params_file
):
    # /etc/hosts on both hosts: "127.0.1.1 <hostname>", Debian's stock line (tests/netns.py)
    path = params_file(cluster={"address": two_hosts.address})
    rc, err, seconds = _train(two_hosts.head, path, two_hosts.env())
    print(f"one-line Gloo error after {seconds:.1f} s")
    assert rc == 1
    assert err[-1].startswith("retina-vae train: error: GLOO_SOCKET_IFNAME: on Ray node ")
    assert "would advertise 127.0.1.1" in err[-1] and "cluster.worker_env" in err[-1]


def test_two_host_training_as_a_ray_job_with_checkpoints_on_s3(two_hosts, processed, params_file):
    """README's recipe: `ray job submit` from another machine to the head's dashboard; Gloo on
    the nodes' interface from cluster.worker_env; checkpoints in an S3 bucket whose
    credentials reach the workers through cluster.forward_env."""
    with moto_s3(two_hosts.head.ip, 9000, wrap=two_hosts.head.argv) as aws:
        path = params_file(
            train={"epochs": 2, "num_workers": 2, "cpus_per_worker": 1, "image_every": 5},
            paths={"checkpoints": f"s3://{BUCKET}/runs"},
            cluster={
                "address": "auto",
                "worker_env": {"GLOO_SOCKET_IFNAME": IFACE},
                "forward_env": sorted(aws),
            },
        )
        # the credentials reach the driver only (as if exported on the head): the workers on
        # the other host get them through cluster.forward_env alone
        credentials = [f"{k}={v}" for k, v in sorted(aws.items())]
        entrypoint = ["env", *credentials, "retina-vae", "train", "--params", str(path)]
        submit = ["ray", "job", "submit", "--address", two_hosts.dashboard, "--", *entrypoint]
        start = time.monotonic()
        done = two_hosts.worker.run(submit, env=two_hosts.env(), timeout=420)
        print(f"ray job submit: {time.monotonic() - start:.0f} s")
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        listing = two_hosts.head.run(
            ["python", "-c", LIST_BUCKET], env={**two_hosts.env(), **aws}, timeout=120
        )
    assert "succeeded" in done.stdout
    params = load_params(path)
    metrics = json.loads(Path(params.paths.train_metrics).read_text())
    assert metrics["workers"] == 2 and metrics["nodes"] == 2  # one rank on each host
    (run,) = _runs(path)
    assert run.info.status == "FINISHED"
    assert "/epoch_000001/checkpoint.pt" in listing.stdout  # the last epoch, in the bucket


def test_tracking_uri_only_the_head_reaches_is_one_line_naming_a_reachable_one(
    two_hosts, processed, params_file, tmp_path
):
    """An `mlflow server` on the head's loopback: the driver on the head reaches it, rank 0 on
    the other host would not. The stage checks from every node before training."""
    uri = f"http://127.0.0.1:{MLFLOW_PORT}"
    store = tmp_path / "server"
    server = two_hosts.head.popen(
        ["mlflow", "server", "--host", "127.0.0.1", "--port", MLFLOW_PORT, "--workers", 1]
        + ["--backend-store-uri", f"sqlite:///{store}.db", "--artifacts-destination", store],
        env=two_hosts.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own group: uvicorn's worker goes with it
    )
    try:
        deadline = time.monotonic() + 180
        while two_hosts.head.run(["python", "-c", HEALTH, uri], env=two_hosts.env()).returncode:
            assert time.monotonic() < deadline, "mlflow server did not answer on the head"
            time.sleep(0.5)
        path = params_file(
            tracking={"uri": uri},
            cluster={"address": two_hosts.address, "worker_env": {"GLOO_SOCKET_IFNAME": IFACE}},
        )
        rc, err, seconds = _train(two_hosts.head, path, two_hosts.env())
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
    print(f"MEASURED head-only tracking URI: one line after {seconds:.1f} s (stage start included)")
    assert rc == 1, err[-5:]
    assert err[-1].startswith(f"retina-vae train: error: tracking.uri: {uri} answers here but ")
    assert f"not from Ray node {two_hosts.worker.ip}" in err[-1]
    assert f"http://{two_hosts.head.ip}:{MLFLOW_PORT}" in err[-1]  # the address to use instead
    runs = MlflowClient(f"sqlite:///{store}.db").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{store}.db").search_experiments()]
    )
    assert runs == []  # checked before the run was opened: nothing to clean up
