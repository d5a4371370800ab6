"""The interactive latent map: one self-contained HTML file built on Plotly.

It opens offline, on its own or inside MLflow's artifact viewer (a sandboxed iframe with
``sandbox="allow-scripts"``: no network, no storage, an opaque origin). Everything it needs is
inside the file:

- plotly.js, from the installed ``plotly`` package, gzip-compressed and base64-encoded (about
  1.9 MB instead of 4.8 MB), unpacked in the browser with the standard ``DecompressionStream``;
- the points once, as compact JSON columns: 2-D coordinates, the image id, and every
  attribute the map can be coloured by (label, split, eye, source folder, ...) as category
  codes;
- one small PNG thumbnail per point (at most ``THUMB_MAX`` px, ``THUMB_COLOURS`` colours).

A drop-down recolours the points by any attribute (the browser rebuilds the traces from the
columns, so the data is not repeated per attribute); hovering a point shows its thumbnail, its
label, split and image id; clicking a legend entry hides that group. If the browser cannot run
the map, the page says so in words instead of staying blank. Entry point: :func:`latent_map`.
"""

from __future__ import annotations

import base64
import functools
import gzip
import html
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.figures import UNLABELLED, label_colours

PLOT_ID = "latent-map"
MAX_CATEGORIES = 40  # an attribute with more distinct values than this is not offered as colour
THUMB_MAX = 48  # hover thumbnails larger than this (pixels) are shrunk to keep the HTML small
THUMB_COLOURS = 32  # ... and drawn with at most this many colours (palette PNG) ...
THUMB_GREYS = 16  # ... or grey levels (plenty for a hover preview of an OCT scan)
UNKNOWN = "(unknown)"  # a missing attribute value on the HTML map


def latent_map(
    points: pd.DataFrame,
    images: np.ndarray,
    axes: list[str],
    title: str,
    path: Path,
    colour_by: Sequence[str] = ("label", "split"),
) -> int:
    """Interactive map: hovering a point shows its thumbnail, label, split and image id.

    Args:
        points: one row per point with columns x, y, label (name), split, image_id and every
            attribute named in ``colour_by`` (missing values are shown as ``UNKNOWN``).
        images: (N,C,H,W) uint8, same row order.
        colour_by: the attributes the map's drop-down offers, the first one drawn first;
            attributes with a single value or more than ``MAX_CATEGORIES`` are left out.
    Writes one self-contained HTML file (see :mod:`pipeline.html_map`); returns its size in
    bytes. Clicking a legend entry hides that group.
    """
    data = points.reset_index(drop=True).copy()
    for col in colour_by:
        if col in data and col != "label":
            data[col] = data[col].astype(object).where(data[col].notna(), UNKNOWN).astype(str)
    offered = colour_columns(data, list(dict.fromkeys(colour_by)))
    palettes = {
        c: label_colours(data[c].tolist()) if c == "label" else category_colours(data[c])
        for c in offered
    }
    thumbs = [thumbnail_uri(img) for img in images]
    return write(path, data, thumbs, axes, title, offered, palettes)


