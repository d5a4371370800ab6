"""Training throughput against the machine's peak: plain loop variants and Ray Train splits.

For each image shape (default 64 px x 1 channel and 128 px x 3 channels):

1. FLOP per image of one training step (forward + backward of the ELBO), counted with
   ``torch.utils.flop_counter.FlopCounterMode`` on the real model, not estimated by hand.
2. The practical peak of this machine in the same run: GFLOP/s of a large ``torch.mm`` in
   float32, and in bf16 where the CPU has native bf16 (measured before and after, best of N).
3. Plain-loop variants (float32 baseline, channels-last, bf16 autocast, both, torch.compile and
   other batch sizes on request, e.g. ``bf16+bs32``) in interleaved rounds: every round runs one
   training epoch of each variant, so a load change hits all of them alike; the first round is
   warm-up, the best later round counts.
   Printed: images/s, achieved GFLOP/s, share of the fp32 (and bf16) peak, ratio to float32.
4. Ray Train worker x thread splits of the same CPUs (default 1x2 and 2x1 on 2 CPUs), each with
   the fastest plain variant's settings and a plain-loop epoch of that variant right before it;
   the best epoch after the first counts, and the ratio is to the best plain epoch of the run.

    .venv/bin/python bench/bench_train.py --images 1024 --epochs 4 --rounds 4

Smoke mode (checks the script, its figures mean nothing): ``--images 64 --epochs 2 --rounds 2
--shapes 64x1``. The figures need an otherwise idle machine.

Issue 21 targets at 64x1 on 2 cores: plain loop >= 340 images/s and >= 35% of the practical
peak; Ray Train 2 workers >= 0.95x the best plain loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle
import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_core import distributed  # noqa: E402
from vae_core.elbo import elbo_terms  # noqa: E402
from vae_core.model import ConvVAE, VAEConfig  # noqa: E402
from vae_core.training import (  # noqa: E402
    TrainConfig,
    cpu_supports_bf16,
    make_optimizer,
    make_scheduler,
    prepare_model,
    to_input,
    train_epoch,
)

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the data factory runs in Ray

WIDTHS = {1: (32, 64, 128), 3: (32, 64, 128, 256)}  # per channel count, as in the issue
VARIANT_FLAGS = {"fp32": {}, "cl": {"cpu_channels_last": True}, "bf16": {"cpu_bf16": True}}
VARIANT_FLAGS["compile"] = {"compile": True}


class Images(Dataset):
    """Random-blob uint8 images (N,C,S,S), deterministic per seed."""

    def __init__(self, n: int, size: int, channels: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:size, 0:size] / size
        centres = rng.uniform(0.2, 0.8, (n, 2, 1, 1))
        blobs = np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 0.02)
        tint = rng.uniform(0.5, 1.0, (n, channels, 1, 1))  # per-channel brightness
        self.images = torch.from_numpy((blobs[:, None] * tint * 255).astype(np.uint8))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]  # (C,S,S)


@dataclasses.dataclass(frozen=True)
class Data:
    n: int
    size: int
    channels: int

    def __call__(self) -> tuple[Images, Images]:
        val = max(1, self.n // 8)
        return Images(self.n, self.size, self.channels, 0), Images(val, self.size, self.channels, 1)


# ----------------------------------------------------------------------------- peak and FLOP


def mm_gflops(dtype: torch.dtype, n: int, repeats: int) -> float:
    """Best-of-``repeats`` GFLOP/s of an (n,n) @ (n,n) matmul in ``dtype``: 2 n^3 FLOP each."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, packing buffers
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def roofline(n: int, repeats: int) -> dict[str, float]:
    peaks = {"fp32": mm_gflops(torch.float32, n, repeats)}
    if cpu_supports_bf16():
        peaks["bf16"] = mm_gflops(torch.bfloat16, n, repeats)
    return peaks


def flop_per_image(model_cfg: VAEConfig, cfg: TrainConfig) -> float:
    """FLOP of one training step's forward + backward per image, counted by FlopCounterMode."""
    torch.manual_seed(cfg.seed)
    model = ConvVAE(model_cfg)
    x = torch.rand(cfg.batch_size, model_cfg.in_channels, model_cfg.height, model_cfg.width)
    with FlopCounterMode(display=False) as counter:
        elbo_terms(model, x, cfg.samples, cfg.beta).loss.backward()
    return counter.get_total_flops() / cfg.batch_size


# ----------------------------------------------------------------------------- plain loop


