"""The pure-PyTorch training loop: one epoch of training or evaluation, and a local fit.

Ray-free on purpose: vae_core/distributed.py runs the same train_epoch / evaluate_epoch inside
Ray Train workers (model wrapped in DDP). Metrics are per-image sums, all-reduced over ranks
when torch.distributed is initialised, then divided by the global image count, so every rank
returns the same global figures.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vae_core.augment import AugmentConfig, augment
from vae_core.elbo import ELBOTerms, elbo_terms
from vae_core.model import unwrap
from vae_core.views import ViewConfig, view_terms

# Metrics read off the wall clock: the only ones that differ between two runs with one seed.
CLOCK_METRICS = ("images_per_s", "data_wait_share")
# A latent dim is "active" when Var_x(E_q[z_j]) = Var_x(mu_j) exceeds this (Burda et al. 2015).
ACTIVE_UNIT_THRESHOLD = 0.01


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int  # per worker
    lr: float
    weight_decay: float
    lr_schedule: str  # "cosine" | "constant", stepped once per optimizer step
    grad_clip: float  # max global gradient norm; 0 disables clipping
    beta: float  # KL weight of the training objective (the reported ELBO keeps weight 1)
    kl_warmup_epochs: int  # linear KL warm-up from 0 to beta over this many epochs
    samples: int  # L, reparameterised samples per image (seed eq. 42)
    seed: int
    bf16: bool = False  # bf16 autocast on CUDA
    channels_last: bool = False  # channels-last memory format on CUDA
    cpu_bf16: bool = False  # bf16 autocast on a CPU with native bf16 dot products (use_bf16)
    cpu_channels_last: bool = False  # channels-last memory format on CPU
    compile: bool = False  # torch.compile the model (inductor; needs a C++ compiler on CPU)
    free_bits: float = 0.0  # nats per latent dim below which the KL is not penalised (training)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training batches only
    view: ViewConfig = field(default_factory=ViewConfig)  # encoder's view in training only


def _on_cuda(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bf16 dot products natively (AVX512-BF16 or AMX).

    Without them oneDNN emulates bf16 with float32 FMAs plus conversions: slower, not faster.
    """
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(torch.backends.mkldnn.is_available() and native)


def use_bf16(cfg: TrainConfig, device: torch.device | str) -> bool:
    """Whether training and evaluation on ``device`` run under bf16 autocast.

    CUDA: ``cfg.bf16``. CPU: ``cfg.cpu_bf16`` and only where :func:`cpu_supports_bf16`.
    """
    kind = torch.device(device).type
    if kind == "cuda":
        return cfg.bf16
    return kind == "cpu" and cfg.cpu_bf16 and cpu_supports_bf16()


def use_channels_last(cfg: TrainConfig, device: torch.device | str) -> bool:
    """Whether weights and inputs on ``device`` use the channels-last (NHWC) memory format."""
    kind = torch.device(device).type
    return cfg.channels_last if kind == "cuda" else kind == "cpu" and cfg.cpu_channels_last


class CompileError(RuntimeError):
    """torch.compile failed (no C++ compiler, an unsupported op, ...); ``str()`` is one line."""


def prepare_model(model: nn.Module, cfg: TrainConfig, device: torch.device | str) -> nn.Module:
    """Move ``model`` to ``device``; channels-last weights and torch.compile when asked for.

    Compilation is lazy: a failure surfaces at the first step as :class:`CompileError`.
    """
    model = model.to(device)
    if use_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if cfg.compile else model


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on conv/linear weights only, not on biases, norms or the log-scale."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR schedule: cosine decay from lr to 0 over all steps, or constant."""
    if cfg.lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {cfg.lr_schedule!r}")
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.lr_schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )


def kl_weight(cfg: TrainConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """KL weight at (0-based) ``epoch`` and ``step``: rises linearly to beta over the warm-up."""
    if cfg.kl_warmup_epochs <= 0:
        return cfg.beta
    done = epoch * steps_per_epoch + step + 1  # steps finished after this one
    return cfg.beta * min(1.0, done / (cfg.kl_warmup_epochs * max(1, steps_per_epoch)))


def to_input(
    batch: Tensor | list | tuple, device: torch.device | str, channels_last: bool
) -> Tensor:
    """Loader batch (uint8 (B,C,H,W), or a list/tuple whose first item is) -> float in [0, 1].

    The uint8 batch crosses to the device first (4x fewer bytes) and is converted there.
    """
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    x = batch.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _autocast(cfg: TrainConfig, device: torch.device | str) -> torch.autocast:
    # The ELBO sums stay float32 under autocast: vae_core.likelihoods and ConvVAE.encode upcast.
    kind = torch.device(device).type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=use_bf16(cfg, device))


