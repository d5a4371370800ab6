"""The pure-PyTorch training loop: schedules, steps, metrics, errors, and the DDP all-reduce."""

import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from vae_core.augment import AugmentConfig
from vae_core.checkpoint import load_checkpoint, save_checkpoint
from vae_core.elbo import elbo_terms
from vae_core.model import ConvVAE, VAEConfig
from vae_core.training import (
    CLOCK_METRICS,
    CompileError,
    TrainConfig,
    cpu_supports_bf16,
    evaluate_epoch,
    fit_local,
    history_row,
    kl_weight,
    make_optimizer,
    make_scheduler,
    to_input,
    train_epoch,
    use_bf16,
    use_channels_last,
)
from vae_core.views import ViewConfig

CPU = torch.device("cpu")


def _cfg(**overrides) -> TrainConfig:
    base = dict(
        epochs=2,
        batch_size=4,
        lr=2e-3,
        weight_decay=1e-4,
        lr_schedule="constant",
        grad_clip=5.0,
        beta=1.0,
        kl_warmup_epochs=0,
        samples=1,
        seed=0,
    )
    return TrainConfig(**{**base, **overrides})


def _model(latent_dim=4, likelihood="bernoulli") -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(VAEConfig(1, 28, 28, (8, 16), latent_dim, likelihood))


def _blobs(n: int, seed: int = 0) -> torch.Tensor:
    """n uint8 images (n,1,28,28) of one Gaussian blob each: structure a VAE can learn."""
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, generator=gen) * 16 + 6  # (n, 2) in pixels
    width = torch.rand(n, 1, 1, generator=gen) * 3 + 2
    grid = torch.arange(28.0)
    dy = (grid.view(1, 28, 1) - centre[:, 0].view(n, 1, 1)) ** 2  # (n,28,1)
    dx = (grid.view(1, 1, 28) - centre[:, 1].view(n, 1, 1)) ** 2  # (n,1,28)
    image = torch.exp(-(dy + dx) / (2 * width**2))  # (n,28,28)
    return (image * 255).round().to(torch.uint8).unsqueeze(1)  # (n,28,28) -> (n,1,28,28)


@pytest.mark.parametrize(
    ("warmup", "epoch", "step", "expected"),
    [
        (0, 0, 0, 0.5),  # no warm-up: beta from the first step
        (2, 0, 0, 0.5 * 1 / 20),  # 2 epochs x 10 steps: step 1 of 20
        (2, 0, 9, 0.5 * 10 / 20),
        (2, 1, 4, 0.5 * 15 / 20),
        (2, 1, 9, 0.5),  # the last warm-up step reaches beta
        (2, 5, 3, 0.5),  # and it stays there
    ],
)
def test_kl_weight_warms_up_linearly(warmup, epoch, step, expected):
    cfg = _cfg(beta=0.5, kl_warmup_epochs=warmup)
    assert kl_weight(cfg, epoch, step, steps_per_epoch=10) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("schedule", "step", "factor"),
    [
        ("constant", 0, 1.0),
        ("constant", 7, 1.0),
        ("cosine", 0, 1.0),
        ("cosine", 5, 0.5),
        ("cosine", 10, 0.0),
    ],
)
def test_lr_schedule_per_step(schedule, step, factor):
    model = _model()
    cfg = _cfg(epochs=2, lr=0.1, lr_schedule=schedule)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=5)  # 10 steps in all
    for _ in range(step):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * factor, abs=1e-12)


def test_optimizer_decays_weights_only():
    model = _model(likelihood="gaussian")
    optimizer = make_optimizer(model, _cfg(weight_decay=0.3))
    assert isinstance(optimizer, torch.optim.AdamW)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.3 for p in g["params"]}
    layers = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)
    weights = {id(m.weight) for m in model.modules() if isinstance(m, layers)}
    assert decay == weights  # not biases, GroupNorm affine or the likelihood's log-scale
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_to_input_converts_uint8_on_device():
    batch = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    x = to_input(batch, CPU, channels_last=False)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x.flatten(), torch.tensor([0.0, 0.2, 1.0]))
    assert torch.equal(to_input([batch, "label"], CPU, False), x)  # (images, ...) tuples
    assert to_input(torch.rand(2, 3, 4, 4), CPU, True).is_contiguous(
        memory_format=torch.channels_last
    )