def thumbnail_uri(image: np.ndarray) -> str:
    """(C,H,W) uint8 image -> ``data:image/png;base64,...`` for an HTML ``<img src>``.

    Shrunk to at most ``THUMB_MAX`` px and ``THUMB_COLOURS`` colours (``THUMB_GREYS`` grey
    levels) as a palette PNG: about 1.2 KB of base64 for a 64 px OCT scan. An image that
    already fits both limits round-trips exactly.
    """
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)  # (C,H,W) -> (H,W[,C])
    pic = Image.fromarray(np.ascontiguousarray(pixels))
    if max(pic.size) > THUMB_MAX:
        pic.thumbnail((THUMB_MAX, THUMB_MAX), Image.Resampling.LANCZOS)
    colours = THUMB_GREYS if pic.mode == "L" else THUMB_COLOURS
    if pic.getcolors(colours) is None:  # more colours than the palette holds
        pic = pic.quantize(colours, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    pic.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def category_colours(values: pd.Series) -> dict[str, str]:
    """Legend order and colour of an attribute's values (as ``label_colours``; missing grey)."""
    names = values.astype(object).where(values.notna(), UNKNOWN).astype(str)
    colours = label_colours(names.tolist())
    colours.pop(UNLABELLED, None)
    if UNKNOWN in colours or (names == UNKNOWN).any():
        colours.pop(UNKNOWN, None)
        colours[UNKNOWN] = "#b0b0b0"  # last in the legend, grey
    return colours


@functools.lru_cache(maxsize=1)
def plotly_js_gzip_b64() -> str:
    """plotly.js of the installed plotly package, gzip (mtime 0: reproducible) then base64."""
    from plotly.offline import get_plotlyjs

    packed = gzip.compress(get_plotlyjs().encode("utf-8"), compresslevel=9, mtime=0)
    return base64.b64encode(packed).decode("ascii")


def _script_json(value: object) -> str:
    """JSON safe to embed in a <script> element (no ``</script>`` or ``<!--`` inside)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def colour_columns(points: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """The columns the map can be coloured by: present, with 2..MAX_CATEGORIES values (the
    label always, whatever its count)."""
    return [
        c
        for c in columns
        if c in points and (c == "label" or 2 <= points[c].nunique(dropna=False) <= MAX_CATEGORIES)
    ]


def map_data(
    points: pd.DataFrame,
    thumbs: Sequence[str],
    colour_by: Sequence[str],
    palettes: dict[str, dict[str, str]],
) -> dict:
    """The JSON payload of the page: coordinates, ids, thumbnails and the colour columns.

    Each colour column is ``{"names": [...], "colours": [...], "codes": [...]}``: category
    names (in legend order), one colour each, and the category index of every point.
    """
    columns = {}
    for col in colour_by:
        values = points[col].astype(str).to_numpy()
        names = list(palettes[col])
        index = {name: i for i, name in enumerate(names)}
        columns[col] = {
            "names": names,
            "colours": [palettes[col][n] for n in names],
            "codes": [index[v] for v in values],
        }
    return {
        "x": [float(v) for v in np.round(points["x"].to_numpy(np.float64), 4)],
        "y": [float(v) for v in np.round(points["y"].to_numpy(np.float64), 4)],
        "id": points["image_id"].astype(str).tolist(),
        "label": points["label"].astype(str).tolist(),
        "split": points["split"].astype(str).tolist(),
        "thumb": list(thumbs),
        "columns": columns,
    }


def layout(title: str, axes: Sequence[str]) -> dict:
    """The Plotly layout (built with plotly's own validated objects), as plain JSON."""
    import plotly.graph_objects as go

    fig = go.Figure(
        layout=go.Layout(
            title={"text": html.escape(title), "x": 0.01, "font": {"size": 15}},
            template="simple_white",
            xaxis={"title": {"text": html.escape(axes[0])}, "zeroline": False},
            yaxis={"title": {"text": html.escape(axes[1])}, "zeroline": False},
            hovermode="closest",
            legend={"itemsizing": "constant", "title": {"text": ""}},
            margin={"l": 60, "r": 20, "t": 50, "b": 55},
            autosize=True,
        )
    )
    return fig.to_plotly_json()["layout"]


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  html, body { margin: 0; padding: 0; font-family: system-ui, -apple-system, "Segoe UI",
    Roboto, Helvetica, Arial, sans-serif; font-size: 13px; color: #222; background: #fff; }
  #bar { display: flex; gap: 12px; align-items: center; padding: 6px 10px; flex-wrap: wrap; }
  #status { color: #555; }
  #latent-map { width: 100%; height: calc(100vh - 44px); min-height: 420px; }
  #thumb { position: fixed; display: none; pointer-events: none; z-index: 10;
    background: #fff; border: 1px solid #999; padding: 4px; box-shadow: 0 1px 6px #0004; }
  #thumb img { width: 128px; height: auto; image-rendering: pixelated; display: block; }
  #thumb div { max-width: 160px; font-size: 11px; overflow-wrap: anywhere; }
</style>
</head>
<body>
<div id="bar">
  <label>Colour by <select id="colour-by"></select></label>
  <span id="status">Loading the map&hellip;</span>
</div>
<div id="latent-map"></div>
<div id="thumb"><img alt=""><div></div></div>
<script type="application/json" id="map-data">__DATA__</script>
<script type="application/json" id="map-layout">__LAYOUT__</script>
<script type="application/octet-stream" id="plotly-js-gzip">__PLOTLY__</script>
<script>
(function () {
  "use strict";
  var status = document.getElementById("status");
  function fail(why) {
    status.textContent = "The interactive map cannot be shown here: " + why +
      ". Download the file and open it in a recent browser.";
    status.style.color = "#b00";
  }
  function esc(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }
  async function loadPlotly() {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser has no DecompressionStream");
    }
    var b64 = document.getElementById("plotly-js-gzip").textContent.trim();
    var bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (var i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    var source = await new Response(stream).text();
    var script = document.createElement("script");
    script.textContent = source;
    document.head.appendChild(script);
    if (typeof Plotly === "undefined") throw new Error("plotly.js did not load");
  }
  function traces(data, col) {
    var c = data.columns[col], groups = c.names.map(function () { return []; });
    c.codes.forEach(function (k, i) { groups[k].push(i); });
    return groups.map(function (rows, k) {
      return {
        type: "scatter", mode: "markers", name: esc(c.names[k]) + " (" + rows.length + ")",
        x: rows.map(function (i) { return data.x[i]; }),
        y: rows.map(function (i) { return data.y[i]; }),
        customdata: rows,
        hoverinfo: "none",  // the page's own tooltip (thumbnail + caption) shows the point
        marker: { color: c.colours[k], size: 7, opacity: 0.75 },
      };
    }).filter(function (t) { return t.customdata.length > 0; });
  }
  async function main() {
    var data = JSON.parse(document.getElementById("map-data").textContent);
    var layout = JSON.parse(document.getElementById("map-layout").textContent);
    var select = document.getElementById("colour-by");
    Object.keys(data.columns).forEach(function (col) {
      var opt = document.createElement("option");
      opt.value = col; opt.textContent = col; select.appendChild(opt);
    });
    await loadPlotly();
    var div = document.getElementById("latent-map");
    var config = { responsive: true, displaylogo: false, scrollZoom: true };
    function draw() {
      layout.legend.title.text = esc(select.value);
      return Plotly.react(div, traces(data, select.value), layout, config);
    }
    await draw();
    select.addEventListener("change", draw);
    var tip = document.getElementById("thumb"), img = tip.querySelector("img"),
      caption = tip.querySelector("div");
    div.on("plotly_hover", function (ev) {
      var pt = ev.points[0], i = pt.customdata;
      img.src = data.thumb[i];
      var col = select.value, c = data.columns[col], line = "<b>" + esc(data.label[i]) +
        "</b> · " + esc(data.split[i]) + "<br>" + esc(data.id[i]);
      if (col !== "label" && col !== "split") {
        line += "<br>" + esc(col) + ": " + esc(c.names[c.codes[i]]);
      }
      caption.innerHTML = line;
      var e = ev.event || {}, x = (e.clientX || 0) + 16, y = (e.clientY || 0) + 16;
      tip.style.display = "block";
      if (x + tip.offsetWidth > window.innerWidth) x = Math.max(0, x - tip.offsetWidth - 32);
      if (y + tip.offsetHeight > window.innerHeight) y = Math.max(0, y - tip.offsetHeight - 32);
      tip.style.left = x + "px"; tip.style.top = y + "px";
    });
    div.on("plotly_unhover", function () { tip.style.display = "none"; });
    status.textContent = data.x.length + " images; hover a point for its image, " +
      "click a legend entry to hide a group, scroll to zoom.";
  }
  main().catch(function (err) { fail(err && err.message ? err.message : String(err)); });
})();
</script>
</body>
</html>
"""


def render(data: dict, layout_json: dict, title: str) -> str:
    """The whole page as a string."""
    parts = {
        "__TITLE__": html.escape(title),
        "__DATA__": _script_json(data),
        "__LAYOUT__": _script_json(layout_json),
        "__PLOTLY__": plotly_js_gzip_b64(),
    }
    # one pass: a placeholder-like string inside the data is never substituted again
    return re.sub("|".join(parts), lambda m: parts[m.group(0)], PAGE)


def write(
    path: Path,
    points: pd.DataFrame,
    thumbs: Sequence[str],
    axes: Sequence[str],
    title: str,
    colour_by: Sequence[str],
    palettes: dict[str, dict[str, str]],
) -> int:
    """Write the page to ``path``; return its size in bytes."""
    text = render(map_data(points, thumbs, colour_by, palettes), layout(title, axes), title)
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))