@contextlib.contextmanager
def _compile_errors() -> Iterator[None]:
    """Turn torch.compile's multi-page failure into one line of :class:`CompileError`."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        first = lines[0][:200] if lines else type(exc).__name__
        raise CompileError(
            f"torch.compile failed ({type(exc).__name__}: {first}); set train.compile: false"
        ) from None


class _Sums:
    """Per-image sums on the device (float64), kept without host syncs until the epoch ends.

    Layout (length 5 + E + 3J): images, neg_elbo, recon, kl, loss, the E ``extras`` (batch
    means of extra objective terms, weighted by images), kl_per_dim (J), mu (J), mu^2 (J).
    """

    def __init__(
        self, latent_dim: int, device: torch.device | str, extras: tuple[str, ...] = ()
    ) -> None:
        self.latent_dim, self.extras = latent_dim, extras
        size = 5 + len(extras) + 3 * latent_dim
        self.total = torch.zeros(size, dtype=torch.float64, device=device)

    @torch.no_grad()
    def add(self, t: ELBOTerms) -> None:
        n = t.neg_elbo.new_tensor(float(t.neg_elbo.shape[0]))
        extras = [t.extras[name].to(n.dtype) * n for name in self.extras]
        scalars = torch.stack([n, t.neg_elbo.sum(), t.recon.sum(), t.kl.sum(), t.loss * n, *extras])
        mu = t.mu.double()
        per_dim = [t.kl_per_dim.double().sum(0), mu.sum(0), mu.square().sum(0)]
        self.total += torch.cat([scalars.double(), *per_dim])

    def finish(self, elapsed: float, data_wait: float | None = None) -> dict[str, float]:
        """All-reduce over ranks (if distributed) and turn sums into per-image means.

        ``elapsed`` and ``data_wait`` are this rank's seconds for the epoch and, within them,
        blocked on the data loader (``data_wait_share`` only when given); the slowest rank's
        figures are reported.
        """
        clock = torch.tensor(
            [elapsed, data_wait or 0.0], dtype=torch.float64, device=self.total.device
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.total)
            dist.all_reduce(clock, op=dist.ReduceOp.MAX)  # the slowest rank sets the epoch time
        wall, wait = clock[0].item(), clock[1].item()
        total, j, e = self.total.cpu(), self.latent_dim, len(self.extras)
        n = total[0].item()
        means = total[1:] / max(n, 1.0)  # an empty split gives zeros, not NaN
        per_dim = means[4 + e :]  # (3J,): kl_per_dim, mu, mu^2
        kl_dims, mu, mu_sq = per_dim[:j], per_dim[j : 2 * j], per_dim[2 * j :]
        variance = mu_sq - mu.square()  # Var_x(mu_j) over all images seen
        metrics = {
            "neg_elbo": means[0].item(),
            "recon": means[1].item(),
            "kl": means[2].item(),
            "loss": means[3].item(),
            "images": n,
            "images_per_s": n / wall if wall > 0 else 0.0,
            "active_units": float((variance > ACTIVE_UNIT_THRESHOLD).sum().item()) if n else 0.0,
        }
        if data_wait is not None:
            # Share of the epoch the host sat waiting for the next batch: time the device
            # (GPU or CPU cores) may have been idle for want of data.
            metrics["data_wait_share"] = wait / wall if wall > 0 else 0.0
        metrics.update({name: means[4 + i].item() for i, name in enumerate(self.extras)})
        metrics.update({f"kl_dim_{i}": kl_dims[i].item() for i in range(j)})
        return metrics


def _grad_norm(model: nn.Module, max_norm: float) -> Tensor:
    """Global gradient norm (after DDP's all-reduce, so equal on every rank); clips if > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def _check_finite(pending: tuple[int, Tensor, Tensor] | None, epoch: int) -> None:
    """Raise FloatingPointError if a step's loss or gradient norm was NaN or inf."""
    if pending is None:
        return
    step, loss, norm = pending
    if not bool(torch.isfinite(loss) & torch.isfinite(norm)):
        raise FloatingPointError(
            f"non-finite loss at epoch {epoch} step {step} (loss={loss.item()}, "
            f"grad norm={norm.item()}): lower train.lr, keep train.grad_clip > 0, "
            "or check the input images"
        )


class _LoaderClock:
    """Iterate ``loader``, adding the seconds spent blocked in its ``next()`` to ``waited``."""

    def __init__(self, loader: Iterable) -> None:
        self.loader, self.waited = loader, 0.0

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - start
            yield batch


def _set_epoch(loader: Iterable, epoch: int) -> None:
    # DistributedSampler reshuffles per epoch only when told the epoch.
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def train_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    cfg: TrainConfig,
    epoch: int,
    device: torch.device | str,
) -> dict[str, float]:
    """One pass over ``loader`` (0-based ``epoch``); returns global per-image metrics.

    ``model`` may be DDP-wrapped: the loss goes through the wrapper's forward.
    Extra keys beyond evaluate_epoch's: ``lr`` and ``kl_weight`` at the last step, and the
    view objective's own terms (``cfg.view.metrics``: consistency, contrastive) when paired.
    Under a view objective the reported neg_elbo is the bound with q(z|t(x)) (denoising only)
    or the clean image's (paired); evaluate_epoch always reports the clean q(z|x) bound.
    """
    model.train()
    _set_epoch(loader, epoch)
    steps = len(loader)
    channels_last = use_channels_last(cfg, device)
    sums = _Sums(unwrap(model).config.latent_dim, device, cfg.view.metrics)
    weight, pending = kl_weight(cfg, epoch, 0, steps), None
    clock, start = _LoaderClock(loader), time.perf_counter()
    with _compile_errors():  # compilation happens at the first forward and backward
        for step, batch in enumerate(clock):
            x, _ = augment(to_input(batch, device, channels_last), cfg.augment)
            weight = kl_weight(cfg, epoch, step, steps)
            with _autocast(cfg, device):
                terms = view_terms(model, x, cfg.view, cfg.samples, weight, cfg.free_bits)
            optimizer.zero_grad(set_to_none=True)
            terms.loss.backward()
            norm = _grad_norm(model, cfg.grad_clip)
            # Check the previous step, not this one: the host then never waits for the GPU work it
            # has just queued. Loss and grad norm together: the norm is identical on every DDP rank,
            # so a NaN on one rank stops all of them at the same step.
            _check_finite(pending, epoch)
            pending = (step, terms.loss.detach(), norm.detach())
            optimizer.step()
            scheduler.step()
            sums.add(terms)
    _check_finite(pending, epoch)
    if _on_cuda(device):
        torch.cuda.synchronize(device)
    metrics = sums.finish(time.perf_counter() - start, clock.waited)
    metrics.update(lr=optimizer.param_groups[0]["lr"], kl_weight=weight)
    return metrics


