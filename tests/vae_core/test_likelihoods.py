"""The likelihoods: the discretised logistic (a true probability over 8-bit images) and the
optimal-scale Gaussian (sigma-VAE), checked against torch.distributions."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


# ----------------------------------------------------------------------------- optimal sigma


def _image_and_params(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, 8, 8, generator=g, dtype=torch.float64)
    # A decoder that fits each channel with a different error, as on colour photos.
    noise = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64) * torch.tensor(
        [0.05, 0.2, 1.0], dtype=torch.float64
    ).view(1, 3, 1, 1)
    return x, torch.logit(x.clamp(0.02, 0.98)) + noise


def _normal_log_prob(x: torch.Tensor, params: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The reference: torch.distributions' Normal, summed per image."""
    normal = torch.distributions.Normal(torch.sigmoid(params), scale.view(1, -1, 1, 1))
    return normal.log_prob(x).flatten(1).sum(1)


def test_optimal_scale_is_each_channels_rms_error_and_maximises_the_likelihood():
    x, params = _image_and_params()
    lik = make_likelihood("gaussian_optimal", 3).double().train()
    rms = (x - torch.sigmoid(params)).square().mean((0, 2, 3)).sqrt()  # (C,)
    assert rms[0] < rms[1] < rms[2]  # the construction gives three different scales
    got = lik.log_prob(x, params)
    torch.testing.assert_close(got, _normal_log_prob(x, params, rms))
    for factor in (0.8, 0.95, 1.05, 1.25):  # any other scale scores the batch lower
        assert _normal_log_prob(x, params, rms * factor).sum() < got.sum()


def test_optimal_scale_gives_the_means_the_gradient_of_the_profile_likelihood():
    # sigma* is held constant in the gradient; at the maximiser dL/dsigma = 0, so the means'
    # gradient must equal that of L(mean, sigma*(mean)) differentiated through sigma* too.
    x, params = _image_and_params(1)
    lik = make_likelihood("gaussian_optimal", 3).double().train()
    p1 = params.clone().requires_grad_()
    lik.log_prob(x, p1).sum().backward()
    p2 = params.clone().requires_grad_()
    rms = (x - torch.sigmoid(p2)).square().mean((0, 2, 3)).sqrt()  # not detached
    _normal_log_prob(x, p2, rms).sum().backward()
    torch.testing.assert_close(p1.grad, p2.grad)


def test_optimal_scale_evaluates_with_the_running_variance_of_training_batches():
    """Batch t weighs max(1/t, 0.1) in the stored variance, checked against the plain means."""
    x, params = _image_and_params(2)
    lik = make_likelihood("gaussian_optimal", 3).double()
    start = lik.variance.clone()
    torch.testing.assert_close(start, torch.full((3,), 0.01, dtype=torch.float64))  # sigma 0.1
    lik.train()
    x2, params2 = _image_and_params(3)
    pairs = [(x, params), (x2, params2)]
    errors = [(a - torch.sigmoid(b)).square().mean((0, 2, 3)) for a, b in pairs]
    lik.log_prob(x, params)
    torch.testing.assert_close(lik.variance, errors[0])  # the first batch replaces the start
    lik.log_prob(x2, params2)
    torch.testing.assert_close(lik.variance, (errors[0] + errors[1]) / 2)  # their mean
    for _ in range(8):  # batches 3..10: still the plain mean over every batch
        lik.log_prob(x2, params2)
    torch.testing.assert_close(lik.variance, (errors[0] + 9 * errors[1]) / 10)
    before = lik.variance.clone()
    lik.log_prob(x, params)  # batch 11: an exponential moving average, weight 0.1
    torch.testing.assert_close(lik.variance, 0.9 * before + 0.1 * errors[0])
    assert {"variance", "updates"} <= set(lik.state_dict())  # saved with the model
    lik.eval()  # a held-out batch is scored with the stored scale, not its own error
    torch.testing.assert_close(
        lik.log_prob(x2, params2), _normal_log_prob(x2, params2, lik.variance.sqrt())
    )
    frozen = lik.variance.clone()
    lik.log_prob(x2, params2)
    torch.testing.assert_close(lik.variance, frozen)  # evaluation leaves it alone
    lik.train()
    with torch.no_grad():  # as in evaluate_epoch's no-grad passes: the stored scale
        torch.testing.assert_close(
            lik.log_prob(x2, params2), _normal_log_prob(x2, params2, frozen.sqrt())
        )


def test_optimal_scale_saved_before_the_batch_count_loads_as_settled():
    x, params = _image_and_params()
    old = {"variance": torch.full((3,), 0.04, dtype=torch.float64)}  # no "updates" key
    lik = make_likelihood("gaussian_optimal", 3).double()
    lik.load_state_dict(old)
    lik.train().log_prob(x, params)  # the stored value is kept at weight 0.9
    batch = (x - torch.sigmoid(params)).square().mean((0, 2, 3))
    torch.testing.assert_close(lik.variance, 0.9 * 0.04 + 0.1 * batch)


def _optimal_scale_rank(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        x, params = _image_and_params()
        lik = make_likelihood("gaussian_optimal", 3).double().train()
        lik.log_prob(x[rank::2], params[rank::2])  # each rank scores half the batch
        torch.save(lik.variance, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_optimal_scale_is_the_error_of_every_ranks_batch_together(tmp_path):
    out = str(tmp_path / "variance")
    mp.spawn(_optimal_scale_rank, args=(str(tmp_path / "rendezvous"), out), nprocs=2)
    x, params = _image_and_params()
    pooled = (x - torch.sigmoid(params)).square().mean((0, 2, 3))  # one process, all images
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(f"{out}.{rank}"), pooled)
