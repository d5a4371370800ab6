"""ConvVAE shapes, determinism, likelihoods and config checks."""

import pytest
import torch
from torch import distributions as D
from torch import nn

from vae_core.elbo import kl_standard_normal
from vae_core.model import (
    LOGVAR_BOUND,
    ConvVAE,
    LatentMeans,
    PreActBlock,
    VAEConfig,
    feature_sizes,
    unwrap,
)

SIZES = [(28, 28), (64, 64), (128, 128), (224, 224), (256, 128), (29, 31)]
SMALL = (8, 16, 32)  # narrow widths keep the big sizes fast on CPU


@pytest.mark.parametrize(
    ("arch", "likelihood", "k"),
    [
        ("conv", "bernoulli", 1),
        ("conv", "gaussian", 1),
        ("conv", "gaussian_optimal", 1),
        ("resnet", "logistic", 2),
    ],
)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_shapes(height, width, channels, arch, likelihood, k):
    """k = likelihood params per channel (the logistic has a mean and a log-scale)."""
    cfg = VAEConfig(channels, height, width, SMALL, 5, likelihood, arch, blocks_per_stage=1)
    model = ConvVAE(cfg)
    x = torch.rand(2, channels, height, width)

    params, mu, logvar = model(x)
    assert params.shape == (2, k * channels, height, width)
    assert mu.shape == logvar.shape == (2, 5)
    params_l, _, _ = model(x, n_samples=3)
    assert params_l.shape == (6, k * channels, height, width)
    assert model.reparameterize(mu, logvar, 4).shape == (4, 2, 5)
    assert model.decode(torch.randn(7, 5)).shape == (7, k * channels, height, width)
    assert model.likelihood.log_prob(x, params).shape == (2,)
    assert model.features(x).shape == (2, SMALL[-1])  # pooled map the bottleneck reads
    for images in (model.reconstruct(x), model.sample(3)):
        assert images.shape[1:] == x.shape[1:]
        assert images.min() >= 0 and images.max() <= 1


def test_default_config_matches_brief():
    cfg = VAEConfig()
    assert (cfg.in_channels, cfg.height, cfg.width) == (1, 64, 64)
    assert (cfg.widths, cfg.latent_dim, cfg.likelihood) == ((32, 64, 128), 16, "bernoulli")
    x = torch.rand(3, 1, 64, 64)
    assert ConvVAE(cfg)(x)[0].shape == x.shape


@pytest.mark.parametrize(
    ("height", "width", "depth", "expected"),
    [
        (64, 64, 3, [(64, 64), (32, 32), (16, 16), (8, 8)]),
        (29, 31, 2, [(29, 31), (15, 16), (8, 8)]),
        (256, 128, 1, [(256, 128), (128, 64)]),
    ],
)
def test_feature_sizes(height, width, depth, expected):
    assert feature_sizes(height, width, depth) == expected


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_depth_is_number_of_widths(depth):
    widths = tuple(8 * 2**i for i in range(depth))
    model = ConvVAE(VAEConfig(1, 32, 32, widths, 4))
    convs = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == list(widths)
    assert all(c.stride == (2, 2) for c in convs)


def test_no_batchnorm_only_groupnorm():
    model = ConvVAE(VAEConfig())
    kinds = {type(m) for m in model.modules()}
    assert nn.GroupNorm in kinds
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)


def test_eval_is_deterministic_and_train_samples():
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(1, 28, 28, (8, 16), 4))
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    p1, mu, _ = model(x)
    p2, _, _ = model(x)
    assert torch.equal(p1, p2)
    assert torch.allclose(p1, model.decode(mu))  # eval uses z = mu
    assert torch.equal(model.reconstruct(x), model.reconstruct(x))
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])  # train samples z