def test_one_step_changes_every_weight():
    model = _model(likelihood="gaussian")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _cfg()
    optimizer = make_optimizer(model, cfg)
    train_epoch(model, [_blobs(4)], optimizer, make_scheduler(optimizer, cfg, 1), cfg, 0, CPU)
    changed = {k: not torch.equal(before[k], v) for k, v in model.state_dict().items()}
    assert all(changed.values()), [k for k, c in changed.items() if not c]


@pytest.mark.parametrize("grad_clip", [1e-3, 0.0])
def test_grad_clip_bounds_the_norm(grad_clip):
    model = _model()
    cfg = _cfg(grad_clip=grad_clip)
    optimizer = make_optimizer(model, cfg)
    train_epoch(model, [_blobs(4)], optimizer, make_scheduler(optimizer, cfg, 1), cfg, 0, CPU)
    # The last step's gradients are still held (zero_grad runs at the start of a step).
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    if grad_clip:
        assert norm <= grad_clip * 1.01
    else:
        assert norm > 1.0  # unclipped: the raw BCE gradients of 784-pixel sums are large


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch():
    model = _model()
    batch = _blobs(16)
    cfg = _cfg(lr=3e-3, samples=1)
    x = to_input(batch, CPU, False)
    torch.manual_seed(1)
    with torch.no_grad():
        before = elbo_terms(model, x, n_samples=16).neg_elbo.mean().item()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=60)
    metrics = train_epoch(model, [batch] * 60, optimizer, scheduler, cfg, 0, CPU)
    with torch.no_grad():
        after = elbo_terms(model, x, n_samples=16).neg_elbo.mean().item()
    assert metrics["images"] == 16 * 60
    assert after < 0.5 * before, (before, after)  # -ELBO is positive here (BCE sums)


def test_nan_loss_raises_clear_error():
    model = _model()
    cfg = _cfg()
    good = _blobs(4)
    bad = torch.full((4, 1, 28, 28), float("nan"))  # float batches pass through to_input
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, 3)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 3 step 1"):
        train_epoch(model, [good, bad, good], optimizer, scheduler, cfg, 3, CPU)


def test_metrics_are_consistent_per_image_means():
    model = _model()
    images = _blobs(10)
    loader = DataLoader(images, batch_size=4)  # last batch is short: 4 + 4 + 2
    cfg = _cfg(samples=2, beta=0.5)
    torch.manual_seed(5)
    metrics = evaluate_epoch(model, loader, cfg, CPU)

    torch.manual_seed(5)  # recompute directly, batch by batch, with the same noise
    with torch.no_grad():
        terms = [elbo_terms(model, to_input(b, CPU, False), 2, 0.5) for b in loader]
    neg_elbo = torch.cat([t.neg_elbo for t in terms])
    assert metrics["images"] == 10
    assert metrics["neg_elbo"] == pytest.approx(neg_elbo.mean().item(), rel=1e-6)
    assert metrics["kl"] == pytest.approx(torch.cat([t.kl for t in terms]).mean().item(), rel=1e-6)
    assert metrics["neg_elbo"] == pytest.approx(metrics["kl"] - metrics["recon"], rel=1e-6)
    assert metrics["loss"] == pytest.approx(0.5 * metrics["kl"] - metrics["recon"], rel=1e-6)
    kl_dims = [metrics[f"kl_dim_{j}"] for j in range(4)]
    assert sum(kl_dims) == pytest.approx(metrics["kl"], rel=1e-6)
    assert metrics["images_per_s"] > 0


def test_active_units_counts_dims_whose_mean_varies():
    model = _model(latent_dim=4)
    with torch.no_grad():
        model.to_latent.weight[1:4].zero_()  # mu_1..mu_3 constant over the data: inactive
        model.to_latent.bias[1:4] = torch.tensor([0.0, 2.0, -1.0])
        model.to_latent.weight[0].mul_(50.0)  # mu_0 varies strongly across images
    images = _blobs(12)
    metrics = evaluate_epoch(model, DataLoader(images, batch_size=5), _cfg(), CPU)

    with torch.no_grad():
        mu, _ = model.encode(to_input(images, CPU, False))
    assert mu[:, 0].var(unbiased=False) > 0.01  # the construction did what it says
    assert metrics["active_units"] == 1.0


