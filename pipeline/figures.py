"""Every picture of the project but the interactive map: image grids, 2-D latent maps,
traversals, reconstructions, KL bars and training curves.

``image_grid`` tiles (N, C, H, W) images into one (H', W', 3) uint8 picture (MLflow images
during training, PNGs in evaluate). Maps and plots take numpy arrays and write one file each
(PNG via matplotlib's object API, no pyplot state). The model-driven grids (traversals,
reconstructions, prior samples) take a :class:`vae_core.model.ConvVAE`. The interactive HTML
map is :mod:`pipeline.html_map` (a self-contained Plotly page), which takes its colours from
here.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps, font_manager
from matplotlib.figure import Figure
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from vae_core.model import ConvVAE

UNLABELLED = "(unlabelled)"
TRAVERSAL_SPAN = 3.0  # traversals run z_j over [-3, 3]: +-3 prior standard deviations
# Text is set in DejaVu Sans (matplotlib's own); a glyph it lacks (ODIR's full-width comma,
# CJK labels) is taken from IPAexGothic, a font file the matplotlib-fontja wheel installs.
# A glyph neither has is drawn as a box, with matplotlib's "Glyph ... missing" warning.
FONTS = ("DejaVu Sans", "IPAexGothic")
FALLBACK_FONT_FILE = ("matplotlib_fontja", "fonts/ipaexg.ttf")


@functools.cache
def font_family() -> list[str]:
    """The font list for every figure's text, first font first; the fallback font file is
    registered with matplotlib on the first call (found without importing its package, whose
    import would switch every figure of the process to it)."""
    package, rel = FALLBACK_FONT_FILE
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return list(FONTS[:1])  # not installed: labels outside DejaVu draw as boxes
    font_manager.fontManager.addfont(str(Path(spec.submodule_search_locations[0]) / rel))
    return list(FONTS)


def _fonts(draw: Callable) -> Callable:
    """Run a figure-drawing function with :func:`font_family` as the font list."""

    @functools.wraps(draw)
    def wrapped(*args, **kwargs):
        with matplotlib.rc_context({"font.family": font_family()}):
            return draw(*args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------- image grids


def image_grid(images: np.ndarray, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """Tile images into one picture.

    Args:
        images: (N, C, H, W) floats in [0, 1] or uint8; C is 1 or 3.
        ncol: images per row.
        pad: white pixels between tiles.
    Returns:
        (rows*(H+pad)+pad, ncol*(W+pad)+pad, 3) uint8, ready for ``mlflow.log_image``/PNG.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    n, c, h, w = images.shape
    if c == 1:
        images = np.repeat(images, 3, axis=1)  # (N, 1, H, W) -> (N, 3, H, W)
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img.transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
    return grid


# ----------------------------------------------------------------------------- 2-D projections


def pca_layout(fit_on: np.ndarray) -> PCA:
    """The first two principal axes of ``fit_on`` (M,J) (exact SVD: refitting gives the same)."""
    return PCA(n_components=2, svd_solver="full").fit(fit_on)


def pca_axes(pca: PCA) -> list[str]:
    """Two axis titles with the variance share of each principal axis."""
    return [
        f"PC{i + 1} ({100 * s:.0f}% of variance)"
        for i, s in enumerate(pca.explained_variance_ratio_)
    ]


