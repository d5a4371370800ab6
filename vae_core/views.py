"""Representation objectives on transformed views: the encoder infers x from t(x).

A plain VAE's latent tends to follow the principal components of the pixels (Lucas et al. 2019;
Rolinek et al. 2019). Three options, each off by default, ask more of the encoder:

1. Denoising criterion (Im et al., AAAI 2017): the encoder sees a transformed view t(x) and the
   decoder reconstructs the clean x,
       E_q(z|t(x)) [log p(x|z)] - KL(q(z|t(x)) || p(z)),
   still a lower bound on log p(x), since the seed's bound (eqs. 40-43) holds for any q.
2. Consistency regularisation (CR-VAE, Sinha & Dieng, NeurIPS 2021): lambda * KL(q(z|t(x)) ||
   q(z|x)), pulling the posterior of the view onto the posterior of the clean image.
3. A contrastive term on the posterior means of the two views: symmetric InfoNCE (van den Oord
   et al. 2018; SimCLR's NT-Xent, Chen et al. 2020) on L2-normalised means.

With (2) or (3) both views go through the model in one batch of 2B images (one forward through
the DDP wrapper, so gradients sync as usual), and the training loss is the mean of the clean
and the view bound plus the weighted extra terms. The ELBO the loop reports is always the clean
image's q(z|x) bound; evaluation and the IWAE bound never see a view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vae_core.augment import draw_device, jitter, rotate, uniform
from vae_core.elbo import ELBOTerms, elbo_terms


@dataclass(frozen=True)
class ViewConfig:
    """t(x), the transformed view the encoder sees; every field at its default is t = identity."""

    crop_scale: float = 1.0  # random resized crop: area fraction drawn in [crop_scale, 1]
    rotation: float = 0.0  # max rotation in degrees
    jitter: float = 0.0  # brightness and contrast factors in [1 - jitter, 1 + jitter]
    noise: float = 0.0  # std of additive Gaussian noise, in pixel units of [0, 1]
    mask_ratio: float = 0.0  # share of square patches set to black (masked-autoencoder style)
    mask_patch: int = 8  # side of a masked patch in pixels
    consistency_weight: float = 0.0  # lambda of KL(q(z|t(x)) || q(z|x)); needs a second pass
    contrastive_weight: float = 0.0  # weight of InfoNCE on the two views' posterior means
    contrastive_temperature: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_scale <= 1.0 or not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError("ViewConfig: crop_scale must be in (0, 1], mask_ratio in [0, 1)")
        if self.mask_patch < 1 or self.contrastive_temperature <= 0:
            raise ValueError("ViewConfig: mask_patch >= 1 and contrastive_temperature > 0")

    @property
    def transforms(self) -> bool:
        """True unless t is the identity."""
        return (
            self.crop_scale < 1.0
            or self.rotation > 0
            or self.jitter > 0
            or self.noise > 0
            or self.mask_ratio > 0
        )

    @property
    def paired(self) -> bool:
        """True when the loss needs q(z|x) and q(z|t(x)) together (consistency, contrastive)."""
        return self.consistency_weight > 0 or self.contrastive_weight > 0

    @property
    def metrics(self) -> tuple[str, ...]:
        """Names of the extra per-epoch training metrics this objective reports."""
        return ("consistency", "contrastive") if self.paired else ()


def resized_crop(x: Tensor, min_area: float, generator: torch.Generator | None = None) -> Tensor:
    """Random resized crop: (B,C,H,W) -> (B,C,H,W), a square-scaled window per image.

    Each image keeps a window of area fraction a ~ U(min_area, 1) (side sqrt(a)) at a uniform
    position, resized back to H x W (bilinear). The window always lies inside the image.
    """
    b = x.shape[0]
    area = 1.0 - (1.0 - min_area) * (uniform(b, 1.0, x, generator) + 1.0) / 2.0  # U(min_area, 1)
    side = area.sqrt()  # (B,) window side as a fraction of the image side
    tx, ty = uniform(b, 1.0, x, generator) * (1 - side), uniform(b, 1.0, x, generator) * (1 - side)
    zero = torch.zeros_like(side)
    affine = torch.stack([side, zero, tx, zero, side, ty], 1).view(-1, 2, 3)  # (B,6) -> (B,2,3)
    grid = F.affine_grid(affine.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mask_patches(
    x: Tensor, ratio: float, patch: int, generator: torch.Generator | None = None
) -> Tensor:
    """Black out round(ratio * P) of the P square patches of each image: (B,C,H,W) -> same.

    Patches tile the image from the top-left corner; the last row and column may be partial.
    """
    b, _, h, w = x.shape
    rows, cols = math.ceil(h / patch), math.ceil(w / patch)
    n_masked = round(ratio * rows * cols)
    scores = torch.rand(b, rows * cols, generator=generator, device=draw_device(x, generator))
    rank = scores.to(x.device).argsort(1).argsort(1)  # (B,P) rank of each patch's score
    keep = (rank >= n_masked).to(x.dtype).view(b, 1, rows, cols)  # (B,P) -> (B,1,rows,cols)
    keep = keep.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[..., :h, :w]
    return x * keep


def make_view(x: Tensor, cfg: ViewConfig, generator: torch.Generator | None = None) -> Tensor:
    """t(x): x (B,C,H,W) in [0, 1] -> the encoder's view (B,C,H,W) in [0, 1], drawn per image.

    Order: crop, rotation, jitter, noise, masking. Returns x itself when t is the identity.
    """
    if not cfg.transforms:
        return x
    if cfg.crop_scale < 1.0:
        x = resized_crop(x, cfg.crop_scale, generator)
    if cfg.rotation > 0:
        x = rotate(x, uniform(x.shape[0], cfg.rotation, x, generator))
    if cfg.jitter > 0:
        x = jitter(x, cfg.jitter, generator)
    if cfg.noise > 0:
        eps = torch.randn(x.shape, generator=generator, device=draw_device(x, generator))
        x = x + cfg.noise * eps.to(x.device, x.dtype)
    x = x.clamp(0.0, 1.0)
    if cfg.mask_ratio > 0:
        x = mask_patches(x, cfg.mask_ratio, cfg.mask_patch, generator)
    return x


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) per dim: four (B,J) -> (B,J).

    The closed form for two univariate Gaussians; with mu_p = 0, logvar_p = 0 it is the seed's
    eq. 40 (``vae_core.elbo.kl_standard_normal``).
    """
    log_ratio = logvar_q - logvar_p  # log sigma_q^2 / sigma_p^2
    mean_term = (mu_q - mu_p).square() * torch.exp(-logvar_p)
    return 0.5 * (log_ratio.exp() + mean_term - 1.0 - log_ratio)


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE of paired rows: a, b (B,J) -> () nats; row i of a and of b are a pair.

    Cosine similarities / temperature as logits; each row's positive is its pair and the other
    B - 1 rows of the other view are its negatives (one rank's batch under DDP).
    """
    logits = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / temperature  # (B,B)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _half(t: Tensor, first: bool) -> Tensor:
    n = t.shape[0] // 2
    return t[:n] if first else t[n:]


def view_terms(
    model: nn.Module,
    x: Tensor,
    cfg: ViewConfig,
    n_samples: int = 1,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
    generator: torch.Generator | None = None,
) -> ELBOTerms:
    """Training terms for x (B,C,H,W) under the view objective ``cfg``.

    t = identity and no paired term: exactly ``elbo_terms(model, x, ...)``. Denoising only: the
    encoder sees t(x), the bound is scored on x. Paired: x and t(x) in one (2B,...) pass; the
    returned per-image fields are the clean half's true ELBO terms, ``loss`` is the mean of
    both halves' objectives plus consistency and contrastive terms, ``extras`` holds the two.
    """
    view = make_view(x, cfg, generator)
    if not cfg.paired:
        return elbo_terms(model, x, n_samples, kl_weight, free_bits, x_view=view)
    both = elbo_terms(
        model, torch.cat([x, x]), n_samples, kl_weight, free_bits, x_view=torch.cat([x, view])
    )  # (2B,...): rows 0..B-1 encode x, rows B..2B-1 encode t(x); all are scored on x
    mu_x, mu_t = _half(both.mu, True), _half(both.mu, False)
    logvar_x, logvar_t = _half(both.logvar, True), _half(both.logvar, False)
    consistency = gaussian_kl(mu_t, logvar_t, mu_x, logvar_x).sum(1).mean()
    contrastive = info_nce(mu_x, mu_t, cfg.contrastive_temperature)
    loss = both.loss + cfg.consistency_weight * consistency + cfg.contrastive_weight * contrastive
    fields = [_half(t, True) for t in (both.neg_elbo, both.recon, both.kl, both.kl_per_dim)]
    return ELBOTerms(
        loss,
        *fields,
        mu_x,
        logvar_x,
        extras={"consistency": consistency.detach(), "contrastive": contrastive.detach()},
    )
