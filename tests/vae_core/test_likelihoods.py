"""The discretised logistic likelihood: a true probability over 8-bit images."""

import math

import pytest
import torch

from vae_core.likelihoods import BINS, DiscretisedLogistic, make_likelihood

GRID = torch.arange(256, dtype=torch.float64) / BINS  # every 8-bit value, in [0, 1]


def _params(mean_raw: float, log_scale: float, n: int = 256) -> torch.Tensor:
    """(n, 2, 1, 1) params: one channel, a mean (pre-sigmoid) and a log-scale per image."""
    return (
        torch.tensor([mean_raw, log_scale], dtype=torch.float64).view(1, 2, 1, 1).expand(n, 2, 1, 1)
    )


@pytest.mark.parametrize(
    ("mean_raw", "log_scale"), [(0.0, -3.0), (2.0, -5.0), (-4.0, -1.0), (0.3, -8.0), (1.0, 2.0)]
)
def test_masses_of_all_256_values_sum_to_one(mean_raw, log_scale):
    log_p = DiscretisedLogistic().log_prob(GRID.view(256, 1, 1, 1), _params(mean_raw, log_scale))
    assert log_p.exp().sum().item() == pytest.approx(1.0, abs=2e-3)
    assert torch.all(log_p <= 0)


def test_inner_bin_mass_is_the_logistic_cdf_difference():
    """Golden value from the logistic CDF: F(x) = 1 / (1 + exp(-(x - m) / s))."""
    mean, s, x = 0.5, 0.02, 130 / 255
    cdf = lambda v: 1.0 / (1.0 + math.exp(-(v - mean) / s))  # noqa: E731
    expected = math.log(cdf(x + 0.5 / 255) - cdf(x - 0.5 / 255))
    params = _params(0.0, math.log(s), 1)  # sigmoid(0) = 0.5
    got = DiscretisedLogistic().log_prob(torch.full((1, 1, 1, 1), x, dtype=torch.float64), params)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_edge_bins_take_the_tails():
    """x = 0 gets all mass below 0.5/255, x = 1 all mass above 1 - 0.5/255."""
    params = _params(0.0, math.log(0.3), 2)  # wide, centred: the tails carry real mass
    x = torch.tensor([0.0, 1.0], dtype=torch.float64).view(2, 1, 1, 1)
    log_p = DiscretisedLogistic().log_prob(x, params)
    s = 0.3
    low = 1.0 / (1.0 + math.exp(-(0.5 / 255 - 0.5) / s))
    assert log_p[0].item() == pytest.approx(math.log(low), rel=1e-6)
    assert log_p[1].item() == pytest.approx(math.log(low), rel=1e-6)  # symmetric about 0.5


def test_sharp_fit_on_the_right_value_costs_almost_nothing_and_stays_finite():
    x = torch.full((1, 3, 4, 4), 77 / 255)
    mean_raw = torch.logit(x).repeat(1, 1, 1, 1)
    params = torch.cat([mean_raw, torch.full_like(x, -12.0)], 1)  # (1,6,4,4): scale clamped
    log_p = DiscretisedLogistic().log_prob(x, params)
    assert -1e-3 < log_p.item() <= 0
    far = torch.cat([torch.full_like(x, -6.0), torch.full_like(x, -12.0)], 1)  # mean ~0.0025
    assert torch.isfinite(DiscretisedLogistic().log_prob(x, far)).all()


def test_gradient_is_finite_everywhere():
    x = torch.cat([GRID.float(), GRID.float()]).view(2, 1, 16, 16)
    params = torch.randn(2, 2, 16, 16) * 5
    params.requires_grad_(True)
    DiscretisedLogistic().log_prob(x, params).sum().backward()
    assert torch.isfinite(params.grad).all()


def test_mean_is_in_unit_range_and_has_image_channels():
    params = torch.randn(4, 6, 8, 8) * 10
    mean = DiscretisedLogistic().mean(params)
    assert mean.shape == (4, 3, 8, 8)
    assert mean.min() >= 0 and mean.max() <= 1


def test_make_likelihood_rejects_unknown_name():
    with pytest.raises(ValueError, match="likelihood must be one of"):
        make_likelihood("poisson", 1)