class Plain:
    """One plain-loop variant: its own model, optimizer and loader; one epoch per call."""

    def __init__(self, name: str, spec: distributed.RunSpec) -> None:
        self.name, self.cfg = name, spec.train
        self.model = prepare_model(distributed.build_model(spec), self.cfg, "cpu")
        self.loader, _ = distributed.make_loaders(*spec.data(), self.cfg.batch_size, seed=0)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.scheduler = make_scheduler(self.optimizer, self.cfg, len(self.loader))
        self.epochs: list[float] = []  # images/s of each epoch run
        self.waits: list[float] = []  # and the share of it spent waiting for the loader

    def epoch(self) -> float:
        m = train_epoch(self.model, self.loader, self.optimizer, self.scheduler, self.cfg, 0, "cpu")
        self.epochs.append(m["images_per_s"])
        self.waits.append(m["data_wait_share"])
        return self.epochs[-1]

    def best(self) -> float:
        """Best epoch after the first (warm-up: allocator, oneDNN primitives, compilation)."""
        return max(self.epochs[1:] or self.epochs)

    def best_wait(self) -> float:
        """The data-wait share of the best epoch."""
        return self.waits[self.epochs.index(self.best())]


def loader_images_per_s(plain: Plain) -> float:
    """images/s of iterating the training loader alone, converted as train_epoch does."""
    start, n = time.perf_counter(), 0
    for batch in plain.loader:
        n += len(to_input(batch, "cpu", False))
    return n / (time.perf_counter() - start)


def batch_token(token: str) -> int | None:
    """N for a variant token bsN (N > 0), else None."""
    digits = token.removeprefix("bs")
    return int(digits) if token.startswith("bs") and digits.isdigit() and int(digits) else None


def variant_spec(base: distributed.RunSpec, name: str) -> distributed.RunSpec:
    """``name``'s tokens joined by '+': VARIANT_FLAGS keys, or bsN for a batch size of N."""
    flags: dict = {}
    for token in name.split("+"):
        if batch_token(token):
            flags["batch_size"] = batch_token(token)
        elif token in VARIANT_FLAGS:
            flags.update(VARIANT_FLAGS[token])
        else:
            raise SystemExit(f"--variants: unknown token {token!r} in {name!r} "
                             f"(expected {'|'.join(VARIANT_FLAGS)} or bsN, N > 0)")  # fmt: skip
    return dataclasses.replace(base, train=dataclasses.replace(base.train, **flags))


def largest_batch(args: argparse.Namespace) -> int:
    """The largest batch any variant asks for (--batch-size or a bsN token)."""
    tokens = args.variants.replace(",", "+").split("+")
    return max([args.batch_size, *filter(None, map(batch_token, tokens))])


# ----------------------------------------------------------------------------- report


def _share(gflops: float, peak: float) -> str:
    return f"{100 * gflops / peak:5.1f}%"


def report_plain(plains: list[Plain], flop: float, peaks: dict[str, float]) -> None:
    base = plains[0].best()
    head = f"  {'variant':<22}{'images/s':>10}{'GFLOP/s':>9}{'of fp32 peak':>14}"
    print(head + (f"{'of bf16 peak':>14}" if "bf16" in peaks else "") + f"{'vs fp32':>9}"
          f"{'data wait':>11}")  # fmt: skip
    for p in plains:
        ips = p.best()
        gflops = ips * flop / 1e9
        line = f"  {p.name:<22}{ips:10.1f}{gflops:9.1f}{_share(gflops, peaks['fp32']):>14}"
        if "bf16" in peaks:
            line += f"{_share(gflops, peaks['bf16']):>14}"
        epochs = " ".join(f"{e:.0f}" for e in p.epochs)
        print(f"{line}{ips / base:8.2f}x{p.best_wait():10.1%}   (epochs: {epochs})")


def run_ray(
    spec: distributed.RunSpec, splits: list[tuple[int, int]], best: Plain, flop: float
) -> None:
    """Each split after one more plain epoch of ``best``; ratios to the run's best plain epoch."""
    results = []
    with tempfile.TemporaryDirectory() as storage:
        for workers, threads in splits:
            best.epoch()  # the plain baseline, right before this split
            scaling = distributed.Scaling(num_workers=workers, cpus_per_worker=threads)
            start = time.perf_counter()
            fit = distributed.fit(spec, scaling, storage, f"bench-{workers}x{threads}")
            wall = time.perf_counter() - start
            ips = [r["train_images_per_s"] for r in fit.history]
            top = max(ips[1:] or ips)
            wait = fit.history[ips.index(top)]["train_data_wait_share"]
            results.append((workers, threads, top, wait, wall, ips))
    plain = best.best()
    print(f"  plain loop ({best.name}), best epoch of the run: {plain:.1f} images/s")
    print(f"  {'workers x threads':<20}{'images/s':>10}{'GFLOP/s':>9}{'vs plain':>10}"
          f"{'data wait':>11}")  # fmt: skip
    for workers, threads, ips, wait, wall, epochs in results:
        per = " ".join(f"{e:.0f}" for e in epochs)
        print(f"  {f'{workers} x {threads}':<20}{ips:10.1f}{ips * flop / 1e9:9.1f}"
              f"{ips / plain:9.2f}x{wait:10.1%}   fit() {wall:.1f} s (epochs: {per})")  # fmt: skip


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'64x1,128x3' -> [(64, 1), (128, 3)]: size in px x channels."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]  # type: ignore[misc]