@torch.no_grad()
def evaluate_epoch(
    model: nn.Module, loader: Iterable, cfg: TrainConfig, device: torch.device | str
) -> dict[str, float]:
    """ELBO terms over ``loader`` with L = cfg.samples sampled z per image (not z = mu).

    ``loss`` here is the objective at the full KL weight beta (no warm-up), free bits applied;
    no augmentation.
    """
    model.eval()
    channels_last = use_channels_last(cfg, device)
    sums = _Sums(unwrap(model).config.latent_dim, device)
    start = time.perf_counter()
    with _compile_errors():
        for batch in loader:
            x = to_input(batch, device, channels_last)
            with _autocast(cfg, device):
                sums.add(elbo_terms(model, x, cfg.samples, cfg.beta, cfg.free_bits))
    if _on_cuda(device):
        torch.cuda.synchronize(device)
    return sums.finish(time.perf_counter() - start)


# After each epoch: on_epoch(epoch, row, model), row from history_row, model the bare module
EpochCallback = Callable[[int, dict[str, float], nn.Module], None]


def history_row(epoch: int, train: dict[str, float], val: dict[str, float]) -> dict[str, float]:
    """One flat history row: ``{"epoch": e, "train_<key>": ..., "val_<key>": ...}``."""
    row = {"epoch": epoch}
    row.update({f"train_{k}": v for k, v in train.items()})
    row.update({f"val_{k}": v for k, v in val.items()})
    return row


def fit_local(
    model: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable,
    cfg: TrainConfig,
    device: torch.device | str,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, float]]:
    """Single-process training: the baseline for the Ray run and the benchmarks.

    Seeds torch with cfg.seed, then per epoch trains, evaluates and calls
    ``on_epoch(epoch, row, model)`` (as the Ray loop does). Returns one flat row per epoch
    (:func:`history_row`).
    """
    torch.manual_seed(cfg.seed)
    model = prepare_model(model, cfg, device)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(train_loader))
    history = []
    for epoch in range(cfg.epochs):
        train = train_epoch(model, train_loader, optimizer, scheduler, cfg, epoch, device)
        val = evaluate_epoch(model, val_loader, cfg, device)
        row = history_row(epoch, train, val)
        history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row, unwrap(model))
    return history
