"""Convolutional VAE: encoder q(z|x) = N(mu, diag(exp(logvar))), decoder z -> params of p(x|z).

Shapes: B batch, C image channels, H x W image size, J latent size, L samples per image.
Images are float tensors in [0, 1]; the prior is p(z) = N(0, I).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vae_core.likelihoods import LIKELIHOODS, fp32, make_likelihood

ARCHS = ("conv", "resnet")

# logvar is squashed smoothly into [-LOGVAR_BOUND, LOGVAR_BOUND]: exp(logvar) in the KL and
# exp(0.5 * logvar) in the sampler then stay far from float32/bf16 overflow (exp(88) = inf)
# even when an early step sends the raw encoder output huge; tanh keeps a gradient, a hard
# clamp would not.
LOGVAR_BOUND = 10.0


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 1  # 1 for OCT B-scans, 3 for colour fundus photos
    height: int = 64
    width: int = 64
    widths: tuple[int, ...] = (32, 64, 128)  # channels per stride-2 stage; depth = len
    latent_dim: int = 16  # J
    likelihood: str = "bernoulli"  # bernoulli (continuous BCE) | gaussian(_optimal) | logistic
    arch: str = "conv"  # conv: one conv per stage | resnet: pre-activation residual stages
    blocks_per_stage: int = 1  # resnet only: residual blocks after each down/before each up

    def __post_init__(self) -> None:
        # Accept a list (from YAML or a checkpoint's plain dict) but store a hashable tuple.
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if min(self.in_channels, self.height, self.width, self.latent_dim) < 1:
            raise ValueError(f"VAEConfig: sizes must be positive, got {self}")
        if not self.widths or min(self.widths) < 1:
            raise ValueError(f"VAEConfig: widths must be non-empty and positive, got {self.widths}")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"VAEConfig: likelihood must be one of {LIKELIHOODS}")
        if self.arch not in ARCHS or self.blocks_per_stage < 1:
            raise ValueError(f"VAEConfig: arch must be one of {ARCHS}, blocks_per_stage >= 1")


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
        # Not `a or b`: the truth value of a compiled module calls len(), which it refuses.
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: no running statistics to sync across DDP ranks, and eval output
    # does not depend on the batch. gcd(8, c) always divides c.
    return nn.GroupNorm(math.gcd(8, channels), channels)


class PreActBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x)))))): a pre-activation residual block (He et al. 2016).

    The second conv starts at zero, so each block starts as the identity and a deep stack
    trains as stably as a shallow one.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)  # (N,c,h,w) -> (N,c,h,w)


def _up(c_in: int, c_out: int, size_in: tuple[int, int], size_out: tuple[int, int]) -> nn.Module:
    """Stride-2 transposed conv whose output_padding restores the encoder's exact size."""
    (h_in, w_in), (h_out, w_out) = size_in, size_out
    pad = (h_out - (2 * h_in - 1), w_out - (2 * w_in - 1))  # 0 for odd sizes, 1 for even
    return nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=pad)


def build_encoder(cfg: VAEConfig) -> nn.Sequential:
    """(B,C,H,W) -> (B,widths[-1],h,w): one stride-2 conv per width (+ residual blocks)."""
    if cfg.arch == "conv":
        layers, prev = [], cfg.in_channels
        for width in cfg.widths:
            layers += [nn.Conv2d(prev, width, 3, stride=2, padding=1), _norm(width), nn.SiLU()]
            prev = width
        return nn.Sequential(*layers)
    layers, prev = [nn.Conv2d(cfg.in_channels, cfg.widths[0], 3, padding=1)], cfg.widths[0]
    for width in cfg.widths:
        layers.append(nn.Conv2d(prev, width, 3, stride=2, padding=1))
        layers += [PreActBlock(width) for _ in range(cfg.blocks_per_stage)]
        prev = width
    return nn.Sequential(*layers, _norm(prev), nn.SiLU())  # pre-activation: close with norm+act


