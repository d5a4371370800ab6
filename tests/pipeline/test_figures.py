"""Figures (pipeline.figures): latent maps, traversal/reconstruction grids, history curves."""

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from fontTools.ttLib import TTFont
from matplotlib import font_manager
from PIL import Image

from pipeline.figures import (
    UNLABELLED,
    font_family,
    history_figure,
    history_unit,
    label_names,
    pca_2d,
    plot_map,
    reconstruction_grid,
    save_labelled_grid,
    save_png,
    top_kl_dims,
    traversal_grid,
    tsne_2d,
)
from vae_core.model import ConvVAE, VAEConfig


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_pca_keeps_the_axis_of_largest_variance():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((200, 6)) * np.array([10.0, 3.0, 1.0, 1.0, 1.0, 1.0])  # (N, J)
    xy, axes = pca_2d(mu, fit_on=mu)
    assert xy.shape == (200, 2)
    assert np.corrcoef(xy[:, 0], mu[:, 0])[0, 1] ** 2 > 0.95
    share = int(re.search(r"\((\d+)%", axes[0]).group(1))
    assert 80 < share < 95  # 100 / (100 + 9 + 4) of the variance, up to sampling noise


def test_tsne_keeps_clusters_apart_on_a_tiny_set():
    rng = np.random.default_rng(0)
    mu = np.concatenate([rng.normal(0, 0.1, (10, 4)), rng.normal(5, 0.1, (10, 4))])  # (20, 4)
    xy, _ = tsne_2d(mu, seed=0)
    a, b = xy[:10], xy[10:]
    gap = np.linalg.norm(a.mean(0) - b.mean(0))
    assert gap > 3 * max(a.std(0).max(), b.std(0).max())


def test_plot_map_writes_a_png(tmp_path):
    xy = np.random.default_rng(0).standard_normal((30, 2))
    names = label_names(pd.Series(["a"] * 10 + ["b"] * 10 + [None] * 10, dtype=object))
    assert (names == UNLABELLED).sum() == 10
    plot_map(xy, names, ["x", "y"], "test", tmp_path / "map.png")
    assert _png_size(tmp_path / "map.png")[0] > 300


def test_top_kl_dims_orders_by_kl():
    assert top_kl_dims(np.array([0.1, 2.0, 0.0, 0.5]), 3) == [1, 3, 0]


@pytest.fixture
def model() -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(
        VAEConfig(in_channels=1, height=16, width=16, widths=(4, 8), latent_dim=3)
    ).eval()


def test_traversal_grid_sweeps_one_dim(model):
    base = torch.zeros(2, 3)  # (R, J)
    grid = traversal_grid(model, base, dim=1, steps=5)
    assert grid.shape == (2 * 18 + 2, 5 * 18 + 2, 3)  # 2 rows x 5 columns of 16 px, pad 2
    # the last column decodes z = (0, +3, 0)
    z = torch.tensor([[0.0, 3.0, 0.0]])
    expected = model.likelihood.mean(model.decode(z))[0, 0].detach().numpy()
    tile = grid[2:18, 2 + 4 * 18 : 2 + 4 * 18 + 16, 0].astype(np.float32) / 255.0
    np.testing.assert_allclose(tile, expected, atol=1 / 255 + 1e-6)
    assert not np.array_equal(grid[2:18, 2:18], tile)  # z_1 = -3 decodes to something else


def test_traversal_grid_starts_each_row_with_its_source_image(model):
    sources = np.stack([np.full((1, 16, 16), v, np.uint8) for v in (40, 220)])  # (R,C,H,W)
    grid = traversal_grid(model, torch.zeros(2, 3), dim=0, steps=5, sources=sources)
    assert grid.shape == (2 * 18 + 2, 6 * 18 + 2, 3)  # a source column, then 5 steps
    assert (grid[2:18, 2:18] == 40).all() and (grid[20:36, 2:18] == 220).all()
    bare = traversal_grid(model, torch.zeros(2, 3), dim=0, steps=5)
    np.testing.assert_array_equal(grid[:, 18:], bare)  # the sweep itself is unchanged


def test_reconstruction_grid_alternates_rows():
    originals = np.full((4, 1, 8, 8), 255, np.uint8)
    recons = np.zeros((4, 1, 8, 8), np.float32)
    grid = reconstruction_grid(originals, recons, ncol=2)
    assert grid.shape == (4 * 10 + 2, 2 * 10 + 2, 3)
    row_means = [grid[2 + r * 10 : 10 + r * 10, 2:20].mean() for r in range(4)]
    assert row_means[0] > 200 and row_means[2] > 200  # originals (white)
    assert row_means[1] < 60 and row_means[3] < 60  # reconstructions (black)


def test_history_figure_plots_train_and_val_metrics(tmp_path):
    history = pd.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_neg_elbo": [900.0, 700.0, 650.0],
            "val_neg_elbo": [910.0, 720.0, 660.0],
            "train_kl": [5.0, 9.0, 10.0],
            "train_kl_dim_0": [1.0, 2.0, 3.0],
            "lr": [1e-3, 5e-4, 1e-4],
        }
    )
    assert history_figure(history, tmp_path / "h.png") == ["neg_elbo", "kl"]
    assert _png_size(tmp_path / "h.png")[0] > 300


@pytest.mark.parametrize(
    ("metric", "unit"),
    [("neg_elbo", "nats per image"), ("kl", "nats per image"),
     ("neg_elbo_bpd", "bits per dimension"), ("images_per_s", "images per second"),
     ("something_new", "")],
)  # fmt: skip
def test_training_curves_carry_their_units(metric, unit):
    assert history_unit(metric) == unit


def test_save_png_scales_pixels_to_blocks(tmp_path):
    picture = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)  # (1, 2, 3)
    save_png(picture, tmp_path / "p.png", scale=3)
    back = np.asarray(Image.open(tmp_path / "p.png"))
    assert back.shape == (3, 6, 3)
    assert (back[:, :3] == 0).all() and (back[:, 3:] == 255).all()


# ODIR-5K's keywords (full-width comma between two findings) and a Chinese label
NON_ASCII = ["moderate non proliferative retinopathy\uff0chypertensive retinopathy", "正常眼底"]


def test_non_ascii_labels_find_their_glyphs(tmp_path):
    """Every character of the labels is in one of the figure fonts, read from the font files'
    own character maps (fontTools), and drawing them raises no missing-glyph warning (the old
    figures drew boxes: 'Glyph 65292 (FULLWIDTH COMMA) missing from font(s) DejaVu Sans')."""
    families = font_family()
    files = [font_manager.findfont(f, fallback_to_default=False) for f in families]
    covered = set().union(*(TTFont(f).getBestCmap() for f in files))
    assert not {c for c in "".join(NON_ASCII) if ord(c) not in covered}
    names = np.array(NON_ASCII * 5 + ["normal"] * 5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        plot_map(
            np.random.default_rng(0).random((15, 2)), names, ["x", "y"], "map", tmp_path / "m.png"
        )
        grid = np.zeros((2 + 2 * 18, 2 + 2 * 18, 3), np.uint8)  # 2 x 2 tiles of 16 px, pad 2
        save_labelled_grid(grid, NON_ASCII, NON_ASCII, NON_ASCII[1], tmp_path / "t.png")
    missing = [str(w.message) for w in seen if "missing from font" in str(w.message)]
    assert missing == []
    assert _png_size(tmp_path / "m.png") and _png_size(tmp_path / "t.png")
