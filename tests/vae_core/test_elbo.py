"""The ELBO of the seed (eq. 40 KL, eq. 42 L-sample objective, eq. 43 loss) and the IWAE bound."""

import math

import pytest
import torch
from torch import distributions as D

from vae_core.elbo import elbo_terms, free_bits_kl, iwae_bound, kl_standard_normal
from vae_core.model import ConvVAE, VAEConfig

LN2 = math.log(2.0)


@pytest.mark.parametrize(
    ("mu", "logvar", "expected"),
    [
        (0.0, 0.0, 0.0),  # q = p
        (1.0, 0.0, 0.5),  # mean shift only: mu^2 / 2
        (-1.0, 0.0, 0.5),
        (0.0, LN2, 0.5 * (1.0 - LN2)),  # sigma^2 = 2: (2 - 1 - ln 2) / 2 = 0.1534
        (2.0, -LN2, 0.5 * (4.0 + 0.5 - 1.0 + LN2)),  # sigma^2 = 1/2
    ],
)
def test_kl_golden_values(mu, logvar, expected):
    kl = kl_standard_normal(torch.tensor([[mu]]), torch.tensor([[logvar]]))
    assert kl.shape == (1, 1)
    assert kl.item() == pytest.approx(expected, abs=1e-6)


def test_kl_golden_half_one_minus_ln2():
    kl = kl_standard_normal(torch.zeros(1, 1), torch.full((1, 1), LN2))
    assert kl.item() == pytest.approx(0.1534, abs=1e-4)


def test_kl_per_dim_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 16, generator=gen, dtype=torch.float64) * 2
    logvar = torch.randn(64, 16, generator=gen, dtype=torch.float64) * 2
    expected = D.kl_divergence(D.Normal(mu, torch.exp(0.5 * logvar)), D.Normal(0.0, 1.0))
    kl = kl_standard_normal(mu, logvar)
    assert kl.shape == (64, 16)
    torch.testing.assert_close(kl, expected, atol=1e-6, rtol=0)
    assert (kl >= 0).all()


def test_kl_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kl_standard_normal, (mu, logvar))


def _model(likelihood="bernoulli", dtype=torch.float64):
    torch.manual_seed(0)
    return ConvVAE(VAEConfig(1, 28, 28, (8, 16), 4, likelihood)).to(dtype)


def _p_x_given_z(model, params):
    """Independent torch.distributions p(x|z) over all pixels of each image."""
    if model.config.likelihood == "bernoulli":
        base = D.Bernoulli(logits=params, validate_args=False)  # continuous targets
    else:
        scale = model.likelihood.log_scale.exp().view(1, -1, 1, 1).expand_as(params)
        base = D.Normal(torch.sigmoid(params), scale)
    return D.Independent(base, 3)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("n_samples", [1, 3])
def test_elbo_matches_torch_distributions(likelihood, n_samples):
    model = _model(likelihood)
    x = torch.rand(5, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(7)
    terms = elbo_terms(model, x, n_samples=n_samples, kl_weight=0.3)

    torch.manual_seed(7)  # the same noise: eps (L,B,J) is the only random draw
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(n_samples, *mu.shape, dtype=torch.float64)
    z = mu + std * eps  # (L,B,J)
    recon = torch.stack([_p_x_given_z(model, model.decode(z_l)).log_prob(x) for z_l in z]).mean(0)
    kl_dims = D.kl_divergence(D.Normal(mu, std), D.Normal(0.0, 1.0))

    torch.testing.assert_close(terms.recon, recon)
    torch.testing.assert_close(terms.kl_per_dim, kl_dims)
    torch.testing.assert_close(terms.kl, kl_dims.sum(1))
    torch.testing.assert_close(terms.neg_elbo, kl_dims.sum(1) - recon)
    torch.testing.assert_close(terms.loss, (0.3 * kl_dims.sum(1) - recon).mean())
    assert terms.neg_elbo.shape == terms.recon.shape == terms.kl.shape == (5,)
    assert terms.loss.shape == ()


def test_kl_weight_changes_loss_not_neg_elbo():
    model = _model()
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(3)
    full = elbo_terms(model, x, kl_weight=1.0)
    torch.manual_seed(3)
    half = elbo_terms(model, x, kl_weight=0.5)
    torch.testing.assert_close(full.neg_elbo, half.neg_elbo)
    torch.testing.assert_close(full.loss, full.neg_elbo.mean())
    torch.testing.assert_close(full.loss - half.loss, 0.5 * full.kl.mean())


def test_loss_backpropagates_to_all_parameters():
    model = _model("gaussian", dtype=torch.float32)
    elbo_terms(model, torch.rand(2, 1, 28, 28), n_samples=2).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_l_sample_reconstruction_converges_to_expectation():
    # With J = 1, E_q[log p(x|z)] is a 1-D integral against a Gaussian: a dense trapezoid rule
    # over +-8 sigma gives it (and the per-sample spread) independently of the sampler.
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(1, 28, 28, (8,), latent_dim=1)).double()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        mu, logvar = model.encode(x)  # (B,1) each
        t = torch.linspace(-8.0, 8.0, 801, dtype=torch.float64)
        density = torch.exp(-0.5 * t.square()) / math.sqrt(2.0 * math.pi)
        z = mu[:, 0] + torch.exp(0.5 * logvar[:, 0]) * t[:, None]  # (T,B)
        log_px = torch.stack(
            [model.likelihood.log_prob(x, model.decode(z_t[:, None])) for z_t in z]
        )
    expected = torch.trapezoid(density[:, None] * log_px, t, dim=0)  # (B,)
    second = torch.trapezoid(density[:, None] * log_px.square(), t, dim=0)
    sd = (second - expected.square()).clamp(min=0).sqrt()
    assert (sd > 0.1).all()  # the test is only meaningful if the samples vary

    n = 1000
    torch.manual_seed(0)
    with torch.no_grad():
        recon = elbo_terms(model, x, n_samples=n).recon
        single = torch.stack([elbo_terms(model, x, n_samples=1).recon for _ in range(20)])
    assert ((recon - expected).abs() < 5 * sd / math.sqrt(n)).all()
    # One sample is unbiased and carries the full per-sample spread that L samples average out.
    assert ((single.mean(0) - expected).abs() < 5 * sd / math.sqrt(20)).all()
    assert ((single.std(0) / sd - 1.0).abs() < 0.5).all()