def pca_2d(mu: np.ndarray, fit_on: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Project mu (N,J) onto the first two principal axes of ``fit_on`` (M,J).

    Returns (N,2) coordinates and two axis titles with the variance share of each axis. Fitting
    on the train split keeps every split's map in the same axes.
    """
    pca = pca_layout(fit_on)
    return pca.transform(mu), pca_axes(pca)


def tsne_2d(mu: np.ndarray, seed: int) -> tuple[np.ndarray, list[str]]:
    """t-SNE of mu (N,J) -> (N,2) coordinates and axis titles (PCA initialised, seeded)."""
    # perplexity must stay below N; 30 is sklearn's default for all but tiny sets
    perplexity = float(min(30.0, max(1.0, (len(mu) - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(mu), ["t-SNE 1", "t-SNE 2"]


def label_names(labels: pd.Series) -> np.ndarray:
    """Labels as strings (N,), with missing labels named ``UNLABELLED``."""
    return labels.astype(object).where(labels.notna(), UNLABELLED).astype(str).to_numpy()


def label_colours(names: Sequence[str]) -> dict[str, str]:
    """One fixed colour per label (sorted order, tab10/tab20), grey for unlabelled."""
    classes = sorted(set(names) - {UNLABELLED})
    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    colours = {c: _hex(cmap(i % cmap.N)) for i, c in enumerate(classes)}
    colours[UNLABELLED] = "#b0b0b0"
    return colours


def _hex(rgba: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(255 * v):02x}" for v in rgba[:3])


# ----------------------------------------------------------------------------- PNG maps


@_fonts
def plot_map(
    xy: np.ndarray, names: np.ndarray, axes: list[str], title: str, path: Path, note: str = ""
) -> None:
    """Scatter (N,2) coordinates coloured by label name into a PNG with a legend; ``note`` is
    printed under the plot (e.g. the clustering scores the picture should be read against)."""
    colours = label_colours(names)
    fig = Figure(figsize=(6.5, 5.5), dpi=120)
    ax = fig.subplots()
    for name in sorted(set(names), key=lambda n: (n == UNLABELLED, n)):
        pts = xy[names == name]
        ax.scatter(
            pts[:, 0], pts[:, 1], s=8, alpha=0.7, c=colours[name], label=f"{name} ({len(pts)})"
        )
    ax.set(title=title, xlabel=axes[0], ylabel=axes[1])
    ax.legend(loc="best", fontsize=8, markerscale=2, frameon=False)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, color="#444", va="bottom")
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    fig.savefig(path)


# ----------------------------------------------------------------------------- model grids


def top_kl_dims(kl_per_dim: np.ndarray, n: int) -> list[int]:
    """Indices of the n latent dims with the largest mean KL (J,), most informative first."""
    return [int(j) for j in np.argsort(-kl_per_dim, kind="stable")[:n]]


@torch.no_grad()
def traversal_grid(
    model: ConvVAE,
    base_mu: torch.Tensor,
    dim: int,
    steps: int,
    sources: np.ndarray | None = None,
) -> np.ndarray:
    """Decode each row of base_mu (R,J) with z_dim swept over [-3, 3]: R rows x steps columns,
    after a first column of ``sources`` (R,C,H,W) uint8, the images base_mu encodes, if given."""
    values = torch.linspace(-TRAVERSAL_SPAN, TRAVERSAL_SPAN, steps, device=base_mu.device)  # (S,)
    z = base_mu[:, None, :].repeat(1, steps, 1)  # (R,J) -> (R,S,J)
    z[:, :, dim] = values
    images = model.likelihood.mean(model.decode(z.flatten(0, 1))).cpu().numpy()  # (R*S,C,H,W)
    if sources is None:
        return image_grid(images, ncol=steps)
    rows = images.reshape(len(base_mu), steps, *images.shape[1:])  # (R*S,C,H,W) -> (R,S,C,H,W)
    first = np.asarray(sources, np.float32)[:, None] / 255.0  # (R,C,H,W) -> (R,1,C,H,W)
    both = np.concatenate([first, rows], axis=1)  # (R,1+S,C,H,W)
    return image_grid(both.reshape(-1, *images.shape[1:]), ncol=steps + 1)


def reconstruction_grid(originals: np.ndarray, recons: np.ndarray, ncol: int = 8) -> np.ndarray:
    """Rows alternate originals and their reconstructions, ``ncol`` images per row.

    originals: (N,C,H,W) uint8; recons: (N,C,H,W) float in [0, 1].
    """
    n = len(originals) - len(originals) % ncol or len(originals)  # whole rows only
    orig = originals[:n].astype(np.float32) / 255.0
    pairs = [np.concatenate([orig[i : i + ncol], recons[i : i + ncol]]) for i in range(0, n, ncol)]
    return image_grid(np.concatenate(pairs), ncol=min(ncol, n))


def save_png(picture: np.ndarray, path: Path, scale: int = 1) -> None:
    """(H,W,3) uint8 -> PNG file, each pixel drawn as a ``scale`` x ``scale`` block."""
    if scale > 1:  # nearest-neighbour: 28 px images stay sharp instead of tiny
        picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)  # (H,W,3) -> (sH,sW,3)
    Image.fromarray(picture).save(path)


@_fonts
def save_labelled_grid(
    grid: np.ndarray,
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    path: Path,
    xlabel: str = "",
) -> None:
    """A grid from ``image_grid`` (pad 2) as a PNG with row names, column names, a title and
    an x-axis title ``xlabel`` (what the columns are, in which units)."""
    nrow, ncol = len(rows), len(cols)
    tile_h, tile_w = (grid.shape[0] - 2) / nrow, (grid.shape[1] - 2) / ncol
    scale = max(1.0, 48.0 / tile_w)  # small images (28 px) are drawn larger, pixel for pixel
    fig = Figure(figsize=(grid.shape[1] * scale / 80 + 1.6, grid.shape[0] * scale / 80 + 0.9))
    ax = fig.subplots()
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([2 + tile_w * (i + 0.5) - 1 for i in range(ncol)], list(cols), fontsize=7)
    ax.set_yticks([2 + tile_h * (i + 0.5) - 1 for i in range(nrow)], list(rows), fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(title, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")  # tight: long axis titles are not cut


@_fonts
def kl_figure(
    kl_per_dim: np.ndarray, mu_variance: np.ndarray, threshold: float, path: Path
) -> None:
    """Bar charts of the mean KL (J,) and Var_x(mu_j) (J,) per latent dim.

    Dims whose mu variance is under ``threshold`` are inactive (posterior collapse): drawn grey.
    """
    dims = np.arange(len(kl_per_dim))
    active = mu_variance > threshold
    colours = np.where(active, "#1f77b4", "#b0b0b0")
    fig = Figure(figsize=(max(5.0, 0.35 * len(dims) + 2), 5.0), dpi=110)
    ax_kl, ax_var = fig.subplots(2, 1, sharex=True)
    ax_kl.bar(dims, kl_per_dim, color=colours)
    ax_kl.set(ylabel="KL (nats)", title=f"{int(active.sum())} of {len(dims)} latent dims active")
    ax_var.bar(dims, np.maximum(mu_variance, 1e-8), color=colours)  # log axis: no zeros
    ax_var.axhline(threshold, color="k", lw=0.8, ls="--")
    ax_var.set(ylabel="Var over images of mu_j", xlabel="latent dim j", yscale="log")
    ax_var.set_xticks(dims)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------- history


HISTORY_UNITS = {  # y-axis titles of the training curves, by metric name
    "neg_elbo": "nats per image",
    "recon": "nats per image (log p(x|z))",
    "kl": "nats per image",
    "active_units": "latent dims",
    "images_per_s": "images per second",
    "data_wait_share": "share of epoch time",
    "lr": "learning rate",
}


def history_unit(metric: str) -> str:
    """The y-axis title of a training curve (``""`` for a metric without a known unit)."""
    return "bits per dimension" if metric.endswith("bpd") else HISTORY_UNITS.get(metric, "")


@_fonts
def history_figure(history: pd.DataFrame, path: Path) -> list[str]:
    """Training curves: one panel per metric with train_/val_ columns, against ``epoch``, with
    the unit on the y axis (:data:`HISTORY_UNITS`; ``*_bpd``: bits per dimension).

    Per-dimension KL columns are left out (too many lines); returns the metric names plotted.
    """
    bases = []
    for col in history.columns:
        base = col.split("_", 1)[1] if col.startswith(("train_", "val_")) else None
        if base and not base.startswith("kl_dim_") and base not in bases:
            bases.append(base)
    x = history["epoch"] if "epoch" in history else np.arange(1, len(history) + 1)
    ncol = min(3, max(1, len(bases)))
    nrow = -(-len(bases) // ncol) or 1
    fig = Figure(figsize=(4.2 * ncol, 3.2 * nrow), dpi=110)
    axs = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, base in zip(axs, bases, strict=False):
        for split in ("train", "val"):
            if f"{split}_{base}" in history:
                ax.plot(x, history[f"{split}_{base}"], marker=".", label=split)
        ax.set(title=base, xlabel="epoch", ylabel=history_unit(base))
        ax.legend(fontsize=8, frameon=False)
    for ax in axs[len(bases) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return bases