def bench_shape(args: argparse.Namespace, size: int, channels: int, base_flop: float) -> float:
    """Everything for one shape; returns its FLOP per image."""
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=2e-3, weight_decay=1e-4,
        lr_schedule="cosine", grad_clip=5.0, beta=1.0, kl_warmup_epochs=0, samples=1, seed=0,
    )  # fmt: skip
    model = VAEConfig(in_channels=channels, height=size, width=size, widths=WIDTHS[channels])
    flop = flop_per_image(model, cfg)
    # The same work per epoch for every shape: fewer images of a costlier shape.
    n = max(2 * largest_batch(args), round(args.images * (base_flop or flop) / flop))
    spec = distributed.RunSpec(model=model, train=cfg, data=Data(n, size, channels))
    print(f"\n== {size} px x {channels} channel(s), widths {model.widths}, {n} images, "
          f"batch {args.batch_size}: {flop / 1e9:.3f} GFLOP per image (forward + backward, "
          "FlopCounterMode)")  # fmt: skip

    torch.set_num_threads(args.cpus)
    names = [v for v in args.variants.split(",") if v != "fp32"]
    names = ["fp32", *(v for v in names if "bf16" not in v or cpu_supports_bf16())]
    plains = [Plain(name, variant_spec(spec, name)) for name in names]
    print(f"  loader alone: {loader_images_per_s(plains[0]):.0f} images/s")
    peaks = roofline(args.mm_size, args.mm_repeats)
    for _ in range(args.rounds):
        for plain in plains:
            plain.epoch()
    for key, value in roofline(args.mm_size, args.mm_repeats).items():
        peaks[key] = max(peaks[key], value)  # the better of before and after the plain rounds
    print("  peak (torch.mm " + f"{args.mm_size}^3): "
          + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()))  # fmt: skip
    print(f"  plain loop, {args.rounds} interleaved rounds, best round after the first, "
          f"{args.cpus} threads:")  # fmt: skip
    report_plain(plains, flop, peaks)
    if args.splits:
        best = max(plains, key=Plain.best)
        splits = [tuple(int(v) for v in s.split("x")) for s in args.splits.split(",")]
        print(f"  Ray Train, {args.epochs} epochs per split, settings of {best.name}:")
        run_ray(variant_spec(spec, best.name), splits, best, flop)  # type: ignore[arg-type]
    return flop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cpus = os.cpu_count() or 1
    parser.add_argument("--images", type=int, default=1024, help="images at the first shape")
    parser.add_argument("--shapes", default="64x1,128x3", help="size x channels, comma-separated")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per Ray Train split")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved plain-loop rounds")
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument(
        "--variants",
        default="fp32,cl,bf16,bf16+cl",
        help="plain-loop variants, tokens fp32|cl|bf16|compile|bsN (batch size N) joined by '+' "
        "(fp32 at --batch-size always runs)",
    )
    parser.add_argument(
        "--splits",
        default=f"1x{cpus},{cpus}x1" if cpus > 1 else "1x1",
        help="Ray Train workers x threads (CPUs) per worker; '' skips Ray",
    )
    parser.add_argument("--cpus", type=int, default=cpus, help="threads of the plain loop")
    parser.add_argument("--mm-size", type=int, default=2048)
    parser.add_argument("--mm-repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{args.cpus} CPUs, torch {torch.__version__}, native CPU bf16: {cpu_supports_bf16()}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    if args.splits:
        distributed.init_ray(None, num_cpus=args.cpus)
    base_flop = 0.0
    for size, channels in parse_shapes(args.shapes):
        flop = bench_shape(args, size, channels, base_flop)
        base_flop = base_flop or flop
    if args.splits:
        distributed.shutdown_ray()


if __name__ == "__main__":
    main()