def test_empty_loader_returns_zeros_not_nan():
    model = _model()
    empty = DataLoader(torch.zeros(0, 1, 28, 28, dtype=torch.uint8), batch_size=4)
    cfg = _cfg()
    optimizer = make_optimizer(model, cfg)
    for metrics in (
        evaluate_epoch(model, empty, cfg, CPU),
        train_epoch(model, empty, optimizer, make_scheduler(optimizer, cfg, 0), cfg, 0, CPU),
    ):
        assert metrics["images"] == 0
        assert all(math.isfinite(v) for v in metrics.values())
        assert metrics["neg_elbo"] == 0.0 and metrics["active_units"] == 0.0


def test_train_epoch_sets_sampler_epoch():
    images = _blobs(8)
    sampler = DistributedSampler(images, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(images, batch_size=4, sampler=sampler)
    model, cfg = _model(), _cfg()
    optimizer = make_optimizer(model, cfg)
    train_epoch(model, loader, optimizer, make_scheduler(optimizer, cfg, 2), cfg, 7, CPU)
    assert sampler.epoch == 7


class _SlowLoader:
    """Batches that each take ``delay`` seconds to arrive, as from a loader starved of I/O."""

    def __init__(self, batches: list[torch.Tensor], delay: float) -> None:
        self.batches, self.delay = batches, delay

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            time.sleep(self.delay)
            yield batch


def test_data_wait_share_is_the_time_spent_waiting_for_batches():
    batches = list(_blobs(12).split(4))  # 3 batches
    cfg, shares = _cfg(), {}
    for delay in (0.0, 0.4):
        model = _model()
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg, 3)
        start = time.perf_counter()
        metrics = train_epoch(model, _SlowLoader(batches, delay), optimizer, scheduler, cfg, 0, CPU)
        wall = time.perf_counter() - start
        shares[delay] = metrics["data_wait_share"]
        assert 0.0 <= shares[delay] <= 1.0
    # 3 x 0.4 s asleep inside the loader's next(), out of at most the slow epoch's wall clock
    assert shares[0.4] >= 1.2 / wall
    assert shares[0.0] < shares[0.4]


def test_fit_local_is_seeded_and_reports_each_epoch():
    images = _blobs(12)
    cfg = _cfg(epochs=3, lr_schedule="cosine", kl_warmup_epochs=1, samples=2)

    def run():
        seen = []
        loaders = (
            DataLoader(images, batch_size=4, shuffle=True),
            DataLoader(images[:4], batch_size=4),
        )
        history = fit_local(
            _model(), *loaders, cfg, CPU, on_epoch=lambda e, row, m: seen.append((e, dict(row), m))
        )
        return history, seen

    history, seen = run()
    history = [{k: v for k, v in row.items() if not k.endswith(CLOCK_METRICS)} for row in history]
    assert [e for e, _, _ in seen] == [0, 1, 2]
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert history[1]["train_neg_elbo"] == seen[1][1]["train_neg_elbo"]
    assert isinstance(seen[0][2], ConvVAE)  # the bare model, as the Ray loop hands it over
    assert history[2]["val_images"] == 4 and history[2]["train_images"] == 12
    assert history[0]["train_kl_weight"] == 1.0  # warm-up over epoch 0 ends at its last step
    rerun = [{k: v for k, v in row.items() if not k.endswith(CLOCK_METRICS)} for row in run()[0]]
    assert history == rerun  # same seed, same run


def test_bf16_and_channels_last_are_ignored_on_cpu():
    images = _blobs(8)
    runs = []
    for flags in ({}, {"bf16": True, "channels_last": True}):
        loader = DataLoader(images, batch_size=4)
        history = fit_local(_model(), loader, loader, _cfg(epochs=1, **flags), CPU)
        runs.append({k: v for k, v in history[0].items() if not k.endswith(CLOCK_METRICS)})
    assert runs[0] == runs[1]


