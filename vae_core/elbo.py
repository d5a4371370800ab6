"""The VAE objective exactly as the seed derives it, plus the IWAE bound for evaluation.

Equation numbers refer to Odaibo, "Tutorial: Deriving the Standard VAE Loss Function":
eq. 40 closed-form KL(q(z|x) || N(0, I)) per latent dim, eq. 42 the objective G with the
reconstruction term averaged over L reparameterised samples, eq. 43 the loss -G.

Two training-only changes to the objective never touch the reported ELBO: the KL weight
(beta, warm-up) and free bits (Kingma et al. 2016, "Improved variational inference with
inverse autoregressive flow", eq. in sec. C.8): each latent dim's batch-mean KL counts as at
least ``free_bits`` nats, so the optimiser gains nothing by collapsing a dim below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from vae_core.likelihoods import LOG_2PI
from vae_core.model import unwrap


def kl_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent dim: (B,J), (B,J) -> (B,J).

    Eq. 40 gives -KL = 1/2 [1 + log sigma^2 - sigma^2 - mu^2]; this returns its negative.
    """
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar)


@dataclass
class ELBOTerms:
    loss: Tensor  # () training objective, batch mean: kl_weight * KL (free bits) - recon
    neg_elbo: Tensor  # (B,) true negative ELBO, eq. 43 (KL weight 1)
    recon: Tensor  # (B,) E_q log p(x|z), the L-sample mean of eq. 42
    kl: Tensor  # (B,) KL summed over the J latent dims (eq. 42's first sum)
    kl_per_dim: Tensor  # (B,J) eq. 40 per dim
    mu: Tensor  # (B,J) posterior means (for active-unit statistics)
    logvar: Tensor  # (B,J) posterior log-variances
    extras: dict[str, Tensor] = field(default_factory=dict)  # () batch means of extra terms


def _repeat(x: Tensor, n: int) -> Tensor:
    """(B,C,H,W) -> (n*B,C,H,W), sample-major to match ConvVAE.forward's n-sample output."""
    return x.unsqueeze(0).expand(n, *x.shape).reshape(n * x.shape[0], *x.shape[1:])


def free_bits_kl(kl_per_dim: Tensor, free_bits: float) -> Tensor:
    """(B,J) KL per dim -> () sum_j max(free_bits, mean_b KL_bj): the KL term training sees.

    With ``free_bits = 0`` this is the batch mean of eq. 42's KL sum, unchanged.
    """
    per_dim = kl_per_dim.mean(0)  # (B,J) -> (J,)
    return per_dim.clamp(min=free_bits).sum() if free_bits > 0 else per_dim.sum()


def elbo_terms(
    model: nn.Module,
    x: Tensor,
    n_samples: int = 1,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
    x_view: Tensor | None = None,
) -> ELBOTerms:
    """Per-image ELBO terms for x (B,C,H,W) in [0, 1] with L = n_samples samples per image.

    ``kl_weight`` and ``free_bits`` shape ``loss`` only; ``neg_elbo`` is always the true bound.
    ``x_view`` (B,C,H,W), when given, is what the encoder sees instead of x (the denoising
    criterion, vae_core.views); the likelihood is always of x, so the bound stays one on log p(x).
    ``model`` may be DDP-wrapped: the forward pass goes through the wrapper (so DDP syncs
    gradients); only the likelihood is read from the bare model.
    """
    encoded = x if x_view is None else x_view
    params, mu, logvar = model(encoded, n_samples=n_samples)  # params (L*B,K*C,H,W)
    log_px = unwrap(model).likelihood.log_prob(_repeat(x, n_samples), params)  # (L*B,)
    # (L*B,) -> (L,B) -> (B,): eq. 42's reconstruction term 1/L sum_l log p(x|z^(l))
    recon = log_px.view(n_samples, x.shape[0]).mean(0)
    kl_per_dim = kl_standard_normal(mu, logvar)  # (B,J), eq. 40
    kl = kl_per_dim.sum(1)  # sum over j = 1..J, eq. 42
    neg_elbo = kl - recon  # eq. 43: L = -G
    loss = kl_weight * free_bits_kl(kl_per_dim, free_bits) - recon.mean()
    return ELBOTerms(loss, neg_elbo, recon, kl, kl_per_dim, mu, logvar)


def _log_normal(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """Diagonal Normal log-density summed over the last dim: (...,J) -> (...)."""
    return -0.5 * ((z - mean).square() * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


@torch.no_grad()
def iwae_bound(model: nn.Module, x: Tensor, k: int, chunk_size: int | None = None) -> Tensor:
    """Importance-weighted bound (Burda et al. 2015) on log p(x): x (B,C,H,W) -> (B,) nats.

    log (1/k) sum_i p(x, z_i) / q(z_i|x), z_i ~ q(z|x); k = 1 is the single-sample ELBO and the
    bound rises towards log p(x) with k. All images are done together; ``chunk_size`` splits
    the k samples only, to bound memory (each chunk decodes chunk_size * B images).
    """
    core = unwrap(model)
    mu, logvar = core.encode(x)  # (B,J) each
    chunk_size = chunk_size or k
    log_w = []
    for start in range(0, k, chunk_size):
        n = min(chunk_size, k - start)
        z = core.reparameterize(mu, logvar, n)  # (n,B,J)
        params = core.decode(z.flatten(0, 1))  # (n,B,J) -> (n*B,J) -> (n*B,C,H,W)
        log_px = core.likelihood.log_prob(_repeat(x, n), params).view(n, -1)  # (n*B,) -> (n,B)
        log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))  # (n,B)
        log_qz = _log_normal(z, mu, logvar)  # (n,B)
        log_w.append(log_px + log_pz - log_qz)
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)  # (k,B) -> (B,)
