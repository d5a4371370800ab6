"""Convolutional VAE: encoder q(z|x) = N(mu, diag(exp(logvar))), decoder z -> params of p(x|z).

Shapes: B batch, C image channels, H x W image size, J latent size, L samples per image.
Images are float tensors in [0, 1]; the prior is p(z) = N(0, I).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LIKELIHOODS = ("bernoulli", "gaussian")

# logvar is squashed smoothly into [-LOGVAR_BOUND, LOGVAR_BOUND]: exp(logvar) in the KL and
# exp(0.5 * logvar) in the sampler then stay far from float32/bf16 overflow (exp(88) = inf)
# even when an early step sends the raw encoder output huge; tanh keeps a gradient, a hard
# clamp would not.
LOGVAR_BOUND = 10.0
# The Gaussian likelihood's learned scale is floored at 1e-3 (8-bit pixels are 1/255 apart): a
# scale that could shrink without bound would let the density, and the loss, run off to -inf.
LOG_SCALE_MIN = math.log(1e-3)
LOG_SCALE_INIT = math.log(0.1)  # start sharp enough that reconstruction outweighs the KL early on
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 1  # 1 for OCT B-scans, 3 for colour fundus photos
    height: int = 64
    width: int = 64
    widths: tuple[int, ...] = (32, 64, 128)  # conv channels per stride-2 stage; depth = len
    latent_dim: int = 16  # J
    likelihood: str = "bernoulli"  # "bernoulli" (continuous BCE) | "gaussian" (learned scale)

    def __post_init__(self) -> None:
        # Accept a list (from YAML or a checkpoint's plain dict) but store a hashable tuple.
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if min(self.in_channels, self.height, self.width, self.latent_dim) < 1:
            raise ValueError(f"VAEConfig: sizes must be positive, got {self}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"VAEConfig: widths must be non-empty and positive, got {self.widths}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"VAEConfig: likelihood must be one of {LIKELIHOODS}")


def feature_sizes(height: int, width: int, depth: int) -> list[tuple[int, int]]:
    """Spatial size before each stride-2 stage and after the last: depth + 1 (h, w) pairs.

    A 3x3 conv with stride 2 and padding 1 maps n -> ceil(n / 2); the decoder walks this list
    backwards so its output is exactly (height, width), odd sizes included.
    """
    sizes = [(height, width)]
    for _ in range(depth):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP (``.module``) or torch.compile (``._orig_mod``) wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _fp32(t: Tensor) -> Tensor:
    """Upcast bf16/fp16 (autocast output) to float32; float32 and float64 pass unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: no running statistics to sync across DDP ranks, and eval output
    # does not depend on the batch. gcd(8, c) always divides c.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class BernoulliLikelihood(nn.Module):
    """p(x|z) = prod Bernoulli(sigmoid(logits)), used with continuous targets in [0, 1]."""

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """x, params (N,C,H,W) -> (N,) log-likelihood summed over pixels, in nats."""
        # float32 even under bf16 autocast: a sum over 4k+ pixels needs the precision.
        nll = F.binary_cross_entropy_with_logits(_fp32(params), _fp32(x), reduction="none")
        return -nll.flatten(1).sum(1)  # (N,C,H,W) -> (N,)

    def mean(self, params: Tensor) -> Tensor:
        """(N,C,H,W) logits -> (N,C,H,W) mean image in [0, 1]."""
        return torch.sigmoid(_fp32(params))


