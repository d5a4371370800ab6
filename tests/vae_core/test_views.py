"""View objectives: t = identity is today's ELBO, the denoising bound scores the clean image,
the consistency KL and InfoNCE match their textbook formulas, evaluation never sees a view."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence
from torch.utils.data import DataLoader

from vae_core.elbo import elbo_terms, kl_standard_normal
from vae_core.model import ConvVAE, VAEConfig
from vae_core.training import (
    TrainConfig,
    evaluate_epoch,
    make_optimizer,
    make_scheduler,
    train_epoch,
)
from vae_core.views import (
    ViewConfig,
    gaussian_kl,
    info_nce,
    make_view,
    mask_patches,
    resized_crop,
    view_terms,
)


def _model(latent_dim: int = 4) -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(VAEConfig(1, 28, 28, (8, 16), latent_dim))


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _cfg(view: ViewConfig) -> TrainConfig:
    return TrainConfig(2, 4, 2e-3, 0.0, "constant", 5.0, 1.0, 0, 1, 0, view=view)


def test_identity_view_is_exactly_the_seed_elbo():
    model, x = _model().train(), _images()
    torch.manual_seed(5)
    plain = elbo_terms(model, x, n_samples=2, kl_weight=0.5, free_bits=0.1)
    torch.manual_seed(5)
    viewed = view_terms(model, x, ViewConfig(), n_samples=2, kl_weight=0.5, free_bits=0.1)
    for name in ("loss", "neg_elbo", "recon", "kl", "kl_per_dim", "mu", "logvar"):
        assert torch.equal(getattr(viewed, name), getattr(plain, name)), name
    assert viewed.extras == {}


def test_denoising_bound_encodes_the_view_and_scores_the_clean_image():
    """Recomputed from the model's parts: q(z|t(x)) from encode(t(x)), log p(x|z) by BCE on x."""
    model, x = _model().train(), _images()
    cfg = ViewConfig(mask_ratio=0.5, mask_patch=7, noise=0.1)
    torch.manual_seed(7)
    terms = view_terms(model, x, cfg, generator=torch.Generator().manual_seed(1))
    view = make_view(x, cfg, torch.Generator().manual_seed(1))
    assert not torch.equal(view, x)
    torch.manual_seed(7)
    mu, logvar = model.encode(view)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(1, *mu.shape)[0]  # (B,J): the same eps
    logits = model.decode(z)
    recon = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
    kl = (0.5 * (mu**2 + logvar.exp() - 1 - logvar)).sum(1)  # eq. 40, summed over j
    torch.testing.assert_close(terms.recon, recon)
    torch.testing.assert_close(terms.neg_elbo, kl - recon)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gaussian_kl_matches_torch_distributions(seed):
    g = torch.Generator().manual_seed(seed)
    mu_q, mu_p = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    lv_q, lv_p = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    expected = kl_divergence(Normal(mu_q, (0.5 * lv_q).exp()), Normal(mu_p, (0.5 * lv_p).exp()))
    torch.testing.assert_close(gaussian_kl(mu_q, lv_q, mu_p, lv_p), expected)
    zero = torch.zeros_like(mu_p)
    torch.testing.assert_close(gaussian_kl(mu_q, lv_q, zero, zero), kl_standard_normal(mu_q, lv_q))
    assert torch.all(gaussian_kl(mu_q, lv_q, mu_q, lv_q) == 0)


def test_info_nce_matches_the_formula_written_out():
    g = torch.Generator().manual_seed(0)
    a, b, tau = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), 0.5

    def cos(u, v):
        return sum(p * q for p, q in zip(u, v, strict=True)) / math.sqrt(
            sum(p * p for p in u) * sum(q * q for q in v)
        )

    rows_a, rows_b = a.tolist(), b.tolist()
    total = 0.0
    for first, second in ((rows_a, rows_b), (rows_b, rows_a)):
        for i, u in enumerate(first):
            logits = [cos(u, v) / tau for v in second]
            total += -(logits[i] - math.log(sum(math.exp(s) for s in logits)))
    assert info_nce(a, b, tau).item() == pytest.approx(total / 8, rel=1e-5)


def test_identical_views_have_zero_consistency_and_the_clean_elbo():
    model, x = _model().train(), _images()
    cfg = ViewConfig(consistency_weight=2.0)  # paired, but t is the identity
    terms = view_terms(model, x, cfg)
    assert terms.extras["consistency"].item() == 0.0
    assert terms.neg_elbo.shape == (6,) and terms.mu.shape == (6, 4)


