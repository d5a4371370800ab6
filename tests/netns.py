"""A two-host Ray cluster on one machine: two network namespaces joined by a veth pair.

The test bed of README "Running on a cluster". Each "host" is a Linux network namespace with its
own loopback and one veth end (both named ``rv0``, as a real cluster's nodes share an interface
name), at 10.213.N.1 (head) and 10.213.N.2 (worker), N unique per pytest process. They share the
file system, as nodes with an NFS mount do, so the repository, its ``.venv`` and every
``tmp_path`` are at the same path on both. Nothing is sent anywhere but between the two
namespaces.

``ip netns exec`` bind-mounts ``/etc/netns/NS/hosts`` over ``/etc/hosts`` for what it runs;
each namespace gets the stock Debian/Ubuntu line ``127.0.1.1 <hostname>``, so the host name
resolves to a loopback address as on a fresh Debian install (the Gloo pitfall, issue 18).

Ray runs as ``ray start --block`` subprocesses in the namespaces (head: GCS on :6379, dashboard
and Jobs API on :8265; ``num_cpus`` each), with token authentication: ``RAY_AUTH_MODE=token``
and a fresh token in ``RAY_AUTH_TOKEN_PATH`` (never ``~/.ray``). Teardown (also after a failed
test) signals the two ``ray start`` processes, then kills whatever still runs in the two
namespaces (only this fixture's processes live there), deletes them (which removes the veth)
and their hosts files.

Use: ``two_hosts`` (conftest.py) is module-scoped; ``cluster.env()`` is the environment a
process needs to talk to the cluster (``auth=False`` drops ``RAY_AUTH_MODE``), and
``cluster.head.run([...], env=...)`` / ``cluster.worker.popen(...)`` run a command on a host.
Needs root and ``ip`` (iproute2); where a namespace cannot be made the fixture skips with the
reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's bin: ray, retina-vae, python
IFACE = "rv0"  # the veth end's name inside both namespaces
GCS_PORT = 6379
DASHBOARD_PORT = 8265
STARTED = "Ray runtime started."  # what `ray start` prints once its node is up


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Host:
    """One namespace: ``run``/``popen`` execute argv inside it."""

    ns: str
    ip: str

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *map(str, argv)]

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.argv(argv), **kwargs)

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(argv), **kwargs)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]


def make_hosts(tag: str) -> tuple[Host, Host]:
    """Create the two namespaces and their veth; raise OSError (with ip's message) if not
    possible. ``tag``: a short unique suffix (names stay within 15 characters)."""
    subnet = f"10.213.{os.getpid() % 250 + 1}"
    head, worker = Host(f"rvae{tag}h", f"{subnet}.1"), Host(f"rvae{tag}w", f"{subnet}.2")
    remove_hosts(head, worker)  # left by a killed run of the same tag, if any
    try:
        for host in (head, worker):
            _ip("netns", "add", host.ns)
            hosts = Path("/etc/netns") / host.ns / "hosts"
            hosts.parent.mkdir(parents=True, exist_ok=True)
            hosts.write_text(f"127.0.0.1 localhost\n127.0.1.1 {socket.gethostname()}\n")
        _ip("link", "add", f"rv{tag}h", "type", "veth", "peer", "name", f"rv{tag}w")
        for host, end in ((head, f"rv{tag}h"), (worker, f"rv{tag}w")):
            _ip("link", "set", end, "netns", host.ns)
            _ip("-n", host.ns, "link", "set", end, "name", IFACE)
            _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", IFACE)
            _ip("-n", host.ns, "link", "set", IFACE, "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")
    except (subprocess.CalledProcessError, OSError) as exc:
        remove_hosts(head, worker)
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        raise OSError(f"cannot make network namespaces: {detail}") from None
    return head, worker


def remove_hosts(*hosts: Host) -> None:
    """Kill what still runs in the namespaces, then delete them (the veth goes with them)."""
    for host in hosts:
        for pid in host.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        shutil.rmtree(Path("/etc/netns") / host.ns, ignore_errors=True)


@dataclass
class RayCluster:
    """A running two-host Ray cluster (see the module docstring)."""

    head: Host
    worker: Host
    token_path: Path
    logs: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.ip}:{DASHBOARD_PORT}"

    def env(self, auth: bool = True, **extra: str) -> dict[str, str]:
        """This process's environment without RAY_*, plus the cluster's token settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(PATH=f"{BIN}:{env.get('PATH', '')}", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        if auth:
            env["RAY_AUTH_MODE"] = "token"
        env.update(extra)
        return env

    def start_node(self, host: Host, args: list[str], timeout: float = 180) -> None:
        log = self.logs / f"{host.ns}.log"
        with log.open("w") as out:
            proc = host.popen(
                [BIN / "ray", "start", "--block", "--disable-usage-stats", *args],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(proc)
        deadline = time.monotonic() + timeout
        while STARTED not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start on {host.ns} failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        for proc in reversed(self.procs):  # `ray start --block` stops its node on SIGTERM
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_cluster(head: Host, worker: Host, root: Path, cpus: int = 1) -> RayCluster:
    """Ray head on ``head`` (dashboard on), one worker node on ``worker``; both with token
    auth and ``cpus`` CPUs. Temp dirs are short (Ray's socket paths have a length limit)."""
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    cluster = RayCluster(head, worker, token, root)
    temp = Path("/tmp") / f"r{head.ns}"
    cluster.start_node(
        head,
        [
            "--head",
            f"--node-ip-address={head.ip}",
            f"--port={GCS_PORT}",
            f"--num-cpus={cpus}",
            "--include-dashboard=true",
            f"--dashboard-host={head.ip}",
            f"--dashboard-port={DASHBOARD_PORT}",
            f"--temp-dir={temp}h",
        ],
    )
    cluster.start_node(
        worker,
        [
            f"--address={cluster.address}",
            f"--node-ip-address={worker.ip}",
            f"--num-cpus={cpus}",
            f"--temp-dir={temp}w",
        ],
    )
    return cluster


def two_host_cluster(root: Path, tag: str) -> Iterator[RayCluster]:
    """Generator behind the ``two_hosts`` fixture: set up, yield, always tear down."""
    import pytest

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2's `ip`")
    try:
        head, worker = make_hosts(tag)
    except OSError as exc:
        pytest.skip(str(exc))
    cluster = None
    try:
        cluster = start_cluster(head, worker, root)
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop()
        remove_hosts(head, worker)
        for suffix in "hw":
            shutil.rmtree(f"/tmp/r{head.ns}{suffix}", ignore_errors=True)
