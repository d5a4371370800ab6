"""vae_core.distributed: samplers without Ray; 1 Ray worker equals the plain loop."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import cloudpickle
import pytest
import torch
from torch.utils.data import Dataset

from tests.conftest import free_port, make_images
from vae_core import distributed
from vae_core.model import VAEConfig
from vae_core.training import TrainConfig, fit_local

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the data factory runs in Ray


class Images(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.images = torch.from_numpy(make_images(n, 32, 1, seed))  # (n,1,32,32) uint8

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class Data:
    def __call__(self) -> tuple[Images, Images]:
        return Images(40, 0), Images(12, 1)


class RecordThreads:
    """on_epoch callback: writes the worker's intra-op thread count to ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, epoch: int, row: dict, model: torch.nn.Module) -> None:
        self.path.write_text(str(torch.get_num_threads()))


class Hold:
    """on_epoch callback: after epoch 0, rank 0 writes ``started`` and waits for ``go``."""

    def __init__(self, started: Path, go: Path) -> None:
        self.started, self.go = started, go

    def __call__(self, epoch: int, row: dict, model: torch.nn.Module) -> None:
        if epoch == 0:
            self.started.touch()
            deadline = time.monotonic() + 600
            while not self.go.exists() and time.monotonic() < deadline:
                time.sleep(0.1)


def _spec(epochs: int = 2) -> distributed.RunSpec:
    cfg = TrainConfig(
        epochs=epochs, batch_size=8, lr=2e-3, weight_decay=1e-4, lr_schedule="cosine",
        grad_clip=5.0, beta=1.0, kl_warmup_epochs=1, samples=2, seed=3,
    )  # fmt: skip
    model = VAEConfig(height=32, width=32, widths=(8, 16), latent_dim=4)
    return distributed.RunSpec(model=model, train=cfg, data=Data())