def _cpu_flags() -> set[str]:
    """The CPU feature flags the Linux kernel reports (independent of torch's own probe)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs Linux /proc/cpuinfo")
def test_cpu_bf16_support_matches_the_kernel_cpu_flags():
    native = bool({"avx512_bf16", "amx_tile"} & _cpu_flags())
    assert cpu_supports_bf16() == (native and torch.backends.mkldnn.is_available())


CPU_BF16 = cpu_supports_bf16()


@pytest.mark.parametrize(
    ("device", "flags", "bf16", "channels_last"),
    [
        ("cuda", {}, False, False),
        ("cuda", {"bf16": True, "channels_last": True}, True, True),
        ("cuda:1", {"bf16": True}, True, False),
        # the CPU switches do not reach CUDA, and the CUDA ones do not reach the CPU
        ("cuda", {"cpu_bf16": True, "cpu_channels_last": True}, False, False),
        ("cpu", {"bf16": True, "channels_last": True}, False, False),
        ("cpu", {"cpu_channels_last": True}, False, True),
        ("cpu", {"cpu_bf16": True}, CPU_BF16, False),  # only with native bf16 dot products
        ("mps", {"bf16": True, "cpu_bf16": True, "cpu_channels_last": True}, False, False),
    ],
)
def test_autocast_and_memory_format_decisions_per_device(device, flags, bf16, channels_last):
    cfg = _cfg(**flags)
    assert use_bf16(cfg, device) is bf16
    assert use_channels_last(cfg, device) is channels_last


def _eval(flags: dict) -> dict:
    model, images = _model(likelihood="gaussian"), _blobs(16)
    torch.manual_seed(1)  # the same eps for both runs
    return evaluate_epoch(model, DataLoader(images, batch_size=8), _cfg(**flags), CPU)


# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2%) in the conv and matmul inputs; the
# per-image sums over pixels and latent dims stay float32, so the ELBO moves by well under 0.5%
# (5e-4 relative measured on this test's data).
BF16_ELBO_RTOL = 5e-3


@pytest.mark.skipif(not CPU_BF16, reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_cpu_bf16_elbo_matches_float32_within_tolerance():
    fp32, bf16 = _eval({}), _eval({"cpu_bf16": True})
    assert bf16["neg_elbo"] != fp32["neg_elbo"]  # bf16 really ran
    for key in ("neg_elbo", "recon", "kl"):
        assert bf16[key] == pytest.approx(fp32[key], rel=BF16_ELBO_RTOL), key


@pytest.mark.skipif(not CPU_BF16, reason="this CPU has no native bf16 (AVX512-BF16/AMX)")
def test_cpu_bf16_training_follows_the_float32_run():
    images = _blobs(16)
    runs = []
    for flags in ({}, {"cpu_bf16": True}):
        loader = DataLoader(images, batch_size=8)
        runs.append(fit_local(_model(), loader, loader, _cfg(epochs=2, **flags), CPU)[-1])
    for key in ("train_neg_elbo", "val_neg_elbo"):
        assert runs[1][key] == pytest.approx(runs[0][key], rel=BF16_ELBO_RTOL), key


def test_cpu_channels_last_trains_like_contiguous():
    images = _blobs(8)
    runs, models = [], []
    for flags in ({}, {"cpu_channels_last": True}):
        loader = DataLoader(images, batch_size=4)
        models.append(_model())
        runs.append(fit_local(models[-1], loader, loader, _cfg(epochs=1, **flags), CPU)[0])
    conv = models[1].encoder[3].weight  # (16,8,3,3): the second stride-2 conv
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    for key in ("train_neg_elbo", "val_neg_elbo", "val_kl"):
        assert runs[1][key] == pytest.approx(runs[0][key], rel=1e-4), key


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # inductor's
def test_compile_failure_is_one_line(monkeypatch):
    # No working C++ compiler: inductor's CPU backend cannot build its kernels.
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    loader = DataLoader(_blobs(4), batch_size=4)
    with pytest.raises(CompileError) as err:
        fit_local(_model(), loader, loader, _cfg(epochs=1, compile=True), CPU)
    message = str(err.value)
    assert "\n" not in message and "/nonexistent/c++" in message
    assert "train.compile: false" in message


@pytest.fixture
def single_rank_group(tmp_path):
    """A real one-process gloo group, so the DDP and all-reduce code paths run."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "view",
    [
        ViewConfig(),
        # both views in one pass through the DDP wrapper, every extra term on
        ViewConfig(mask_ratio=0.25, noise=0.05, consistency_weight=1.0, contrastive_weight=0.5),
    ],
)
def test_ddp_wrapped_model_trains_like_the_bare_model(single_rank_group, tmp_path, view):
    images = _blobs(8)
    cfg = _cfg(samples=2, view=view)
    results = []
    for wrap in (False, True):
        model = _model()
        wrapped = DDP(model) if wrap else model
        optimizer = make_optimizer(wrapped, cfg)
        torch.manual_seed(3)
        metrics = train_epoch(
            wrapped,
            DataLoader(images, batch_size=4),
            optimizer,
            make_scheduler(optimizer, cfg, 2),
            cfg,
            0,
            CPU,
        )
        results.append((metrics, model.state_dict()))
    (plain, plain_state), (ddp, ddp_state) = results
    for key in ("neg_elbo", "recon", "kl", "images", "active_units", *view.metrics):
        assert ddp[key] == pytest.approx(plain[key], rel=1e-5)
    for key, value in plain_state.items():
        torch.testing.assert_close(ddp_state[key], value)

    save_checkpoint(tmp_path / "ddp.pt", DDP(model))  # no "module." prefix in the file
    assert load_checkpoint(tmp_path / "ddp.pt").state_dict().keys() == model.state_dict().keys()