def build_decoder(cfg: VAEConfig, sizes: list[tuple[int, int]]) -> nn.Sequential:
    """(N,widths[-1],h,w) -> (N,widths[0],H,W): the encoder mirrored, ending in norm + SiLU."""
    layers: list[nn.Module] = []
    for i in reversed(range(len(cfg.widths))):
        out = cfg.widths[max(i - 1, 0)]
        if cfg.arch == "resnet":
            layers += [PreActBlock(cfg.widths[i]) for _ in range(cfg.blocks_per_stage)]
        layers.append(_up(cfg.widths[i], out, sizes[i + 1], sizes[i]))
        if cfg.arch == "conv" or i == 0:
            layers += [_norm(out), nn.SiLU()]
    return nn.Sequential(*layers)


class ConvVAE(nn.Module):
    """Convolutional VAE with a diagonal Gaussian posterior and a standard-normal prior.

    Kingma & Welling 2014; the objective is vae_core.elbo (Odaibo's derivation, eqs. 40-43).
    Two families share the interface: ``arch="conv"`` (one stride-2 conv per stage, the
    original model) and ``arch="resnet"`` (a stride-2 conv then ``blocks_per_stage``
    pre-activation residual blocks per stage, GroupNorm throughout), any size from 28 px up.

    Args:
        config: sizes, widths, latent size J, likelihood and architecture.

    Example:
        >>> vae = ConvVAE(VAEConfig(in_channels=3, height=28, width=28, widths=(32, 64)))
        >>> params, mu, logvar = vae(torch.rand(8, 3, 28, 28))  # (8,3,28,28), (8,16), (8,16)
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = config
        self.sizes = feature_sizes(config.height, config.width, len(config.widths))
        h, w = self.sizes[-1]
        self.flat_dim = config.widths[-1] * h * w
        self.encoder = build_encoder(config)
        self.to_latent = nn.Linear(self.flat_dim, 2 * config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, self.flat_dim)
        self.decoder = build_decoder(config, self.sizes)
        self.likelihood = make_likelihood(config.likelihood, config.in_channels)
        out = config.in_channels * self.likelihood.params_per_channel  # e.g. mean + log-scale
        self.to_params = nn.Conv2d(config.widths[0], out, 3, padding=1)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B,C,H,W) in [0, 1] -> mu (B,J), logvar (B,J); at least float32 under autocast."""
        h = self.encoder(x)  # (B, widths[-1], h, w)
        stats = fp32(self.to_latent(h.flatten(1)))  # (B, widths[-1]*h*w) -> (B, 2J)
        mu, raw = stats.chunk(2, dim=1)  # (B,2J) -> 2 x (B,J)
        logvar = LOGVAR_BOUND * torch.tanh(raw / LOGVAR_BOUND)
        return mu, logvar

    def features(self, x: Tensor) -> Tensor:
        """x (B,C,H,W) -> the encoder's last feature map averaged over space (B, widths[-1]).

        What the bottleneck (``to_latent``) reads, pooled: a probe on it beside a probe on mu
        shows whether label information reaches the encoder and is lost at the bottleneck.
        """
        return fp32(self.encoder(x)).mean(dim=(2, 3))  # (B,c,h,w) -> (B,c)

    def reparameterize(self, mu: Tensor, logvar: Tensor, n_samples: int = 1) -> Tensor:
        """mu, logvar (B,J) -> z = mu + sigma * eps, eps ~ N(0, I), shape (L,B,J)."""
        eps = torch.randn((n_samples, *mu.shape), dtype=mu.dtype, device=mu.device)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: Tensor) -> Tensor:
        """z (N,J) -> likelihood params (N,K*C,H,W), K = likelihood.params_per_channel."""
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


class LatentMeans(nn.Module):
    """The served model (MLflow ``model``): images (B,C,H,W) float in [0, 1] -> mu (B,J)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, x: Tensor) -> Tensor:
        mu, _ = self.vae.encode(x)
        return mu
