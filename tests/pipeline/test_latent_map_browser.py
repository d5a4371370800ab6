"""The HTML latent map in a real browser, shown the way MLflow's artifact viewer shows it.

Headless Chromium (Debian's ``chromium`` package, driven by playwright; no browser is ever
downloaded) opens a page whose only content is a sandboxed iframe holding the map:
``sandbox="allow-scripts"`` (an opaque origin: no storage, no parent access) with the file as
``srcdoc``, and, as MLflow 3.17 does it, as a ``blob:`` URL. The test then looks inside the
iframe: every point drawn as an SVG marker, coloured pixels on screen, a hover that shows the
thumbnail, label and id, and the colour-by drop-down. Skipped only when no Chromium is installed.
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.html_map import latent_map

pytestmark = pytest.mark.slow

# Chromium as root in a container: no sandbox, no GPU, nothing from the network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LABELS = ("CNV", "DME", "NORMAL")
N = 240
RENDER_TIMEOUT_MS = 60_000


def chromium_path() -> str | None:
    """The system Chromium: env RETINA_VAE_CHROMIUM, else ``chromium`` on PATH."""
    env = os.environ.get("RETINA_VAE_CHROMIUM")
    if env:
        return env
    return next((p for name in ("chromium", "chromium-browser") if (p := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        pytest.skip(
            "no Chromium installed (apt-get install chromium, as .ci/run does): "
            "the latent map's browser test cannot run"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # playwright gives the browser a fresh temporary profile (--user-data-dir) itself
        chromium = pw.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


def iframe_page(document: str, mode: str) -> str:
    """A page holding ``document`` in a sandboxed iframe, as ``srcdoc`` or a ``blob:`` URL."""
    style = "width:1000px;height:760px;border:0"
    if mode == "srcdoc":
        doc = html.escape(document, quote=True)
        return f'<iframe id="view" sandbox="allow-scripts" style="{style}" srcdoc="{doc}"></iframe>'
    # MLflow 3.17's ShowArtifactHtmlView: a Blob of the text, its URL as the iframe's src
    text = document.replace("\\", "\\\\").replace("`", "\\`").replace("${", "\\${")
    text = text.replace("</script", "<\\/script")
    return (
        f'<iframe id="view" sandbox="allow-scripts" style="{style}"></iframe><script>'
        f"const blob = new Blob([`{text}`], {{type: 'text/html'}});"
        "document.getElementById('view').src = URL.createObjectURL(blob);</script>"
    )


def open_in_iframe(browser, document: str, mode: str):
    """(page, frame) once the iframe's document has loaded."""
    page = browser.new_page(viewport={"width": 1040, "height": 800})
    page.set_content(iframe_page(document, mode))
    frame = page.locator("#view").element_handle().content_frame()
    want = "about:srcdoc" if mode == "srcdoc" else "blob:"
    for _ in range(200):  # the iframe navigates to its document
        if frame.url.startswith(want):
            break
        page.wait_for_timeout(50)
    assert frame.url.startswith(want), frame.url
    frame.wait_for_load_state()
    return page, frame


def drawn_points(frame) -> int:
    """Markers drawn: Plotly's SVG ``path.point`` elements with a size on screen."""
    return frame.evaluate(
        """() => Array.from(document.querySelectorAll('path.point')).filter(p => {
             const r = p.getBoundingClientRect(); return r.width > 0 && r.height > 0;
           }).length"""
    )


def coloured_pixels(page) -> int:
    """Pixels of the iframe's screenshot that are clearly coloured (not white, grey, black)."""
    shot = Image.open(io.BytesIO(page.locator("#view").screenshot())).convert("RGB")
    rgb = np.asarray(shot).astype(int)  # (H, W, 3)
    return int(((rgb.max(2) - rgb.min(2)) > 60).sum())


def check_map_is_drawn(browser, document: str, n: int, mode: str = "srcdoc") -> None:
    """The assertions: ``n`` points drawn and visible, hover shows the thumbnail and id."""
    page, frame = open_in_iframe(browser, document, mode)
    try:
        # on a timeout (playwright's TimeoutError) the assertion below says what the frame shows
        with contextlib.suppress(Exception):
            frame.wait_for_function(
                f"document.querySelectorAll('path.point').length >= {n}",
                timeout=RENDER_TIMEOUT_MS,
            )
        status = frame.evaluate("document.body ? document.body.innerText.slice(0, 300) : ''")
        assert drawn_points(frame) == n, f"points drawn in the sandboxed iframe; page: {status!r}"
        assert coloured_pixels(page) > 5 * n, "the iframe shows no coloured markers"

        # hover the first marker: the thumbnail and its caption appear
        box = frame.locator("path.point").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        tip = frame.locator("#thumb")
        tip.wait_for(state="visible", timeout=10_000)
        src = tip.locator("img").get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        assert tip.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
        caption = tip.inner_text()
        data = map_data(document)
        hovered = [i for i, image_id in enumerate(data["id"]) if image_id in caption]
        assert hovered, f"no image id in the hover caption {caption!r}"
        assert data["label"][hovered[0]] in caption and data["split"][hovered[0]] in caption
    finally:
        page.close()


