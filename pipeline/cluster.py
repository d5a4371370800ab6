"""Joining a Ray cluster (``cluster.*`` params): the checks that turn Ray's slow or silent
failures into one line, and the environment every Ray worker gets.

Used by the train stage. See README, "Running on a cluster".
"""

from __future__ import annotations

import ipaddress
import os
import socket
from urllib.parse import urlsplit

from pipeline.errors import UserError
from pipeline.params import Params
from vae_core import distributed

SEE = "see README, Running on a cluster"


def check_address(address: str) -> None:
    """``cluster.address`` is a listening Ray head that accepts this process's credentials.

    A TCP probe (Ray itself retries for minutes where nothing listens), then a token check
    (``ray.init`` retries ~40 s and names no cause); each fails within seconds with one line.
    Raises UserError.
    """
    if address == "auto":
        return
    if address.startswith("ray://"):
        raise UserError(
            f"cluster.address: Ray Client addresses ({address}) are not supported; use the "
            "head's host:port (GCS, default port 6379), or submit the stage with `ray job "
            f"submit` - {SEE}"
        )
    parts = urlsplit(f"ray-gcs://{address}")
    if not parts.hostname or not parts.port:
        raise UserError(f"cluster.address: expected auto or host:port, got {address!r}")
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=5).close()
    except OSError as exc:
        raise UserError(
            f"cluster.address: Ray cluster at {address} is unreachable ({exc.strerror or exc}); "
            "start it with `ray start --head` or set cluster.address: null for a local Ray"
        ) from None
    if distributed.auth_refused(address) is not None:
        raise UserError(f"cluster.address: {_auth_advice(address)}")


def _auth_advice(address: str) -> str:
    token = "its token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (
            f"the Ray cluster at {address} refused the connection: authentication required; "
            f"set RAY_AUTH_MODE=token and {token} here and on every node - {SEE}"
        )
    return (
        f"the Ray cluster at {address} refused the connection: authentication failed, this "
        f"process's token is not the cluster's; set {token} to the head's token - {SEE}"
    )


def worker_env(params: Params, uri: str) -> dict[str, str]:
    """The variables every Ray worker gets: the MLflow tracking URI, ``cluster.worker_env``
    (plain values) and the driver's own values of the names in ``cluster.forward_env``
    (credentials: never written to params or MLflow). Raises UserError for an unset name."""
    env = {"MLFLOW_TRACKING_URI": uri, **params.cluster.worker_env}
    for name in params.cluster.forward_env:
        if name not in os.environ:
            raise UserError(f"cluster.forward_env: {name} is not set in this environment")
        env[name] = os.environ[name]
    return env


def check_collective(params: Params, env: dict[str, str]) -> None:
    """Before training on several nodes: every node that can hold a worker reports the address
    its torch.distributed backend will advertise; a loopback address there (a host name that
    resolves to 127.0.1.1, as Debian's stock /etc/hosts has it) would make the ranks fail to
    connect after every restart. Raises UserError naming GLOO_SOCKET_IFNAME (CPU) or
    NCCL_SOCKET_IFNAME (GPU)."""
    t = params.train
    need = {"GPU": t.gpus_per_worker} if t.use_gpu else {"CPU": t.cpus_per_worker}
    nodes = [
        n
        for n in distributed.cluster_nodes()
        if all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items())
    ]
    if len({n["NodeManagerAddress"] for n in nodes}) < 2 or t.num_workers < 2:
        return  # one host (even with several Ray nodes on it): loopback reaches every rank
    variable = distributed.IFNAME_VARIABLE[t.use_gpu]
    reports = distributed.on_every_node(
        distributed.collective_address, t.use_gpu, env=env, nodes=nodes
    )
    for node, (how, address) in sorted(reports.items()):
        if address is None:
            raise UserError(f"{variable}: Ray node {node} has no interface {how.split('=')[1]}")
        if ipaddress.ip_address(address.split("%")[0]).is_loopback:
            raise UserError(
                f"{variable}: on Ray node {node}, torch.distributed would advertise {address} "
                f"(from its {how}), a loopback address the other nodes cannot reach; set "
                f"cluster.worker_env: {{{variable}: <the nodes' network interface, e.g. eth0>}}"
                f" - {SEE}"
            )
