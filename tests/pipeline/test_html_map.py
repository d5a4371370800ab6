"""The interactive latent map (pipeline.html_map): self-contained, small, safe to embed."""

import base64
import gzip
import io
import json

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.figures import UNLABELLED
from pipeline.html_map import THUMB_MAX, UNKNOWN, latent_map, thumbnail_uri


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
