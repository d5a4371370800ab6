"""Training-time augmentation of image batches, on the device, in pure PyTorch.

Small rotations, brightness/contrast jitter and horizontal flips, drawn per image. Results are
re-quantised to the 8-bit grid (k / 255) so the discretised likelihood stays a probability of
8-bit images. A horizontal flip turns a left eye into a right one: the eye codes travelling with
the batch (+1 right, -1 left, 0 unknown) are flipped with the pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class AugmentConfig:
    rotation: float = 0.0  # max rotation in degrees, drawn uniformly in [-rotation, rotation]
    jitter: float = 0.0  # brightness and contrast factors drawn in [1 - jitter, 1 + jitter]
    hflip: bool = False  # flip half of the images left-right

    @property
    def active(self) -> bool:
        return self.rotation > 0 or self.jitter > 0 or self.hflip


def draw_device(x: Tensor, generator: torch.Generator | None) -> torch.device:
    """Where random numbers for x are drawn: the generator's own device (a CPU generator
    cannot fill a CUDA tensor), else x's."""
    return generator.device if generator is not None else x.device


def uniform(n: int, half_width: float, x: Tensor, generator: torch.Generator | None) -> Tensor:
    """n draws from U(-half_width, half_width) on x's device, float32."""
    u = torch.rand(n, generator=generator, device=draw_device(x, generator))
    return ((2.0 * u - 1.0) * half_width).to(x.device)


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image of x (B,C,H,W) by its angle (B,) about the centre; black fill."""
    theta = degrees * (math.pi / 180.0)
    cos, sin, zero = torch.cos(theta), torch.sin(theta), torch.zeros_like(theta)
    affine = torch.stack([cos, -sin, zero, sin, cos, zero], 1).view(-1, 2, 3)  # (B,6) -> (B,2,3)
    grid = F.affine_grid(affine.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def jitter(x: Tensor, amount: float, generator: torch.Generator | None = None) -> Tensor:
    """Per-image brightness and contrast factors in [1 - amount, 1 + amount]: (B,C,H,W) -> same.

    Not clamped: the caller clamps (and, for training targets, re-quantises).
    """
    b = x.shape[0]
    # (B,) -> (B,1,1,1): one factor per image
    brightness = 1.0 + uniform(b, amount, x, generator).view(-1, 1, 1, 1)
    contrast = 1.0 + uniform(b, amount, x, generator).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # (B,1,1,1) per-image mean grey level
    return (x - mean) * contrast + mean * brightness


def augment(
    x: Tensor,
    cfg: AugmentConfig,
    eye: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor | None]:
    """x (B,C,H,W) in [0, 1] -> augmented x (B,C,H,W) on the 8-bit grid, and eye codes (B,).

    ``eye`` (B,) holds +1 (right), -1 (left) or 0 (unknown); flipped images get -eye.
    """
    if not cfg.active:
        return x, eye
    b = x.shape[0]
    if cfg.rotation > 0:
        x = rotate(x, uniform(b, cfg.rotation, x, generator))
    if cfg.jitter > 0:
        x = jitter(x, cfg.jitter, generator)
    if cfg.hflip:
        flip = uniform(b, 1.0, x, generator) > 0  # (B,) bool, half of the images
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if eye is not None:
            eye = torch.where(flip.to(eye.device), -eye, eye)
    return torch.round(x.clamp(0.0, 1.0) * 255.0) / 255.0, eye
