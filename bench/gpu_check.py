"""GPU path check (issue 21): the training loop at 128 px x 3, bf16 + channels-last, one GPU.

    python3 bench/gpu_check.py [--images 16384] [--epochs 5] [--loader-workers 4] [--out DIR]

The prepared script for a session that is lent a GPU machine. It needs torch alone: those
machines carry PyTorch but no Ray, MLflow or DVC, and Ray 2.60's wheel (79 MB) is larger than
what one device call may carry (64 MiB). So it runs the loop every Ray Train worker runs
(vae_core.training.fit_local: the same train_epoch, autocast and memory format), fed the way a
worker is fed (a memory-mapped uint8 array, a DataLoader with pinned memory). It prints, per
epoch, images/s and the share of the epoch spent waiting for the loader; the GPU utilisation
sampled by ``nvidia-smi`` every 0.5 s after the first (warm-up) epoch; peak GPU memory; and the
bf16 against the float32 ELBO of one batch. ``--device cpu --size 32`` smoke-checks it here.
Results also go to ``DIR/gpu_check.json`` (``--out``, default ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_core.elbo import elbo_terms  # noqa: E402
from vae_core.model import ConvVAE, VAEConfig  # noqa: E402
from vae_core.training import TrainConfig, fit_local, to_input  # noqa: E402


class Memmapped(Dataset):
    """Item i of a (N,C,H,W) uint8 ``.npy`` file, memory-mapped per process, as a tensor."""

    def __init__(self, path: Path) -> None:
        self.path, self.length = path, len(np.load(path, mmap_mode="r"))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(np.load(self.path, mmap_mode="r")[i]))


def write_images(folder: Path, n: int, channels: int, size: int, seed: int) -> Path:
    """n random uint8 images (N,C,H,W) as an .npy file: the cost of a step does not depend on
    what the pixels show."""
    path = folder / "train_images.npy"
    out = np.lib.format.open_memmap(path, "w+", np.uint8, (n, channels, size, size))
    rng = np.random.default_rng(seed)
    for start in range(0, n, 1024):
        stop = min(n, start + 1024)
        out[start:stop] = rng.integers(0, 256, (stop - start, channels, size, size), np.uint8)
    out.flush()
    return path


class GpuSampler:
    """``nvidia-smi`` read every 0.5 s in a thread: (seconds, utilisation %, memory MiB)."""

    def __init__(self) -> None:
        cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
               "--format=csv,noheader,nounits", "-lms", "500"]  # fmt: skip
        self.samples: list[tuple[float, float, float]] = []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            util, mem = (float(v) for v in line.split(",")[:2])
            self.samples.append((time.perf_counter(), util, mem))

    def between(self, start: float, stop: float) -> list[float]:
        return [u for t, u, _ in self.samples if start <= t <= stop]

    def stop(self) -> None:
        self.proc.terminate()


def elbo_gap(model: ConvVAE, batch: torch.Tensor, device: str) -> tuple[float, float]:
    """Mean -ELBO (nats per image) of one batch in float32 and under bf16 autocast, same noise."""
    x, values = to_input(batch, device, False), []
    model.eval()
    for bf16 in (False, True):
        torch.manual_seed(0)
        with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16, bf16):
            values.append(elbo_terms(model, x, 1, 1.0).neg_elbo.mean().item())
    return values[0], values[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=4)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"))
    args = parser.parse_args()
    on_gpu = torch.device(args.device).type == "cuda"
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    print(f"torch {torch.__version__}, {name}, {args.size} px x {args.channels}, {args.images} "
          f"images, batch {args.batch_size}, {args.loader_workers} loader workers")  # fmt: skip
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=2e-3, weight_decay=1e-4,
        lr_schedule="cosine", grad_clip=5.0, beta=1.0, kl_warmup_epochs=0, samples=1, seed=0,
        bf16=True, channels_last=True, compile=args.compile,
    )  # fmt: skip
    model_cfg = VAEConfig(in_channels=args.channels, height=args.size, width=args.size,
                          widths=(32, 64, 128, 256))  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = Memmapped(write_images(Path(tmp), args.images, args.channels, args.size, 0))
        common = {"num_workers": args.loader_workers, "pin_memory": on_gpu,
                  "persistent_workers": args.loader_workers > 0}  # fmt: skip
        train = DataLoader(data, batch_size=args.batch_size, shuffle=True, **common)
        val = DataLoader(torch.utils.data.Subset(data, range(args.batch_size * 4)),
                         batch_size=args.batch_size, **common)  # fmt: skip
        sampler = GpuSampler() if on_gpu else None
        ends: list[float] = [time.perf_counter()]
        model = ConvVAE(model_cfg)
        history = fit_local(model, train, val, cfg, args.device,
                            on_epoch=lambda *_: ends.append(time.perf_counter()))  # fmt: skip
        fp32, bf16 = elbo_gap(model, next(iter(val)), args.device)
    result = {"device": name, "torch": torch.__version__, "epochs": []}
    for epoch, row in enumerate(history):
        util = sampler.between(ends[epoch], ends[epoch + 1]) if sampler else []
        result["epochs"].append({
            "images_per_s": row["train_images_per_s"],
            "data_wait_share": row["train_data_wait_share"],
            "gpu_util_mean": float(np.mean(util)) if util else None,
        })  # fmt: skip
        gpu = f", GPU util {np.mean(util):5.1f}% ({len(util)} samples)" if util else ""
        print(f"epoch {epoch + 1}: {row['train_images_per_s']:9.0f} images/s, data wait "
              f"{row['train_data_wait_share']:6.1%}{gpu}")  # fmt: skip
    if sampler:
        sampler.stop()
        util = sampler.between(ends[1], ends[-1])  # after the warm-up epoch
        result["gpu_util_after_warmup"] = float(np.mean(util)) if util else None
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"after epoch 1: GPU util mean {result['gpu_util_after_warmup']}% over "
              f"{len(util)} samples; peak memory {result['peak_memory_gib']:.2f} GiB")  # fmt: skip
    result["neg_elbo_fp32"], result["neg_elbo_bf16"] = fp32, bf16
    print(f"one batch -ELBO: float32 {fp32:.2f}, bf16 {bf16:.2f} nats per image "
          f"(relative difference {abs(bf16 - fp32) / abs(fp32):.2e})")  # fmt: skip
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