def map_data(document: str) -> dict:
    """The points the page holds (its JSON payload)."""
    tag = '<script type="application/json" id="map-data">'
    start = document.index(tag) + len(tag)
    return json.loads(document[start : document.index("</script>", start)])


HEADER = ["retina-vae latent map: MLflow run 0123abcd, model models/vae.pt", "latent size J = 16"]
UNKNOWN_SEVERITY = 40  # points without a severity: grey in its colouring, absent on its axis
K = 5  # nearest neighbours listed on a click


def demo_map(path: Path, n: int = N) -> str:
    """A map of ``n`` points in three label clusters, with eye and source folder columns, a
    severity (unknown for some), t-SNE-, PCA- and spectrum-like layouts and neighbours."""
    rng = np.random.default_rng(0)
    k = np.arange(n) % len(LABELS)
    severity = rng.uniform(0, 1, n)
    severity[:UNKNOWN_SEVERITY] = np.nan
    points = pd.DataFrame(
        {
            "label": np.array(LABELS)[k],
            "split": rng.choice(["train", "val", "test"], n),
            "image_id": [f"img-{i:04d}" for i in range(n)],
            "eye": rng.choice(["OD", "OS"], n),
            "source_folder": rng.choice(["dicom", "images"], n),
            "severity": severity,
        }
    )
    tsne = np.stack(
        [
            rng.normal(0, 0.4, n) + 3 * np.cos(2 * np.pi * k / 3),
            rng.normal(0, 0.4, n) + 3 * np.sin(2 * np.pi * k / 3),
        ],
        axis=1,
    )
    layouts = {
        "t-SNE": (tsne, ["t-SNE 1", "t-SNE 2"]),
        "PCA": (tsne @ np.array([[0.8, 0.6], [-0.6, 0.8]]), ["PC1 (40%)", "PC2 (20%)"]),
        "spectrum": (
            np.stack([severity + rng.normal(0, 0.1, n), severity], axis=1),
            ["position along the severity direction (latent units)", "severity"],
        ),
    }
    neighbours = (np.arange(n)[:, None] + np.arange(1, K + 1)[None, :]) % n  # (N,K)
    images = rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8)
    latent_map(
        points, images, layouts, "test map", path,
        colour_by=("label", "split", "eye", "source_folder", "severity"),
        header=HEADER, neighbours=neighbours,
    )  # fmt: skip
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def document(tmp_path_factory) -> str:
    return demo_map(tmp_path_factory.mktemp("map") / "latent_map.html")


@pytest.mark.parametrize("mode", ["srcdoc", "blob"])
def test_map_draws_every_point_in_a_sandboxed_iframe(browser, document, mode):
    check_map_is_drawn(browser, document, N, mode)


def test_colour_by_switches_the_legend(browser, document):
    page, frame = open_in_iframe(browser, document, "srcdoc")
    try:
        frame.wait_for_function(
            f"document.querySelectorAll('path.point').length >= {N}", timeout=RENDER_TIMEOUT_MS
        )
        legend = frame.locator(".legend .traces")
        assert legend.count() == len(LABELS)
        options = frame.locator("#colour-by option").all_inner_texts()
        assert options == ["label", "split", "eye", "source_folder", "severity"]
        frame.select_option("#colour-by", "eye")
        frame.wait_for_function("document.querySelectorAll('.legend .traces').length === 2")
        names = frame.evaluate(
            "Array.from(document.querySelectorAll('.legend .legendtext')).map(t => t.textContent)"
        )
        assert sorted(t.split(" (")[0] for t in names) == ["OD", "OS"]
        assert drawn_points(frame) == N  # same points, new colours
        box = frame.locator("path.point").first.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        frame.locator("#thumb").wait_for(state="visible", timeout=10_000)
        assert "eye: O" in frame.locator("#thumb").inner_text()  # the colour-by value too
        page.mouse.move(1, 1)
        legend.first.click()  # hides the first group
        frame.wait_for_function(f"document.querySelectorAll('path.point').length < {N}")
    finally:
        page.close()


def texts(frame, selector: str) -> list[str]:
    """The text of SVG elements (Plotly's legend and axis titles), in document order."""
    return frame.evaluate(
        f"Array.from(document.querySelectorAll({selector!r})).map(t => t.textContent)"
    )


def drawn_ready(frame, n: int = N) -> None:
    frame.wait_for_function(
        f"document.querySelectorAll('path.point').length >= {n}", timeout=RENDER_TIMEOUT_MS
    )


def test_header_names_the_run_and_the_latent_size(browser, document):
    page, frame = open_in_iframe(browser, document, "blob")
    try:
        drawn_ready(frame)
        assert frame.locator("#header").inner_text().splitlines() == HEADER
    finally:
        page.close()


