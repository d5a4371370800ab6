"""Training throughput: plain PyTorch loop vs Ray Train with 1 and 2 workers, in one run.

Same model, data, batch size and seed for all three. Prints steady-state training images/s
(median over the epochs after the first), the ratios to the plain loop, and the fixed
start-up cost of a Ray ``fit()`` (its wall time minus the time spent in its epochs).

    .venv/bin/python bench/bench_train.py [--images 512] [--size 64] [--epochs 4]

Targets (issue 4): Ray with 1 worker within 5% of the plain loop; start-up under 20 s on 2
cores. The 1-worker run gets all the CPUs (as many threads as the plain loop); the 2-worker
run splits them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import numpy as np
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_core import distributed  # noqa: E402
from vae_core.model import VAEConfig  # noqa: E402
from vae_core.training import TrainConfig, fit_local  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the data factory runs in Ray


class Images(Dataset):
    """Random-blob uint8 images (N,1,S,S), deterministic per seed."""

    def __init__(self, n: int, size: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:size, 0:size] / size
        centres = rng.uniform(0.2, 0.8, (n, 2, 1, 1))
        blobs = np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 0.02)
        self.images = torch.from_numpy((blobs[:, None] * 255).astype(np.uint8))  # (N,1,S,S)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class Data:
    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __call__(self) -> tuple[Images, Images]:
        return Images(self.n, self.size, 0), Images(self.n // 4, self.size, 1)


def steady(history: list[dict]) -> float:
    return statistics.median(r["train_images_per_s"] for r in history[1:] or history)


def epoch_seconds(history: list[dict]) -> float:
    return sum(
        r["train_images"] / r["train_images_per_s"] + r["val_images"] / r["val_images_per_s"]
        for r in history
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1

    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=2e-3, weight_decay=1e-4,
        lr_schedule="cosine", grad_clip=5.0, beta=1.0, kl_warmup_epochs=0, samples=1, seed=0,
    )  # fmt: skip
    spec = distributed.RunSpec(
        model=VAEConfig(height=args.size, width=args.size),
        train=cfg,
        data=Data(args.images, args.size),
    )
    print(f"{args.images} images 1x{args.size}x{args.size}, batch {args.batch_size}, "
          f"{args.epochs} epochs, {cpus} CPUs, torch {torch.__version__}")  # fmt: skip

    torch.set_num_threads(cpus)
    model = distributed.build_model(spec)
    train, val = distributed.make_loaders(*spec.data(), args.batch_size, seed=0)
    local = steady(fit_local(model, train, val, cfg, "cpu"))
    print(f"(a) plain loop          {local:8.1f} images/s")

    start = time.perf_counter()
    distributed.init_ray(None, num_cpus=cpus)
    print(f"    ray.init            {time.perf_counter() - start:8.1f} s")
    with tempfile.TemporaryDirectory() as storage:
        for label, scaling in (
            ("(b) Ray Train 1 worker", distributed.Scaling(num_workers=1, cpus_per_worker=cpus)),
            (
                "(c) Ray Train 2 workers",
                distributed.Scaling(num_workers=2, cpus_per_worker=cpus / 2),
            ),
        ):
            start = time.perf_counter()
            result = distributed.fit(spec, scaling, storage, f"bench-{scaling.num_workers}")
            wall = time.perf_counter() - start
            ips = steady(result.history)
            startup = wall - epoch_seconds(result.history)
            print(f"{label}  {ips:8.1f} images/s  ratio to (a) {ips / local:5.3f}  "
                  f"fit() {wall:5.1f} s, start-up + checkpoints {startup:5.1f} s")  # fmt: skip
    distributed.shutdown_ray()


if __name__ == "__main__":
    main()
