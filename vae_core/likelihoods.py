"""Decoder likelihoods p(x|z) over images in [0, 1]: Bernoulli, Gaussian, discretised logistic.

Each turns the decoder's raw output ``params`` (N, K*C, H, W), K = ``params_per_channel``, into a
per-image log-likelihood (N,) in nats and a mean image. Sums over thousands of pixels run in
float32 even under bf16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian_optimal", "logistic")
LOG_2PI = math.log(2.0 * math.pi)
# The Gaussian likelihood's learned scale is floored at 1e-3 (8-bit pixels are 1/255 apart): a
# scale that could shrink without bound would let the density, and the loss, run off to -inf.
LOG_SCALE_MIN = math.log(1e-3)
LOG_SCALE_INIT = math.log(0.1)  # start sharp enough that reconstruction outweighs the KL early on
BINS = 255  # 8-bit images: x takes the values k / 255, k = 0..255
# A logistic scale far below one bin (1/255) buys nothing: the bin's mass is already ~1.
LOGISTIC_LOG_SCALE_MIN = math.log(0.01 / BINS)


def fp32(t: Tensor) -> Tensor:
    """Upcast bf16/fp16 (autocast output) to float32; float32 and float64 pass unchanged."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _per_image(log_p: Tensor) -> Tensor:
    return log_p.flatten(1).sum(1)  # (N,C,H,W) -> (N,)


class BernoulliLikelihood(nn.Module):
    """p(x|z) = prod Bernoulli(sigmoid(logits)), used with continuous targets in [0, 1].

    Not a normalised density over grey levels: its nats rank models, no more.
    """

    params_per_channel = 1
    is_density = False

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """x, params (N,C,H,W) -> (N,) log-likelihood summed over pixels, in nats."""
        nll = F.binary_cross_entropy_with_logits(fp32(params), fp32(x), reduction="none")
        return -_per_image(nll)

    def mean(self, params: Tensor) -> Tensor:
        """(N,C,H,W) logits -> (N,C,H,W) mean image in [0, 1]."""
        return torch.sigmoid(fp32(params))


class GaussianLikelihood(nn.Module):
    """p(x|z) = prod Normal(sigmoid(params), scale_c^2), a learned log-scale per channel."""

    params_per_channel = 1
    is_density = True  # a density of the continuous [0, 1] values, not of the 8-bit levels

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((channels,), LOG_SCALE_INIT))

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """x, params (N,C,H,W) -> (N,) log-density summed over pixels, in nats."""
        mean = torch.sigmoid(fp32(params))
        log_scale = fp32(self.log_scale).clamp(min=LOG_SCALE_MIN)
        log_scale = log_scale.view(1, -1, 1, 1)  # (C,) -> (1,C,1,1)
        z = (fp32(x) - mean) * torch.exp(-log_scale)
        return _per_image(-0.5 * z.square() - log_scale - 0.5 * LOG_2PI)

    def mean(self, params: Tensor) -> Tensor:
        """(N,C,H,W) pre-sigmoid means -> (N,C,H,W) mean image in [0, 1]."""
        return torch.sigmoid(fp32(params))


