"""Shared fixtures: one Ray session, tiny processed arrays, a params-file factory."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import tracking

REPO = Path(__file__).resolve().parents[1]


def make_images(n: int, size: int, channels: int, seed: int) -> np.ndarray:
    """(n, C, size, size) uint8: a bright disc whose place and radius vary, on a dim ramp.

    Structured (a VAE can learn it in a few epochs), not noise.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)  # (size, size) each, in [0, 1]
    images = np.empty((n, channels, size, size), np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        r = rng.uniform(0.1, 0.3)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(float)
        img = 0.2 * xx + 0.7 * disc + 0.05 * rng.random((size, size))
        images[i] = (np.clip(img, 0, 1) * 255).astype(np.uint8)[None]  # (H,W) -> (1,H,W)
    return images


def write_processed(
    root: Path,
    sizes: dict[str, int] | None = None,
    size: int = 32,
    channels: int = 1,
    seed: int = 0,
) -> Path:
    """Preprocess outputs in the data-contract format under ``root/processed`` (tables as
    :data:`pipeline.processed.TABLE_COLUMNS`: no source path)."""
    sizes = sizes or {"train": 64, "val": 16, "test": 8}
    out = root / "processed"
    out.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate(sizes.items()):
        np.save(out / f"{split}_images.npy", make_images(n, size, channels, seed + k))
        pd.DataFrame(
            {
                "image_id": [f"{split}-{i:04d}" for i in range(n)],
                "label": [("a", "b")[i % 2] for i in range(n)],
                "subject_id": [f"s{i // 4:03d}" for i in range(n)],
                "eye": ["OD" if i % 2 else "OS" for i in range(n)],
                "modality": ["oct"] * n,
                "split": [split] * n,
                "frame": [0] * n,
            }
        ).to_parquet(out / f"{split}.parquet", index=False)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``host`` now (for a server to start on, or to find
    nobody there)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_params(root: Path, **groups: dict) -> Path:
    """The repository's params.yaml with every path under ``root`` and ``groups`` patched in.

    Defaults are tiny: 2 epochs, batch 16, widths (8, 16), J = 4, MLflow in ``root/mlflow.db``.
    """
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["paths"] = {key: str(root / Path(value).name) for key, value in raw["paths"].items()}
    raw["paths"]["processed"] = str(root / "processed")
    raw["model"].update(latent_dim=4, widths=[8, 16])
    raw["train"].update(epochs=2, batch_size=16, image_every=1, num_workers=2)
    raw["tracking"].update(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="test")
    for group, values in groups.items():
        raw[group].update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(autouse=True)
def _restore_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a test does to MLFLOW_TRACKING_URI is undone after it (mlflow's
    ``set_tracking_uri`` exports it), so one test's store never leaks into the next."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One embedded Ray (2 CPUs) for every test that needs it; stopped at the end."""
    from vae_core import distributed

    distributed.init_ray(None, num_cpus=2)
    yield
    distributed.shutdown_ray()


@pytest.fixture
def processed(tmp_path: Path) -> Path:
    """Tiny preprocess outputs (64 train, 16 val, 8 test images of 1x32x32)."""
    return write_processed(tmp_path)


@pytest.fixture
def params_file(tmp_path: Path) -> Callable[..., Path]:
    """``params_file(train={...}, ...)`` -> a params file whose paths all live in tmp_path."""

    def make(**groups: dict) -> Path:
        return write_params(tmp_path, **groups)

    return make


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A two-host Ray cluster in two network namespaces (tests/netns.py); skipped with the
    reason where namespaces cannot be made. One per test module: start-up takes ~20 s."""
    from tests import netns

    yield from netns.two_host_cluster(tmp_path_factory.mktemp("cluster"), f"{os.getpid() % 10000}")


def _wait(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` until true; generous limits, as the test machine may be loaded."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {seconds:.0f} s for {what}")
        time.sleep(0.05)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[Callable[[], str]]:
    """``start()`` -> the URI of a real ``mlflow server`` on a free loopback port (the same port
    and store each time), ``start.stop()`` kills it by PID; stopped at the end."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    store = tmp_path / "server"
    store.mkdir()
    procs: list[subprocess.Popen] = []

    def start() -> str:
        mlflow = Path(sys.executable).with_name("mlflow")
        procs.append(
            subprocess.Popen(
                [mlflow, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
                + ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
                + ["--artifacts-destination", str(store / "artifacts")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own group: uvicorn's worker goes with it
            )
        )
        _wait(lambda: tracking.probe(uri, timeout=2) is None, 300, "mlflow server")
        return uri

    def stop() -> None:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
        _wait(lambda: tracking.probe(uri, timeout=2) is not None, 60, "server gone")

    start.stop = stop  # type: ignore[attr-defined]
    start.uri = uri  # type: ignore[attr-defined]
    yield start
    stop()