class GaussianLikelihood(nn.Module):
    """p(x|z) = prod Normal(sigmoid(params), scale_c^2) with a learned log-scale per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((channels,), LOG_SCALE_INIT))

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """x, params (N,C,H,W) -> (N,) log-density summed over pixels, in nats."""
        mean = torch.sigmoid(_fp32(params))
        log_scale = _fp32(self.log_scale).clamp(min=LOG_SCALE_MIN)
        log_scale = log_scale.view(1, -1, 1, 1)  # (C,) -> (1,C,1,1)
        z = (_fp32(x) - mean) * torch.exp(-log_scale)
        log_p = -0.5 * z.square() - log_scale - 0.5 * _LOG_2PI
        return log_p.flatten(1).sum(1)  # (N,C,H,W) -> (N,)

    def mean(self, params: Tensor) -> Tensor:
        """(N,C,H,W) pre-sigmoid means -> (N,C,H,W) mean image in [0, 1]."""
        return torch.sigmoid(_fp32(params))


class ConvVAE(nn.Module):
    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        c, widths = config.in_channels, config.widths
        self.sizes = feature_sizes(config.height, config.width, len(widths))
        h, w = self.sizes[-1]
        self.flat_dim = widths[-1] * h * w

        # Encoder: one stride-2 conv stage per width, then a linear map to (mu, logvar).
        stages, prev = [], c
        for width in widths:
            stages += [nn.Conv2d(prev, width, 3, stride=2, padding=1), _norm(width), nn.SiLU()]
            prev = width
        self.encoder = nn.Sequential(*stages)
        self.to_latent = nn.Linear(self.flat_dim, 2 * config.latent_dim)

        # Decoder mirrors the encoder; output_padding restores each stage's exact input size.
        self.from_latent = nn.Linear(config.latent_dim, self.flat_dim)
        stages = []
        for i in reversed(range(len(widths))):
            out = widths[max(i - 1, 0)]
            (h_in, w_in), (h_out, w_out) = self.sizes[i + 1], self.sizes[i]
            pad = (h_out - (2 * h_in - 1), w_out - (2 * w_in - 1))  # 0 for odd sizes, 1 for even
            stages += [
                nn.ConvTranspose2d(widths[i], out, 3, stride=2, padding=1, output_padding=pad),
                _norm(out),
                nn.SiLU(),
            ]
        self.decoder = nn.Sequential(*stages)
        self.to_params = nn.Conv2d(widths[0], c, 3, padding=1)

        if config.likelihood == "bernoulli":
            self.likelihood: BernoulliLikelihood | GaussianLikelihood = BernoulliLikelihood()
        else:
            self.likelihood = GaussianLikelihood(c)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B,C,H,W) in [0, 1] -> mu (B,J), logvar (B,J); at least float32 under autocast."""
        h = self.encoder(x)  # (B, widths[-1], h, w)
        stats = _fp32(self.to_latent(h.flatten(1)))  # (B, widths[-1]*h*w) -> (B, 2J)
        mu, raw = stats.chunk(2, dim=1)  # (B,2J) -> 2 x (B,J)
        logvar = LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)
        return mu, logvar

    def reparameterize(self, mu: Tensor, logvar: Tensor, n_samples: int = 1) -> Tensor:
        """mu, logvar (B,J) -> z = mu + sigma * eps, eps ~ N(0, I), shape (L,B,J)."""
        eps = torch.randn((n_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: Tensor) -> Tensor:
        """z (N,J) -> likelihood params (N,C,H,W) (logits, or pre-sigmoid means)."""
        h, w = self.sizes[-1]
        feats = self.from_latent(z).view(-1, self.config.widths[-1], h, w)  # (N,flat) -> (N,c,h,w)
        return self.to_params(self.decoder(feats))

    def forward(self, x: Tensor, n_samples: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B,C,H,W) -> (params, mu (B,J), logvar (B,J)).

        ``n_samples=None``: one sample in train mode, z = mu in eval mode; params (B,C,H,W).
        ``n_samples=L``: L reparameterised samples in either mode, decoded in one batch;
        params (L*B,C,H,W), sample-major (rows l*B .. l*B+B-1 belong to sample l).
        """
        mu, logvar = self.encode(x)
        if n_samples is None and not self.training:
            return self.decode(mu), mu, logvar
        z = self.reparameterize(mu, logvar, n_samples or 1)  # (L,B,J)
        return self.decode(z.flatten(0, 1)), mu, logvar  # (L,B,J) -> (L*B,J)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """x (B,C,H,W) -> mean reconstruction (B,C,H,W) in [0, 1], decoded from z = mu."""
        mu, _ = self.encode(x)
        return self.likelihood.mean(self.decode(mu))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws z ~ N(0, I) -> mean images (n,C,H,W) in [0, 1]."""
        device = self.to_params.weight.device
        # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor).
        noise_device = generator.device if generator is not None else device
        z = torch.randn((n, self.config.latent_dim), generator=generator, device=noise_device)
        return self.likelihood.mean(self.decode(z.to(device)))