def _log_weights(model, x, eps):
    """log p(x|z) + log p(z) - log q(z|x) for noise eps (k,B,J), via torch.distributions."""
    mu, logvar = model.encode(x)
    q = D.Independent(D.Normal(mu, torch.exp(0.5 * logvar)), 1)
    prior = D.Independent(D.Normal(torch.zeros_like(mu), torch.ones_like(mu)), 1)
    z = q.mean + q.stddev * eps  # (k,B,J)
    log_px = torch.stack([_p_x_given_z(model, model.decode(z_i)).log_prob(x) for z_i in z])
    return log_px + prior.log_prob(z) - q.log_prob(z)  # (k,B)


@pytest.mark.parametrize(("k", "chunk_size"), [(1, None), (5, None), (5, 2), (6, 3)])
def test_iwae_matches_importance_weights(k, chunk_size):
    model = _model("gaussian")
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(11)
    bound = iwae_bound(model, x, k, chunk_size=chunk_size)
    torch.manual_seed(11)  # redraw the same noise, chunk by chunk as iwae_bound does
    size = chunk_size or k
    eps = torch.cat(
        [torch.randn(min(size, k - s), 3, 4, dtype=torch.float64) for s in range(0, k, size)]
    )
    with torch.no_grad():
        expected = torch.logsumexp(_log_weights(model, x, eps), 0) - math.log(k)
    assert bound.shape == (3,)
    torch.testing.assert_close(bound, expected)


def _offset_model():
    """A model whose posterior sits off the prior (mu ~ 1.5): a clear ELBO-to-IWAE gap."""
    model = _model(dtype=torch.float32)
    with torch.no_grad():
        model.to_latent.weight.mul_(0.1)
        model.to_latent.bias.zero_()
        model.to_latent.bias[:4] = 1.5
    return model


@pytest.mark.slow
def test_iwae_is_above_elbo_and_rises_with_k():
    model = _offset_model()
    x = torch.rand(4, 1, 28, 28)
    torch.manual_seed(0)
    repeats, ks = 30, (1, 4, 16, 64)
    with torch.no_grad():
        bounds = {k: torch.stack([iwae_bound(model, x, k) for _ in range(repeats)]) for k in ks}
        elbo = -elbo_terms(model, x, n_samples=1000).neg_elbo  # (B,), near the exact ELBO
    means = {k: b.mean(0) for k, b in bounds.items()}
    sems = {k: b.std(0) / math.sqrt(repeats) for k, b in bounds.items()}

    # k = 1 is an unbiased single-sample ELBO estimate.
    assert ((means[1] - elbo).abs() < 4 * sems[1] + 0.05).all()
    for small, big in zip(ks, ks[1:], strict=False):
        assert (means[big] >= means[small] - 3 * (sems[big] + sems[small])).all()
    # A large k closes most of the KL-sized gap, far beyond the Monte Carlo noise.
    assert (means[64] - elbo > 0.5).all()
    assert (bounds[64] >= elbo - 0.05).all()  # every single k = 64 estimate, not just the mean


@pytest.mark.parametrize("free_bits", [0.05, 0.5, 5.0])
def test_free_bits_change_the_loss_never_the_reported_elbo(free_bits):
    model = _model()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    torch.manual_seed(5)
    plain = elbo_terms(model, x)
    torch.manual_seed(5)
    freed = elbo_terms(model, x, free_bits=free_bits)
    torch.testing.assert_close(freed.neg_elbo, plain.neg_elbo)  # the true bound, eq. 43
    # the KL term training sees: sum_j max(lambda, batch-mean KL_j) (Kingma et al. 2016)
    per_dim = plain.kl_per_dim.mean(0)
    expected = torch.maximum(per_dim, torch.tensor(free_bits, dtype=per_dim.dtype)).sum()
    torch.testing.assert_close(freed.loss, expected - plain.recon.mean())


def test_free_bits_stop_the_kl_gradient_of_dims_below_the_threshold():
    mu = torch.tensor([[0.1, 2.0], [0.0, 3.0]], requires_grad=True)  # dim 0 below, dim 1 above
    logvar = torch.zeros(2, 2, requires_grad=True)
    free_bits_kl(kl_standard_normal(mu, logvar), free_bits=0.5).backward()
    assert mu.grad[:, 0].abs().max() == 0  # 0.0025 nats < 0.5: free, no pull towards the prior
    assert mu.grad[:, 1].abs().min() > 0


def test_free_bits_zero_is_the_plain_batch_mean_kl():
    kl = torch.rand(6, 3)
    torch.testing.assert_close(free_bits_kl(kl, 0.0), kl.sum(1).mean())
