"""Image grids for MLflow and reports (numpy only; callers turn model outputs into arrays)."""

from __future__ import annotations

import numpy as np


def image_grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """Tile images into one picture.

    Args:
        images: (N, C, H, W) floats in [0, 1] or uint8; C is 1 or 3.
        ncol: images per row.
        pad: white pixels between tiles.
    Returns:
        (rows*(H+pad)+pad, ncol*(W+pad)+pad, 3) uint8, ready for ``mlflow.log_image``/PNG.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    n, c, h, w = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=1)  # (N, 1, H, W) -> (N, 3, H, W)
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    return grid
