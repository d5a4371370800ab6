"""Latent maps, the interactive HTML map, traversal/reconstruction grids and history curves."""

import base64
import gzip
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.maps import (
    THUMB_MAX,
    UNKNOWN,
    UNLABELLED,
    history_figure,
    html_map,
    label_names,
    pca_2d,
    plot_map,
    reconstruction_grid,
    save_png,
    thumbnail_uri,
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


def _decode(uri: str) -> Image.Image:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_thumbnail_round_trips_a_small_image():
    palette = np.random.default_rng(0).integers(0, 256, (8, 3), dtype=np.uint8)  # 8 colours
    img = palette[np.random.default_rng(1).integers(0, 8, (20, 24))].transpose(2, 0, 1)
    back = np.asarray(_decode(thumbnail_uri(img)).convert("RGB"))
    np.testing.assert_array_equal(back, img.transpose(1, 2, 0))  # lossless, (H, W, C)


def test_thumbnail_of_a_large_image_is_small():
    rng = np.random.default_rng(0)
    for shape in [(1, 64, 64), (3, 300, 200)]:  # noisy: the worst case for PNG
        uri = thumbnail_uri(rng.integers(0, 256, shape, dtype=np.uint8))
        pic = _decode(uri)
        assert max(pic.size) == THUMB_MAX and len(pic.getcolors()) <= 32
        assert len(uri) < 2500


def _points(n: int) -> tuple[pd.DataFrame, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, (n, 1, 16, 16), dtype=np.uint8)
    points = pd.DataFrame(
        {
            "x": np.arange(n, dtype=float),
            "y": np.arange(n, dtype=float) ** 0.5,
            "label": (["CNV", "NORMAL", UNLABELLED] * n)[:n],
            "split": (["train", "test"] * n)[:n],
            "image_id": [f"img{i:03d}" for i in range(n)],
            "eye": ([None, "OD", "OS"] * n)[:n],
            "constant": "one value",
        }
    )
    return points, images


def _payload(html: str, element: str) -> dict:
    tag = f'<script type="application/json" id="{element}">'
    start = html.index(tag) + len(tag)
    return json.loads(html[start : html.index("</script>", start)])


def test_html_map_is_standalone_with_thumbnails(tmp_path):
    points, images = _points(6)
    path = tmp_path / "map.html"
    size = html_map(points, images, ["x", "y"], "latent <map>", path, ("label", "eye", "constant"))
    html = path.read_text()
    assert size == path.stat().st_size
    assert "http://" not in html and "https://" not in html.replace("https://plot.ly", "")
    assert "<title>latent &lt;map&gt;</title>" in html
    data = _payload(html, "map-data")
    assert data["id"] == [f"img{i:03d}" for i in range(6)]
    assert data["thumb"] == [thumbnail_uri(img) for img in images]
    assert list(data["columns"]) == ["label", "eye"]  # one-value columns are not offered
    eye = data["columns"]["eye"]
    assert eye["names"] == ["OD", "OS", UNKNOWN] and eye["codes"] == [2, 0, 1, 2, 0, 1]
    assert eye["colours"][-1] == "#b0b0b0"  # missing: grey, last
    assert _payload(html, "map-layout")["xaxis"]["title"]["text"] == "x"
    # plotly.js is inside, compressed: the page needs nothing from the network
    start = html.index('id="plotly-js-gzip">') + len('id="plotly-js-gzip">')
    packed = base64.b64decode(html[start : html.index("</script>", start)])
    assert gzip.decompress(packed).decode().lstrip().startswith("/**\n* plotly.js v")


def test_html_map_data_cannot_close_its_script_element(tmp_path):
    points, images = _points(3)
    points["label"] = ["</script><script>alert(1)</script>", "a", "__PLOTLY__"]
    html_map(points, images, ["x", "y"], "t", tmp_path / "map.html")
    html = (tmp_path / "map.html").read_text()
    assert "</script><script>alert" not in html
    assert _payload(html, "map-data")["label"][0].startswith("</script>")
    assert html.count('id="plotly-js-gzip"') == 1


def test_html_map_of_2000_points_stays_small(tmp_path):
    """2,000 noisy 64 px thumbnails (the worst case for PNG): well under the old 8.2 MB."""
    points, _ = _points(2000)
    images = np.random.default_rng(0).integers(0, 256, (2000, 1, 64, 64), dtype=np.uint8)
    size = html_map(points, images, ["x", "y"], "t", tmp_path / "map.html")
    assert size < 6_000_000


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


def test_save_png_scales_pixels_to_blocks(tmp_path):
    picture = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)  # (1, 2, 3)
    save_png(picture, tmp_path / "p.png", scale=3)
    back = np.asarray(Image.open(tmp_path / "p.png"))
    assert back.shape == (3, 6, 3)
    assert (back[:, :3] == 0).all() and (back[:, 3:] == 255).all()
