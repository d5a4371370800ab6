"""A trained model in use: load the checkpoint, feed it uint8 images, read out q(z|x).

The one home of model loading and encoding for ``retina-vae evaluate`` and
``retina-vae encode`` (the served MLflow model is :class:`vae_core.model.LatentMeans`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.errors import UserError
from vae_core.checkpoint import read_checkpoint, rebuild
from vae_core.model import ConvVAE


def load_model(path: str | Path, device: torch.device) -> tuple[ConvVAE, dict]:
    """The checkpoint's model (eval mode, on ``device``) and its ``extra`` dict; the file is
    read once. A missing or unreadable file is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model checkpoint not found (run `retina-vae train` first)")
    try:
        payload = read_checkpoint(path)
        model = rebuild(payload).to(device)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise UserError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None
    return model, payload["extra"]


def batches(
    images: np.ndarray, batch_size: int, device: torch.device, desc: str | None = None
) -> Iterator[torch.Tensor]:
    """(N,C,H,W) uint8 -> float batches (B,C,H,W) in [0, 1] on ``device``; with ``desc``, a
    progress bar (images) on a terminal's stderr."""
    bar = tqdm(total=len(images), desc=desc, unit="img", disable=None if desc else True,
               file=sys.stderr, leave=False)  # fmt: skip
    for start in range(0, len(images), batch_size):
        bar.update(min(batch_size, len(images) - start))
        chunk = torch.from_numpy(np.array(images[start : start + batch_size]))  # mmap -> RAM copy
        yield chunk.to(device).float().div_(255.0)
    bar.close()


@torch.no_grad()
def encode_images(
    model: ConvVAE,
    images: np.ndarray,
    batch_size: int,
    device: torch.device,
    desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """mu (N,J) and logvar (N,J) of q(z|x) for every image (N,C,H,W) uint8, float32 numpy
    (``desc``: a progress bar, :func:`batches`)."""
    mus, logvars = [], []
    for x in batches(images, batch_size, device, desc):
        mu, logvar = model.encode(x)
        mus.append(mu.cpu())
        logvars.append(logvar.cpu())
    j = model.config.latent_dim
    if not mus:
        return np.zeros((0, j), np.float32), np.zeros((0, j), np.float32)
    return torch.cat(mus).numpy(), torch.cat(logvars).numpy()


@torch.no_grad()
def encoder_features(
    model: ConvVAE, images: np.ndarray, batch_size: int, device: torch.device
) -> np.ndarray:
    """The encoder's last feature map, averaged over space, for every image (N,C,H,W) uint8:
    (N, widths[-1]) float32 numpy (:meth:`ConvVAE.features`, what the bottleneck reads)."""
    parts = [model.features(x).cpu() for x in batches(images, batch_size, device)]
    if not parts:
        return np.zeros((0, model.config.widths[-1]), np.float32)
    return torch.cat(parts).numpy()
