"""The interactive latent map (pipeline.html_map): self-contained, small, safe to embed."""

import base64
import gzip
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.figures import UNLABELLED
from pipeline.html_map import THUMB_MAX, UNKNOWN, latent_map, read_payload, thumbnail_uri


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


def _layouts(points: pd.DataFrame) -> dict:
    return {"map": (points[["x", "y"]].to_numpy(), ["x", "y"])}


def _payload(html: str, element: str) -> dict:
    tag = f'<script type="application/json" id="{element}">'
    start = html.index(tag) + len(tag)
    return json.loads(html[start : html.index("</script>", start)])


def test_html_map_is_standalone_with_thumbnails(tmp_path):
    points, images = _points(6)
    path = tmp_path / "map.html"
    size = latent_map(
        points, images, _layouts(points), "latent <map>", path, ("label", "eye", "constant")
    )
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
    latent_map(points, images, _layouts(points), "t", tmp_path / "map.html")
    html = (tmp_path / "map.html").read_text()
    assert "</script><script>alert" not in html
    assert _payload(html, "map-data")["label"][0].startswith("</script>")
    assert html.count('id="plotly-js-gzip"') == 1


def test_html_map_of_2000_points_stays_small(tmp_path):
    """2,000 noisy 64 px thumbnails (the worst case for PNG): well under the old 8.2 MB."""
    points, _ = _points(2000)
    images = np.random.default_rng(0).integers(0, 256, (2000, 1, 64, 64), dtype=np.uint8)
    size = latent_map(points, images, _layouts(points), "t", tmp_path / "map.html")
    assert size < 6_000_000


def test_continuous_columns_layouts_neighbours_and_header(tmp_path):
    points, images = _points(4)
    points["severity"] = [0.5, np.nan, 0.25, 1.0]
    points["mu_0"] = np.array([1.0, -1.0, 2.0, 0.0], np.float32)
    pca = np.array([[0, 1], [1, 0], [2, 2], [3, 1]], float)
    spectrum = np.array([[0.1, 0.5], [0.2, np.nan], [0.3, 0.25], [0.4, 1.0]])
    layouts = {"PCA": (pca, ["PC1", "PC2"]), "spectrum": (spectrum, ["position", "severity"])}
    path = tmp_path / "map.html"
    latent_map(
        points, images, layouts, "t", path, ("label", "severity", "mu_0", "eye"),
        header=["run abc", "J = 1"], neighbours=np.array([[1], [0], [3], [2]]),
    )  # fmt: skip
    data = _payload(path.read_text(), "map-data")
    assert data["columns"]["severity"] == {"kind": "number", "values": [0.5, None, 0.25, 1.0]}
    assert data["columns"]["mu_0"]["values"] == [1.0, -1.0, 2.0, 0.0]
    assert data["columns"]["eye"]["kind"] == "category"
    assert list(data["layouts"]) == ["PCA", "spectrum"]  # the first drawn first
    assert data["layouts"]["spectrum"]["y"] == [0.5, None, 0.25, 1.0]  # NaN: not drawn
    assert data["layouts"]["PCA"]["axes"] == ["PC1", "PC2"]
    assert data["neighbours"] == [[1], [0], [3], [2]] and data["header"] == ["run abc", "J = 1"]
    assert read_payload(path) == data


def test_read_payload_of_another_file_is_a_one_line_error(tmp_path):
    path = tmp_path / "page.html"
    path.write_text("<html></html>")
    with pytest.raises(UserError, match="page.html: not a latent map"):
        read_payload(path)