def test_paired_terms_report_the_clean_half_and_add_the_weighted_extras():
    model, x = _model().train(), _images()
    cfg = ViewConfig(noise=0.2, consistency_weight=0.5, contrastive_weight=0.25)
    torch.manual_seed(3)
    terms = view_terms(model, x, cfg, generator=torch.Generator().manual_seed(2))
    view = make_view(x, cfg, torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    both = elbo_terms(model, torch.cat([x, x]), x_view=torch.cat([x, view]))
    torch.testing.assert_close(terms.neg_elbo, both.neg_elbo[:6])  # clean q(z|x) half
    mu_x, mu_t, lv_x, lv_t = both.mu[:6], both.mu[6:], both.logvar[:6], both.logvar[6:]
    kl = kl_divergence(Normal(mu_t, (0.5 * lv_t).exp()), Normal(mu_x, (0.5 * lv_x).exp()))
    torch.testing.assert_close(terms.extras["consistency"], kl.sum(1).mean())
    expected = both.loss + 0.5 * kl.sum(1).mean() + 0.25 * terms.extras["contrastive"]
    torch.testing.assert_close(terms.loss, expected)


def test_mask_patches_blacks_out_the_asked_share_of_patches():
    x = torch.ones(3, 2, 30, 30)  # 30 px with 8 px patches: a 4 x 4 grid, partial last patches
    out = mask_patches(x, 0.5, 8, torch.Generator().manual_seed(0))
    patches = F.pad(out[:, 0], (0, 2, 0, 2), value=-1).unfold(1, 8, 8).unfold(2, 8, 8)
    masked = (patches.amax((-1, -2)) == 0).flatten(1).sum(1)  # (3,) patches fully black
    assert masked.tolist() == [8, 8, 8]
    assert torch.equal(out[:, 0], out[:, 1])  # one mask for all channels of an image


def test_resized_crop_zooms_in_and_full_area_is_identity():
    ramp = torch.linspace(0, 1, 32).expand(4, 1, 32, 32).contiguous()  # brightness = column
    torch.testing.assert_close(resized_crop(ramp, 1.0), ramp, atol=1e-5, rtol=0)
    out = resized_crop(ramp, 0.25, torch.Generator().manual_seed(0))
    spans = out.amax((1, 2, 3)) - out.amin((1, 2, 3))  # a window of side s keeps ~s of the ramp
    assert torch.all(spans < 0.97) and torch.all(spans > 0.45)


@pytest.mark.parametrize(
    "cfg",
    [
        ViewConfig(crop_scale=0.5),
        ViewConfig(rotation=20),
        ViewConfig(jitter=0.4),
        ViewConfig(noise=0.3),
        ViewConfig(mask_ratio=0.6),
    ],
)
def test_each_transform_changes_the_view_and_stays_in_range(cfg):
    x = _images(8)
    out = make_view(x, cfg, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x, atol=1e-3)


def test_evaluation_uses_the_clean_posterior_whatever_the_view():
    loader = DataLoader((_images(8) * 255).to(torch.uint8), batch_size=4)
    results = []
    for view in (ViewConfig(), ViewConfig(mask_ratio=0.7, consistency_weight=1.0)):
        torch.manual_seed(0)
        metrics = evaluate_epoch(_model(), loader, _cfg(view), "cpu")
        results.append({k: v for k, v in metrics.items() if k != "images_per_s"})
    assert results[0] == results[1]


def _train(view: ViewConfig, epochs: int = 8) -> list[dict[str, float]]:
    loader = DataLoader((_images(16) * 255).to(torch.uint8), batch_size=8)
    cfg, model = _cfg(view), _model()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    torch.manual_seed(0)
    return [train_epoch(model, loader, optimizer, scheduler, cfg, e, "cpu") for e in range(epochs)]


def test_paired_training_reports_its_terms_and_each_weight_pulls_its_term_down():
    weak = _train(ViewConfig(noise=0.1, consistency_weight=1e-6, contrastive_weight=1e-6))
    consistent = _train(ViewConfig(noise=0.1, consistency_weight=10.0, contrastive_weight=1e-6))
    contrastive = _train(ViewConfig(noise=0.1, consistency_weight=1e-6, contrastive_weight=1.0))
    assert {"consistency", "contrastive"} <= weak[0].keys()
    assert consistent[-1]["consistency"] < 0.8 * weak[-1]["consistency"]
    assert contrastive[-1]["contrastive"] < weak[-1]["contrastive"] - 0.1
