"""Training on a Ray cluster (``cluster.*`` params): the checks that turn Ray's slow or silent
failures into one line (the head's address itself: :mod:`pipeline.ray_address`), and the
environment every Ray worker gets.

Used by the train stage. See README, "Running on a cluster".
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import psutil

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.params import Params
from pipeline.ray_address import SEE
from vae_core import distributed


def worker_env(params: Params, uri: str) -> dict[str, str]:
    """The variables every Ray worker gets: the MLflow tracking URI and the driver's login to
    it (:func:`pipeline.tracking.worker_login`), ``cluster.worker_env`` (plain values)
    and the driver's own values of the names in ``cluster.forward_env`` (credentials: never
    written to params or MLflow). Raises UserError for an unset name."""
    env = {"MLFLOW_TRACKING_URI": uri, **params.cluster.worker_env}
    env.update(tracking.worker_login())
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


def is_train_stage(argv: list[str]) -> bool:
    """True for the command line of a train stage: ``python -m pipeline.cli train`` (what
    ``dvc.yaml`` runs) or ``retina-vae train`` (the console script, also ``python .../retina-vae
    train``). A shell wrapping one (``sh -c "python -m pipeline.cli train"``) is not one."""
    names = [Path(a).name for a in argv]
    pairs = zip(names, names[1:], strict=False)  # each argument with the next
    return any(a in ("pipeline.cli", "retina-vae") and b == "train" for a, b in pairs)


def other_trainings() -> list[int]:
    """PIDs of the train stages running on this host besides this process and its parents,
    e.g. the other experiments of ``dvc exp run --run-all -j N``."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info["cmdline"] or []  # None: a process we may not read
        if proc.info["pid"] not in mine and is_train_stage(argv):
            found.append(proc.info["pid"])
    return found


def shared_cores_warning(params: Params, others: list[int], cores: int) -> str | None:
    """A one-line warning when this embedded-Ray training and ``others`` (their PIDs) on the
    same host would together want more threads than ``cores``: each embedded Ray claims every
    core, so N concurrent experiments should each take ``num_workers x cpus_per_worker <=
    cores / N``. None when they fit (or nothing else runs)."""
    t = params.train
    mine, share = t.num_workers * t.cpus_per_worker, cores // (len(others) + 1)
    if not others or mine <= max(share, 1):
        return None
    return (
        f"train: {len(others)} other training(s) run on this host "
        f"(pid {', '.join(map(str, others))}); this one asks {t.num_workers} worker(s) x "
        f"{t.cpus_per_worker:g} CPU of {cores} cores,"
        f" so they share them and each runs slower: for `dvc exp run -j {len(others) + 1}` set "
        f"train.num_workers x train.cpus_per_worker <= {max(share, 1)} - see README, Queued "
        "experiments"
    )