class OptimalGaussianLikelihood(nn.Module):
    """p(x|z) = prod Normal(sigmoid(params), sigma_c^2), sigma_c the maximum-likelihood scale.

    The "optimal sigma-VAE" of Rybkin, Daniilidis & Levine (ICML 2021, "Simple and effective
    VAE training with calibrated decoders"): for fixed means the Gaussian log-density is
    maximised by sigma_c^2 = the mean squared error of channel c, so training plugs that in,
    computed on the batch (all-reduced over DDP ranks), instead of learning a log-scale by
    gradient steps. A learned scale moves at most lr per step: on a few hundred images (a
    few steps per epoch) it stays near its initial value while the error shrinks. sigma_c is
    treated as a constant in the gradient: at the maximiser dL/dsigma = 0, so the means'
    gradient is the same either way. Evaluation (model.eval(), or no grad) uses a fixed scale,
    ``variance``, a running mean of the training batches' values saved with the model: the
    bound on held-out images is then one of a fixed density. Batch t has weight
    max(1/t, ``MOMENTUM``): the plain mean of the first 1/MOMENTUM batches, so a short training
    (a few steps) does not leave the initial scale in it, then an exponential moving average
    that follows the shrinking error.
    """

    params_per_channel = 1
    is_density = True
    MOMENTUM = 0.1  # the least weight of a training batch in the running variance

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("variance", torch.full((channels,), math.exp(2 * LOG_SCALE_INIT)))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # training batches

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # a model saved before ``updates`` existed: its running variance is taken as settled
        state_dict.setdefault(prefix + "updates", torch.tensor(1 << 30))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """x, params (N,C,H,W) -> (N,) log-density summed over pixels, in nats."""
        err2 = (fp32(x) - torch.sigmoid(fp32(params))).square()  # (N,C,H,W)
        training = self.training and torch.is_grad_enabled()
        variance = self._batch_variance(err2) if training else self.variance
        log_scale = 0.5 * variance.clamp(min=math.exp(2 * LOG_SCALE_MIN)).log()
        log_scale = log_scale.view(1, -1, 1, 1)  # (C,) -> (1,C,1,1)
        return _per_image(-0.5 * err2 * torch.exp(-2 * log_scale) - log_scale - 0.5 * LOG_2PI)

    @torch.no_grad()
    def _batch_variance(self, err2: Tensor) -> Tensor:
        """(N,C,H,W) squared errors -> (C,) their mean per channel over every rank's batch;
        also moves the running ``variance`` towards it."""
        count = err2.new_full((err2.shape[1],), float(err2[:, 0].numel()))  # (C,) values each
        sums = torch.stack([err2.sum((0, 2, 3)), count])  # (2,C)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        variance = sums[0] / sums[1]
        self.updates += 1
        weight = (1.0 / self.updates).clamp(min=self.MOMENTUM)  # () max(1/t, momentum), no sync
        self.variance.lerp_(variance.to(self.variance.dtype), weight.to(self.variance.dtype))
        return variance

    def mean(self, params: Tensor) -> Tensor:
        """(N,C,H,W) pre-sigmoid means -> (N,C,H,W) mean image in [0, 1]."""
        return torch.sigmoid(fp32(params))


class DiscretisedLogistic(nn.Module):
    """p(x|z) = prod over pixels of a logistic's mass on x's 8-bit bin (Salimans et al. 2017).

    The decoder gives a mean and a log-scale per pixel: params (N,2C,H,W), means first. The
    bins are [x - 1/510, x + 1/510] with the outermost ones open to -inf and +inf, so the 256
    masses sum to 1: a true probability of 8-bit images, whose NLL / (D ln 2) are the bits per
    dimension reported in the literature (PixelCNN++, NVAE, VDVAE).
    """

    params_per_channel = 2
    is_density = True

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        mean_raw, log_scale = fp32(params).chunk(2, dim=1)  # (N,2C,H,W) -> 2 x (N,C,H,W)
        return torch.sigmoid(mean_raw), log_scale.clamp(min=LOGISTIC_LOG_SCALE_MIN)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        """x (N,C,H,W) on the 8-bit grid in [0, 1], params (N,2C,H,W) -> (N,) log-mass, nats."""
        mean, log_scale = self._split(params)
        x = fp32(x)
        inv_s = torch.exp(-log_scale)
        centred = x - mean
        plus, minus = inv_s * (centred + 0.5 / BINS), inv_s * (centred - 0.5 / BINS)
        log_cdf_plus = F.logsigmoid(plus)  # log F(x + half bin): the lowest bin's mass
        log_sf_minus = -F.softplus(minus)  # log (1 - F(x - half bin)): the highest bin's mass
        delta = torch.sigmoid(plus) - torch.sigmoid(minus)  # an inner bin's mass
        # A tiny difference of two CDFs has lost its digits; there the density at the bin centre
        # times the bin width is the better value (the PixelCNN++ rule, same threshold).
        mid = inv_s * centred
        log_pdf = mid - log_scale - 2.0 * F.softplus(mid) - math.log(BINS)
        log_mid = torch.where(delta > 1e-5, torch.log(delta.clamp(min=1e-12)), log_pdf)
        edge_low, edge_high = x < 0.5 / BINS, x > 1.0 - 0.5 / BINS
        log_p = torch.where(edge_low, log_cdf_plus, torch.where(edge_high, log_sf_minus, log_mid))
        return _per_image(log_p)

    def mean(self, params: Tensor) -> Tensor:
        """(N,2C,H,W) -> (N,C,H,W) the logistic means, in [0, 1] (the mode of a sharp fit)."""
        return self._split(params)[0]


def make_likelihood(name: str, channels: int) -> nn.Module:
    """The likelihood module for ``name`` (one of LIKELIHOODS) over ``channels`` channels."""
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(channels)
    if name == "gaussian_optimal":
        return OptimalGaussianLikelihood(channels)
    if name == "logistic":
        return DiscretisedLogistic()
    raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {name!r}")