def test_continuous_colouring_draws_a_colour_scale(browser, document):
    page, frame = open_in_iframe(browser, document, "srcdoc")
    try:
        drawn_ready(frame)
        assert frame.locator(".colorbar").count() == 0
        frame.select_option("#colour-by", "severity")
        frame.wait_for_function("document.querySelectorAll('.colorbar').length === 1")
        fills = frame.evaluate(
            "Array.from(document.querySelectorAll('path.point')).map(p => p.style.fill)"
        )
        assert len(fills) == N
        grey = [f for f in fills if f == "rgb(176, 176, 176)"]
        assert len(grey) == UNKNOWN_SEVERITY  # unknown severity: grey, outside the scale
        assert len(set(fills) - set(grey)) > 50  # a continuous scale, not a few categories
        names = texts(frame, ".legend .legendtext")
        assert names == [f"severity ({N - UNKNOWN_SEVERITY})", f"(missing) ({UNKNOWN_SEVERITY})"]
        # hover: the value is in the caption
        box = frame.locator("path.point").last.bounding_box()
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        frame.locator("#thumb").wait_for(state="visible", timeout=10_000)
        assert "severity: " in frame.locator("#thumb").inner_text()
    finally:
        page.close()


def test_spectrum_layout_puts_the_images_along_its_axis(browser, document):
    page, frame = open_in_iframe(browser, document, "srcdoc")
    try:
        drawn_ready(frame)
        assert frame.locator("#layout option").all_inner_texts() == ["t-SNE", "PCA", "spectrum"]
        frame.select_option("#layout", "spectrum")
        known = N - UNKNOWN_SEVERITY
        frame.wait_for_function(f"document.querySelectorAll('path.point').length === {known}")
        titles = texts(frame, ".xtitle, .ytitle")
        assert titles == ["position along the severity direction (latent units)", "severity"]
        # the y axis is the severity: a marker's screen y is a decreasing linear function of its
        # severity (screen y grows downwards), so the i-th lowest marker on the page has the
        # i-th smallest severity, on one line
        data = map_data(document)
        ys = frame.evaluate(
            """() => Array.from(document.querySelectorAll('path.point')).map(p => {
                 const r = p.getBoundingClientRect(); return r.y + r.height / 2; })"""
        )
        drawn = sorted(v for v in data["layouts"]["spectrum"]["y"] if v is not None)
        assert len(ys) == len(drawn)
        lowest_first = sorted(ys, reverse=True)
        assert np.corrcoef(lowest_first, drawn)[0, 1] < -0.9999
        frame.select_option("#layout", "PCA")
        frame.wait_for_function(f"document.querySelectorAll('path.point').length === {N}")
        assert texts(frame, ".xtitle") == ["PC1 (40%)"]
    finally:
        page.close()


def test_search_click_neighbours_and_box_selection(browser, document):
    page, frame = open_in_iframe(browser, document, "srcdoc")
    try:
        drawn_ready(frame)
        frame.fill("#search", "img-0007")
        frame.wait_for_function(f"document.querySelectorAll('path.point').length === {N + 1}")
        assert "1 image(s) whose id contains" in frame.locator("#status").inner_text()
        assert "found: img-0007 (1)" in texts(frame, ".legend .legendtext")
        frame.fill("#search", "")
        frame.wait_for_function(f"document.querySelectorAll('path.point').length === {N}")

        # click a point: it and its K neighbours are listed, and ringed on the map
        box = frame.locator("path.point").first.bounding_box()
        page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        frame.locator("#neighbours figure").nth(K).wait_for(timeout=10_000)
        listed = frame.locator("#neighbours figcaption").all_inner_texts()
        assert len(listed) == K + 1
        first = int(listed[0].split("img-")[1])
        want = [f"img-{(first + j) % N:04d}" for j in range(K + 1)]
        assert [t.splitlines()[-1] for t in listed] == want
        assert drawn_points(frame) == N + K + 1

        # box-select the whole plot (Plotly's tool bar): every drawn image's id is listed
        frame.locator('[data-title="Box Select"]').click()
        area = frame.locator(".nsewdrag").first.bounding_box()
        page.mouse.move(area["x"] + 2, area["y"] + 2)
        page.mouse.down()
        page.mouse.move(area["x"] + area["width"] / 2, area["y"] + area["height"] / 2, steps=5)
        page.mouse.move(area["x"] + area["width"] - 2, area["y"] + area["height"] - 2, steps=5)
        page.mouse.up()
        frame.locator("#selection textarea").wait_for(timeout=10_000)
        ids = frame.locator("#selection textarea").input_value().split()
        assert sorted(ids) == sorted(map_data(document)["id"])
        assert frame.locator("#selection a").get_attribute("download") == "selected_ids.txt"
    finally:
        page.close()