def test_shard_sampler_covers_every_index_once():
    shards = [list(distributed.ShardSampler(11, r, 3)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(11))


def test_train_shards_are_disjoint_and_reshuffled_per_epoch():
    ds = Images(16, 0)
    loaders = [distributed.make_loaders(ds, ds, 4, seed=0, rank=r, world=2)[0] for r in (0, 1)]
    seen = [list(loader.sampler) for loader in loaders]
    assert sorted(seen[0] + seen[1]) == list(range(16))
    loaders[0].sampler.set_epoch(1)
    assert list(loaders[0].sampler) != seen[0]


@pytest.mark.slow
def test_one_ray_worker_matches_fit_local(ray_session, tmp_path):
    spec = _spec()
    result = distributed.fit(spec, distributed.Scaling(num_workers=1), str(tmp_path), "eq")

    model = distributed.build_model(spec)
    train, val = distributed.make_loaders(*spec.data(), 8, seed=spec.train.seed)
    local = fit_local(model, train, val, spec.train, "cpu")

    assert [r["epoch"] for r in result.history] == [0, 1]
    for ray_row, local_row in zip(result.history, local, strict=True):
        for key in ("train_neg_elbo", "train_loss", "val_neg_elbo", "val_kl"):
            assert ray_row[key] == pytest.approx(local_row[key], rel=1e-4), (
                key
            )  # Ray's worker uses 1 thread: sums reorder
    assert result.nodes == 1


def test_rank_seed_keeps_rank_zero_and_differs_per_rank():
    assert distributed.rank_seed(3, 0) == 3  # as fit_local: a 1-worker run matches it
    assert len({distributed.rank_seed(3, rank) for rank in range(4)}) == 4


@pytest.mark.slow
def test_two_ray_workers_draw_different_noise(ray_session, tmp_path):
    scaling = distributed.Scaling(num_workers=2)
    result = distributed.fit(_spec(epochs=1), scaling, str(tmp_path), "ranks")
    rng = result.state["rng"]  # every rank's RNG state after the epoch, as gathered
    assert len(rng) == 2 and not torch.equal(rng[0]["cpu"], rng[1]["cpu"])


def test_ray_process_tracebacks_reach_the_console_as_one_counted_line():
    # as Ray Train's controller logs it when a request times out on a loaded machine
    lines = [
        "Failed to send resource request for train-1. It's safe to ignore this error.",
        "Traceback (most recent call last):",
        '  File "/x/autoscaling_coordinator_client.py", line 58, in send_resource_request',
        "    ray.get(",
        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready.",
        "epoch   2/3  train -ELBO    680.85",
    ]
    printed: list[dict] = []
    summary = distributed.TracebackSummary(printed.append)
    summary({"pid": 7, "is_err": True, "lines": lines[:3]})  # a traceback split over batches
    summary({"pid": 7, "is_err": True, "lines": lines[3:]})
    out = [line for batch in printed for line in batch["lines"]]
    assert out == [
        lines[0],
        "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready. "
        "[Ray traceback #1 shortened; see Ray's logs]",
        lines[-1],
    ]
    assert summary.count == 1


@pytest.mark.parametrize(("cpus", "threads"), [(None, 1), (0.5, 1), (1.0, 1), (2.0, 2), (3.5, 3)])
def test_worker_threads_follow_the_assigned_cpus(cpus, threads):
    assert distributed.worker_threads(cpus) == threads


@pytest.mark.slow
def test_ray_worker_uses_one_thread_per_assigned_cpu(ray_session, tmp_path):
    record = tmp_path / "threads.txt"
    spec = dataclasses.replace(_spec(epochs=1), on_epoch=RecordThreads(record))
    scaling = distributed.Scaling(num_workers=1, cpus_per_worker=2)
    # OMP_NUM_THREADS=1 in the worker's environment would otherwise leave torch one thread.
    distributed.fit(spec, scaling, str(tmp_path / "runs"), "threads", {"OMP_NUM_THREADS": "1"})
    assert record.read_text() == "2"


@pytest.fixture
def foreign_ray() -> Iterator[Callable[[], str]]:
    """``start()`` -> another Ray on this host, as a colleague's ``ray start --head`` on a
    shared lab server (no CPUs to lend), its dashboard at Ray's default 127.0.0.1:8265, once it
    answers; stopped by PID at the end."""
    procs: list[subprocess.Popen] = []

    def start() -> str:
        gcs = free_port()
        procs.append(
            subprocess.Popen(
                [Path(sys.executable).with_name("ray"), "start", "--head", "--block"]
                + [f"--port={gcs}", "--num-cpus=0", "--include-dashboard=true"]
                + ["--dashboard-host=127.0.0.1", "--dashboard-port=8265"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # its own group: its GCS, raylet and dashboard go with it
            )
        )
        url, deadline = "http://127.0.0.1:8265", time.monotonic() + 180
        while True:
            assert procs[-1].poll() is None, "the other Ray did not start (is 8265 taken?)"
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                return url
            except urllib.error.HTTPError:  # it answers (401 when Ray's token auth is on)
                return url
            except OSError:
                assert time.monotonic() < deadline, "the other Ray's dashboard never answered"
                time.sleep(0.5)

    yield start
    for proc in procs:  # SIGKILL: `ray start --block` takes about a minute to stop on SIGTERM
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)


@pytest.mark.slow
def test_another_ray_started_on_the_host_mid_training_does_not_stop_it(
    ray_session, foreign_ray, tmp_path
):
    # Ray Train's placement-group cleaner asks the state API every second whether the
    # controller lives, at the dashboard address the embedded Ray records (127.0.0.1:8265 by
    # default, even with no dashboard running): once another Ray's dashboard answered there
    # ("no such actor"), the cleaner removed the live run's placement group, its workers were
    # killed and, with max_failures 0, the run failed.
    started, go = tmp_path / "started", tmp_path / "go"
    spec = dataclasses.replace(_spec(epochs=3), on_epoch=Hold(started, go))
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(
                distributed.fit(spec, distributed.Scaling(num_workers=2), str(tmp_path), "x")
            )
        except Exception as exc:  # the thread's failure, for the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 600
        while not started.exists() and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists(), outcome
        foreign_ray()
        time.sleep(4)  # four of the cleaner's checks while training waits after epoch 0
    finally:
        go.touch()
        thread.join(timeout=600)
    (result,) = outcome
    assert not isinstance(result, Exception), result
    assert [r["epoch"] for r in result.history] == [0, 1, 2]
