"""The interactive latent map: one self-contained HTML file built on Plotly.

It opens offline, on its own or inside MLflow's artifact viewer (a sandboxed iframe with
``sandbox="allow-scripts"``: no network, no storage, an opaque origin). Everything it needs is
inside the file:

- plotly.js, from the installed ``plotly`` package, gzip-compressed and base64-encoded (about
  1.9 MB instead of 4.8 MB), unpacked in the browser with the standard ``DecompressionStream``;
- the points once, as compact JSON columns: the 2-D coordinates of each layout (t-SNE, PCA,
  the spectrum axis...), the image id, every attribute the map can be coloured by (label,
  split, eye, source folder, ...) as category codes, and continuous columns (a latent
  dimension, a severity) as numbers; each point's nearest neighbours in the latent space;
- one small PNG thumbnail per point (at most ``THUMB_MAX`` px, ``THUMB_COLOURS`` colours).

A header names the run, latent size and key metrics, so two maps can be told apart. Drop-downs
switch the layout and recolour the points by any column (categories get a legend, numbers a
continuous colour scale; the browser rebuilds the traces from the columns, so the data is not
repeated). Hovering a point shows its thumbnail, label, split and image id; clicking it rings
its nearest neighbours in the latent space and lists them; the search box rings the images
whose id contains the text; a box or lasso selection (Plotly's tool bar) lists the selected
ids, to copy or download. Clicking a legend entry hides that group. If the browser cannot run
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

from pipeline.errors import UserError
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
    layouts: dict[str, tuple[np.ndarray, Sequence[str]]],
    title: str,
    path: Path,
    colour_by: Sequence[str] = ("label", "split"),
    header: Sequence[str] = (),
    neighbours: np.ndarray | None = None,
) -> int:
    """Interactive map: hovering a point shows its thumbnail, label, split and image id.

    Args:
        points: one row per point with columns label (name), split, image_id and every
            column named in ``colour_by``.
        images: (N,C,H,W) uint8, same row order.
        layouts: name -> ((N,2) coordinates, two axis titles), the first one drawn first; a
            point with NaN coordinates is not drawn in that layout.
        colour_by: the columns the colour drop-down offers, the first one drawn first. Float
            columns with two or more values are continuous (colour scale; NaN grey); other
            columns are categories (missing shown as ``UNKNOWN``), left out when they have a
            single value or more than ``MAX_CATEGORIES``.
        header: lines shown above the map (run, latent size, metrics).
        neighbours: (N,K) row indices of each point's nearest neighbours, or None.
    Writes one self-contained HTML file (see :mod:`pipeline.html_map`); returns its size in
    bytes.
    """
    data = points.reset_index(drop=True).copy()
    wanted = list(dict.fromkeys(colour_by))
    numeric = [c for c in wanted if c in data and is_continuous(data[c])]
    for col in wanted:
        if col in data and col != "label" and col not in numeric:
            data[col] = data[col].astype(object).where(data[col].notna(), UNKNOWN).astype(str)
    offered = [c for c in wanted if c in numeric or c in colour_columns(data, wanted)]
    palettes = {
        c: label_colours(data[c].tolist()) if c == "label" else category_colours(data[c])
        for c in offered
        if c not in numeric
    }
    thumbs = [thumbnail_uri(img) for img in images]
    payload = map_data(data, thumbs, offered, palettes, layouts, neighbours)
    payload["header"] = list(header)
    return write(path, payload, next(iter(layouts.values()))[1], title)


def is_continuous(values: pd.Series) -> bool:
    """Whether a column is shown on a continuous colour scale: floats, two or more values."""
    return pd.api.types.is_float_dtype(values) and values.nunique() >= 2


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


def numbers(values: np.ndarray, decimals: int = 4) -> list[float | None]:
    """Floats rounded for the page, NaN as null (JSON has no NaN)."""
    rounded = np.round(np.asarray(values, dtype=np.float64), decimals)
    return [None if not np.isfinite(v) else float(v) for v in rounded]


def map_data(
    points: pd.DataFrame,
    thumbs: Sequence[str],
    colour_by: Sequence[str],
    palettes: dict[str, dict[str, str]],
    layouts: dict[str, tuple[np.ndarray, Sequence[str]]],
    neighbours: np.ndarray | None = None,
) -> dict:
    """The JSON payload of the page: layouts, ids, thumbnails, colour columns, neighbours.

    A category column is ``{"kind": "category", "names": [...], "colours": [...], "codes":
    [...]}``: names in legend order, one colour each, the category index of every point; a
    continuous one (no palette) is ``{"kind": "number", "values": [...]}`` (null: missing).
    A layout is ``{"x": [...], "y": [...], "axes": [x title, y title]}`` (null: not drawn).
    """
    columns = {}
    for col in colour_by:
        if col not in palettes:
            columns[col] = {"kind": "number", "values": numbers(points[col], 4)}
            continue
        values = points[col].astype(str).to_numpy()
        names = list(palettes[col])
        index = {name: i for i, name in enumerate(names)}
        columns[col] = {
            "kind": "category",
            "names": names,
            "colours": [palettes[col][n] for n in names],
            "codes": [index[v] for v in values],
        }
    return {
        "layouts": {
            name: {"x": numbers(xy[:, 0]), "y": numbers(xy[:, 1]), "axes": list(axes)}
            for name, (xy, axes) in layouts.items()
        },
        "id": points["image_id"].astype(str).tolist(),
        "label": points["label"].astype(str).tolist(),
        "split": points["split"].astype(str).tolist(),
        "thumb": list(thumbs),
        "columns": columns,
        "neighbours": None if neighbours is None else np.asarray(neighbours).tolist(),
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
  html, body { margin: 0; padding: 0; height: 100%; font-family: system-ui, -apple-system,
    "Segoe UI", Roboto, Helvetica, Arial, sans-serif; font-size: 13px; color: #222;
    background: #fff; }
  body { display: flex; flex-direction: column; }
  #header { padding: 6px 10px 0; }
  #header div:first-child { font-weight: 600; font-size: 14px; }
  #header div { color: #333; }
  #bar { display: flex; gap: 12px; align-items: center; padding: 6px 10px; flex-wrap: wrap; }
  #status { color: #555; }
  #main { display: flex; flex: 1; min-height: 420px; }  /* the map takes what is left */
  #latent-map { flex: 1; min-width: 0; }
  #side { width: 220px; padding: 4px 8px; overflow-y: auto; display: none;
    border-left: 1px solid #ddd; }
  #side h4 { margin: 6px 0 4px; font-size: 12px; }
  #neighbours figure { margin: 0 0 6px; display: flex; gap: 6px; align-items: center; }
  #neighbours img { width: 48px; image-rendering: pixelated; }
  #neighbours figcaption { font-size: 11px; overflow-wrap: anywhere; }
  #selection textarea { width: 100%; height: 140px; font-size: 11px; box-sizing: border-box; }
  #thumb { position: fixed; display: none; pointer-events: none; z-index: 10;
    background: #fff; border: 1px solid #999; padding: 4px; box-shadow: 0 1px 6px #0004; }
  #thumb img { width: 128px; height: auto; image-rendering: pixelated; display: block; }
  #thumb div { max-width: 160px; font-size: 11px; overflow-wrap: anywhere; }
</style>
</head>
<body>
<div id="header"></div>
<div id="bar">
  <label>Layout <select id="layout"></select></label>
  <label>Colour by <select id="colour-by"></select></label>
  <label>Find id <input id="search" type="search" size="18" placeholder="image id"></label>
  <span id="status">Loading the map&hellip;</span>
</div>
<div id="main">
  <div id="latent-map"></div>
  <div id="side">
    <div id="neighbours"></div>
    <div id="selection"></div>
  </div>
</div>
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
  function option(select, value) {
    var opt = document.createElement("option");
    opt.value = value; opt.textContent = value; select.appendChild(opt);
  }
  function placed(lay, rows) {  // the rows this layout can draw (coordinates known)
    return rows.filter(function (i) { return lay.x[i] !== null && lay.y[i] !== null; });
  }
  function trace(lay, rows, name, marker) {
    return {
      type: "scatter", mode: "markers", name: name,
      x: rows.map(function (i) { return lay.x[i]; }),
      y: rows.map(function (i) { return lay.y[i]; }),
      customdata: rows,
      hoverinfo: "none",  // the page's own tooltip (thumbnail + caption) shows the point
      marker: marker,
    };
  }
  function traces(data, lay, col) {
    var c = data.columns[col], all = placed(lay, data.id.map(function (_, i) { return i; }));
    if (c.kind === "number") {
      var known = all.filter(function (i) { return c.values[i] !== null; }),
        missing = all.filter(function (i) { return c.values[i] === null; });
      var out = [trace(lay, known, esc(col) + " (" + known.length + ")", {
        color: known.map(function (i) { return c.values[i]; }), colorscale: "Viridis",
        showscale: true, colorbar: { title: { text: esc(col) }, thickness: 14 },
        size: 7, opacity: 0.8 })];
      if (missing.length) {
        out.push(trace(lay, missing, "(missing) (" + missing.length + ")",
          { color: "#b0b0b0", size: 6, opacity: 0.6 }));
      }
      return out;
    }
    var groups = c.names.map(function () { return []; });
    all.forEach(function (i) { groups[c.codes[i]].push(i); });
    return groups.map(function (rows, k) {
      return trace(lay, rows, esc(c.names[k]) + " (" + rows.length + ")",
        { color: c.colours[k], size: 7, opacity: 0.75 });
    }).filter(function (t) { return t.customdata.length > 0; });
  }
  function header(lines) {
    var div = document.getElementById("header");
    lines.forEach(function (line) {
      var d = document.createElement("div"); d.textContent = line; div.appendChild(d);
    });
  }
  async function main() {
    var data = JSON.parse(document.getElementById("map-data").textContent);
    var layout = JSON.parse(document.getElementById("map-layout").textContent);
    header(data.header || []);
    var select = document.getElementById("colour-by"), pick = document.getElementById("layout");
    Object.keys(data.columns).forEach(function (col) { option(select, col); });
    Object.keys(data.layouts).forEach(function (name) { option(pick, name); });
    await loadPlotly();
    var div = document.getElementById("latent-map"), side = document.getElementById("side");
    var config = { responsive: true, displaylogo: false, scrollZoom: true };
    var ringed = [], ringName = "";  // points ringed by a search or a click
    function draw() {
      var lay = data.layouts[pick.value], ts = traces(data, lay, select.value);
      var numeric = data.columns[select.value].kind === "number";
      layout.legend.title.text = numeric ? "" : esc(select.value);
      // a colour scale takes the right margin: its legend (known / missing) goes on top
      layout.legend.orientation = numeric ? "h" : "v";
      layout.legend.x = numeric ? 0 : 1.02;
      layout.legend.y = numeric ? 1.0 : 1;
      layout.legend.yanchor = numeric ? "bottom" : "top";
      layout.xaxis.title.text = esc(lay.axes[0]);
      layout.yaxis.title.text = esc(lay.axes[1]);
      var rows = placed(lay, ringed);
      if (rows.length) {
        ts.push(trace(lay, rows, esc(ringName), { color: "rgba(0,0,0,0)", size: 15,
          line: { color: "#d62728", width: 2.5 }, symbol: "circle-open" }));
      }
      return Plotly.react(div, ts, layout, config);
    }
    function ring(rows, name) { ringed = rows; ringName = name; return draw(); }
    await draw();
    select.addEventListener("change", draw);
    pick.addEventListener("change", function () {
      layout.xaxis.autorange = true; layout.yaxis.autorange = true; draw();
    });
    var search = document.getElementById("search");
    search.addEventListener("input", function () {
      var q = search.value.trim().toLowerCase();
      if (!q) { ring([], ""); status.textContent = ""; return; }
      var hits = [];
      data.id.forEach(function (id, i) { if (id.toLowerCase().indexOf(q) >= 0) hits.push(i); });
      ring(hits, "found: " + q + " (" + hits.length + ")");
      status.textContent = hits.length + " image(s) whose id contains " + JSON.stringify(q) +
        (hits.length === 1 ? ": " + data.id[hits[0]] + " (" + data.label[hits[0]] + ")" : "");
    });
    function show(i) {
      var nn = data.neighbours ? data.neighbours[i] : [];
      var box = document.getElementById("neighbours");
      box.innerHTML = "<h4>" + esc(data.id[i]) + " and its " + nn.length +
        " nearest neighbours in the latent space</h4>";
      [i].concat(nn).forEach(function (j) {
        var fig = document.createElement("figure"), img = document.createElement("img"),
          cap = document.createElement("figcaption");
        img.src = data.thumb[j]; img.alt = "";
        cap.innerHTML = "<b>" + esc(data.label[j]) + "</b> · " + esc(data.split[j]) + "<br>" +
          esc(data.id[j]);
        fig.appendChild(img); fig.appendChild(cap); box.appendChild(fig);
      });
      side.style.display = "block";
      ring([i].concat(nn), "neighbours of " + data.id[i]);
    }
    div.on("plotly_click", function (ev) {
      if (ev && ev.points && ev.points.length) show(ev.points[0].customdata);
    });
    div.on("plotly_selected", function (ev) {
      if (!ev || !ev.points) return;
      var seen = {}, ids = [];
      ev.points.forEach(function (pt) {
        var i = pt.customdata;
        if (!seen[i]) { seen[i] = true; ids.push(data.id[i]); }
      });
      var box = document.getElementById("selection"), text = ids.join("\\n") + "\\n";
      box.innerHTML = "<h4>" + ids.length + " image(s) selected</h4>";
      var area = document.createElement("textarea");
      area.readOnly = true; area.value = text; box.appendChild(area);
      var link = document.createElement("a");
      link.textContent = "download the ids"; link.download = "selected_ids.txt";
      link.href = URL.createObjectURL(new Blob([text], { type: "text/plain" }));
      box.appendChild(link);
      side.style.display = "block";
    });
    var tip = document.getElementById("thumb"), img = tip.querySelector("img"),
      caption = tip.querySelector("div");
    div.on("plotly_hover", function (ev) {
      var pt = ev.points[0], i = pt.customdata;
      img.src = data.thumb[i];
      var col = select.value, c = data.columns[col], line = "<b>" + esc(data.label[i]) +
        "</b> · " + esc(data.split[i]) + "<br>" + esc(data.id[i]);
      if (col !== "label" && col !== "split") {
        var value = c.kind === "number" ? c.values[i] : c.names[c.codes[i]];
        line += "<br>" + esc(col) + ": " + esc(value === null ? "(missing)" : value);
      }
      caption.innerHTML = line;
      var e = ev.event || {}, x = (e.clientX || 0) + 16, y = (e.clientY || 0) + 16;
      tip.style.display = "block";
      if (x + tip.offsetWidth > window.innerWidth) x = Math.max(0, x - tip.offsetWidth - 32);
      if (y + tip.offsetHeight > window.innerHeight) y = Math.max(0, y - tip.offsetHeight - 32);
      tip.style.left = x + "px"; tip.style.top = y + "px";
    });
    div.on("plotly_unhover", function () { tip.style.display = "none"; });
    status.textContent = data.id.length + " images; hover a point for its image, click it " +
      "for its nearest neighbours, lasso a group for its ids, scroll to zoom.";
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


def write(path: Path, payload: dict, axes: Sequence[str], title: str) -> int:
    """Write the page holding ``payload`` (:func:`map_data`) to ``path``; return its size."""
    text = render(payload, layout(title, axes), title)
    path.write_text(text, encoding="utf-8")
    return len(text.encode("utf-8"))


def read_payload(path: Path) -> dict:
    """The JSON payload of a map written by :func:`latent_map` (to add points to it)."""
    text = path.read_text(encoding="utf-8")
    tag = '<script type="application/json" id="map-data">'
    start = text.find(tag)
    if start < 0:
        raise UserError(f"{path}: not a latent map written by retina-vae evaluate")
    start += len(tag)
    return json.loads(text[start : text.index("</script>", start)])