def _two_rank_worker(rank: int, rendezvous: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        torch.manual_seed(100 + rank)  # different noise per rank, as in a real run
        images = _blobs(10)[rank::2]  # each rank sees half the data (5 images)
        model = DDP(_model())
        cfg = _cfg()
        evaluated = evaluate_epoch(model, DataLoader(images, batch_size=2), cfg, CPU)
        optimizer = make_optimizer(model, cfg)
        trained = train_epoch(
            model,
            DataLoader(images, batch_size=5),
            optimizer,
            make_scheduler(optimizer, cfg, 1),
            cfg,
            0,
            CPU,
        )
        torch.save({"eval": evaluated, "train": trained}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_report_the_global_metrics(tmp_path):
    out = str(tmp_path / "metrics")
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "rendezvous"), out), nprocs=2)
    rank0, rank1 = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    assert rank0 == rank1  # every rank returns the same, all-reduced figures

    # The parts that do not depend on the sampling noise must match one process on all data.
    single = evaluate_epoch(_model(), DataLoader(_blobs(10), batch_size=3), _cfg(), CPU)
    assert rank0["eval"]["images"] == single["images"] == 10
    assert rank0["train"]["images"] == 10
    # rel 1e-3: float32 sums over other batch shapes, in other processes, land ~1e-4 apart (seen
    # in CI); one rank's own half of the data differs from the whole by 8-30%
    for key in ["kl", "active_units"] + [f"kl_dim_{j}" for j in range(4)]:
        assert rank0["eval"][key] == pytest.approx(single[key], rel=1e-3), key


@pytest.mark.slow
def test_resnet_logistic_with_free_bits_and_augmentation_learns():
    """The stronger family with every new option on: -ELBO (bits/dim) falls on held-out blobs."""
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(1, 28, 28, (8, 16), 4, "logistic", "resnet", blocks_per_stage=2))
    cfg = _cfg(lr=3e-3, free_bits=0.25, augment=AugmentConfig(rotation=10, jitter=0.1, hflip=True))
    held_out = to_input(_blobs(32, seed=9), CPU, False)

    def bits_per_dim() -> float:
        torch.manual_seed(1)
        with torch.no_grad():
            return elbo_terms(model.eval(), held_out, 8).neg_elbo.mean().item() / (784 * 0.6931)

    before = bits_per_dim()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=40)
    train_epoch(model, [_blobs(16, s) for s in range(40)], optimizer, scheduler, cfg, 0, CPU)
    after = bits_per_dim()
    assert 0 < after < 0.85 * before, (before, after)  # a true probability: bits/dim > 0


def test_history_row_flattens_train_and_val_metrics():
    row = history_row(3, {"neg_elbo": 1.5, "lr": 0.1}, {"neg_elbo": 2.0})
    assert row == {"epoch": 3, "train_neg_elbo": 1.5, "train_lr": 0.1, "val_neg_elbo": 2.0}
