"""``retina-vae ui``: the MLflow UI on the project's tracking store, opened at the newest run.

Starts ``mlflow server`` on the store of ``tracking.uri`` (the repository's ``mlflow.db``; the
artifacts lie in ``mlartifacts/`` beside it) at http://HOST:PORT, waits until it answers, and
prints the newest run's page in MLflow's model-training view: MLflow 3 otherwise opens in its
GenAI view, where a training experiment looks empty. Ctrl-C stops the server. With a tracking
server (an ``http(s)://`` URI) it starts nothing and prints the link only.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from pipeline import tracking
from pipeline.errors import UserError
from pipeline.params import Params, redact_uri
from pipeline.stage import run_stage

START_TIMEOUT_S = 180.0  # seconds; a first start migrates the store, slow on a busy machine


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def start_server(uri: str, host: str, port: int, log: Path) -> subprocess.Popen:
    """``mlflow server`` on ``uri`` in its own process group (so stopping it stops its uvicorn
    workers too), output to ``log``; returns once it answers ``/health``. UserError (one line)
    when the port is taken or the server exits before answering."""
    if not _port_free(host, port):
        raise UserError(f"--port: {host}:{port} is in use; pick another, e.g. --port {port + 1}")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]  # one user: one worker
    with log.open("w") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # whatever stops the wait (a timeout, Ctrl-C, SIGTERM) stops the server too
        _wait_ready(server, f"http://{host}:{port}/health", log)
    except BaseException:
        stop(server)
        raise
    return server


def _wait_ready(server: subprocess.Popen, health: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            lines = log.read_text().strip().splitlines() or ["no output"]
            raise UserError(f"mlflow server exited ({server.returncode}): {lines[-1][:200]}")
        try:
            with urllib.request.urlopen(health, timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    raise UserError(f"mlflow server did not answer {health} in {START_TIMEOUT_S:.0f} s")


def stop(server: subprocess.Popen) -> None:
    """Stop the server's process group (SIGTERM, then SIGKILL after 5 s)."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _body(params: Params, args: argparse.Namespace) -> None:
    uri = tracking.resolve_tracking_uri(params.tracking)
    if uri.startswith(("http://", "https://")):
        run = tracking.newest_run(uri, params.tracking.experiment)
        print(f"MLflow at {redact_uri(uri)}: {_link(uri, run)}", flush=True)
        return
    base = f"http://{args.host}:{args.port}"
    # SIGTERM (`kill PID`, a service manager) stops the server as Ctrl-C does
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"starting mlflow server on {redact_uri(uri)} at {base} ...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = None
        try:
            # started before the store is read: a busy port is reported at once, and the
            # server migrates a new store before the newest run is looked up
            server = start_server(uri, args.host, args.port, Path(tmp) / "server.log")
            run = tracking.newest_run(uri, params.tracking.experiment)
            print(f"MLflow UI, {_link(uri, run, base)}", flush=True)
            print("Ctrl-C stops it", flush=True)
            server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            if server is not None:
                stop(server)


def _link(uri: str, run: tuple[str, str] | None, base: str | None = None) -> str:
    if run is None:
        return f"{base or redact_uri(uri)} (no run yet: run `make repro` first)"
    run_id, name = run
    return f"newest run {name!r}: {tracking.run_url(uri, run_id, base)}"


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5000, help="port (default 5000)")


def main(argv: list[str] | None = None) -> int:
    return run_stage("ui", argv, _body, _add_args, description=__doc__.splitlines()[0])