def test_sample_uses_generator():
    model = ConvVAE(VAEConfig(1, 28, 28, (8,), 4)).eval()
    a = model.sample(3, generator=torch.Generator().manual_seed(1))
    b = model.sample(3, generator=torch.Generator().manual_seed(1))
    c = model.sample(3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_logvar_is_bounded_and_kl_stays_finite():
    model = ConvVAE(VAEConfig(1, 28, 28, (8,), 3))
    with torch.no_grad():
        model.to_latent.bias[3:] = torch.tensor([1e6, -1e6, 0.0])  # raw logvar far out of range
    mu, logvar = model.encode(torch.rand(2, 1, 28, 28))
    assert logvar.abs().max() <= LOGVAR_BOUND
    assert logvar[:, 0].min() > LOGVAR_BOUND - 1e-3
    assert torch.isfinite(kl_standard_normal(mu, logvar)).all()
    z = model.reparameterize(mu, logvar, 2)
    assert torch.isfinite(z).all()


def test_bernoulli_log_prob_matches_torch_distributions():
    model = ConvVAE(VAEConfig(2, 28, 28, (8,), 4, "bernoulli"))
    x, logits = torch.rand(3, 2, 28, 28), torch.randn(3, 2, 28, 28) * 3
    # Continuous targets: torch's Bernoulli density formula x log p + (1 - x) log(1 - p).
    expected = D.Bernoulli(logits=logits, validate_args=False).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(model.likelihood.log_prob(x, logits), expected)
    torch.testing.assert_close(model.likelihood.mean(logits), torch.sigmoid(logits))


def test_gaussian_log_prob_matches_torch_distributions():
    model = ConvVAE(VAEConfig(3, 28, 28, (8,), 4, "gaussian"))
    with torch.no_grad():
        model.likelihood.log_scale.copy_(torch.tensor([-2.0, -1.0, 0.5]))
    x, params = torch.rand(2, 3, 28, 28), torch.randn(2, 3, 28, 28)
    scale = torch.tensor([-2.0, -1.0, 0.5]).exp().view(1, 3, 1, 1)
    expected = D.Normal(torch.sigmoid(params), scale).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(model.likelihood.log_prob(x, params), expected)


def test_gaussian_scale_is_learned_per_channel():
    model = ConvVAE(VAEConfig(3, 28, 28, (8,), 4, "gaussian"))
    assert model.likelihood.log_scale.shape == (3,)
    assert "likelihood.log_scale" in model.state_dict()
    x = torch.rand(2, 3, 28, 28)
    model.likelihood.log_prob(x, model(x)[0]).sum().backward()
    assert model.likelihood.log_scale.grad.abs().min() > 0


def test_unwrap_returns_inner_module():
    model = ConvVAE(VAEConfig(1, 28, 28, (8,), 4))
    assert unwrap(model) is model
    holder = nn.Module()
    holder.module = model  # the attribute DDP uses
    assert unwrap(holder) is model


def test_unwrap_reaches_the_model_in_ddp_around_a_compiled_module(tmp_path):
    """Ray Train with ``train.compile`` and 2 workers: DDP wraps the torch.compile wrapper, whose
    truth value raises (it calls len()); unwrap once failed there on every rank."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        model = ConvVAE(VAEConfig(1, 28, 28, (8,), 4))
        ddp = nn.parallel.DistributedDataParallel(torch.compile(model))
        assert unwrap(ddp) is model
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 0},
        {"height": 0},
        {"latent_dim": 0},
        {"widths": ()},
        {"widths": (8, 0)},
        {"likelihood": "poisson"},
        {"arch": "vit"},
        {"arch": "resnet", "blocks_per_stage": 0},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="VAEConfig"):
        VAEConfig(**kwargs)


def test_config_accepts_list_widths():
    assert VAEConfig(widths=[8, 16]).widths == (8, 16)


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_resnet_has_blocks_per_stage_residual_blocks(blocks):
    cfg = VAEConfig(3, 28, 28, (8, 16), 4, arch="resnet", blocks_per_stage=blocks)
    model = ConvVAE(cfg)
    count = sum(isinstance(m, PreActBlock) for m in model.modules())
    assert count == 2 * len(cfg.widths) * blocks  # encoder and decoder, every stage
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_resnet_blocks_start_as_identity():
    """The zero-initialised last conv makes each block the identity at step 0."""
    block = PreActBlock(8)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(block(x), x)
    block.body[-1].weight.data.normal_()  # once trained, the block does change its input
    assert not torch.allclose(block(x), x)


def test_conv_arch_keeps_the_original_parameter_layout():
    """Checkpoints of the original model load into arch="conv" unchanged."""
    model = ConvVAE(VAEConfig(1, 28, 28, (8, 16), 4))
    keys = set(model.state_dict())
    assert {"encoder.0.weight", "encoder.3.weight", "decoder.0.weight", "decoder.3.weight"} <= keys
    assert "to_params.weight" in keys and model.to_params.out_channels == 1


def test_latent_means_serves_the_encoder_mean():
    torch.manual_seed(0)
    vae = ConvVAE(VAEConfig(1, 28, 28, (8,), 3)).eval()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(LatentMeans(vae)(x), vae.encode(x)[0])  # (4,3)


def test_features_are_the_spatial_mean_of_the_map_the_bottleneck_reads():
    model = ConvVAE(VAEConfig(1, 20, 20, (4, 6), 3)).eval()
    x = torch.rand(3, 1, 20, 20)
    maps = []
    model.encoder.register_forward_hook(lambda m, i, out: maps.append(out))
    mu, _ = model.encode(x)
    (feature_map,) = maps  # (3,6,5,5)
    expected = torch.stack([f.reshape(6, -1).mean(1) for f in feature_map])  # (3,6)
    torch.testing.assert_close(model.features(x), expected)
