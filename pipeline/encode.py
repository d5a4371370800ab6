"""``retina-vae encode``: latent means of new images with a trained model.

    retina-vae encode --model models/vae.pt [--params params.yaml] [--out latents.csv] PATH...

PATHs are image files or folders (searched recursively, skipping the sidecars ingest skips) in
any format ingest accepts: JPEG, PNG, TIFF, BMP, DICOM (multi-frame too) and MedMNIST-style
``.npz`` files. Each image is preprocessed exactly as for training: ``ingest.modality``,
``preprocess.oct_aspect`` and ``preprocess.illumination`` are the ones the checkpoint records
(train writes them; where the params say otherwise, one line says so and the model's are used;
a checkpoint from before that record takes the params' own, with a note), and the size is the
model's. The params choose which frames of a volume to encode (``ingest.oct_frames``). Writes
one row per image or frame: ``path, frame, mu_0..mu_{J-1}, sigma_0..sigma_{J-1}`` (CSV, or
parquet by suffix).

``--map DIR`` (an evaluation folder, e.g. ``reports/evaluation``) places the new images on that
evaluation's maps and adds ``PCA_x, PCA_y`` (exactly: the same PCA of the train latent means,
reapplied), ``t-SNE_x, t-SNE_y`` (t-SNE has no transform for new points: each new image is put
at the inverse-distance-weighted mean position of its ``evaluate.knn_k`` nearest drawn images
in the latent space, so it lands among the images it resembles, not where a rerun of t-SNE
would put it), ``spectrum_position`` and the fitted severity (when the evaluation has a
spectrum axis), and ``predicted_label, predicted_probability`` (the evaluation's linear probe on
mu). ``--html OUT.html`` also writes the evaluation's interactive map with the new images added
(split ``new``, ids ``new-0000``..., their neighbours listed on a click).
``frame`` is the index among the frames kept (the frame number with ``oct_frames: all``; the
row of an ``.npz`` array, whose path is written ``file.npz:test_images``). Files that cannot be
read are listed one per line; the good ones are still written, and the command then exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.neighbors import NearestNeighbors

from pipeline import html_map
from pipeline.errors import UserError
from pipeline.html_map import UNKNOWN
from pipeline.io import write_table
from pipeline.latent import LAYOUT_FILE, MAP_POINTS, PROBE_FILE, probe_predict
from pipeline.manifest import NOT_UTF8, hidden, is_candidate, is_utf8
from pipeline.model_io import encode_images, load_model
from pipeline.params import Params
from pipeline.pixels import prepare_file, prepare_npz_row
from pipeline.processed import CHANNELS, PREPROCESSING, preprocessing
from pipeline.stage import run_stage

log = logging.getLogger("retina_vae.encode")

OUT_SUFFIXES = (".csv", ".tsv", ".parquet")


def expand(paths: list[str]) -> list[Path]:
    """Files named, plus every candidate file under the folders named (sorted, recursive)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and is_candidate(p.relative_to(path))
            )
            if not found:
                log.warning("%s: no image files in this folder", hidden(path))
            files += found
        else:
            files.append(path)  # a missing file is reported when read, with the others
    return files


def npz_frames(
    path: Path, modality: str, size: tuple[int, int], oct_aspect: str, illumination: str = "none"
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Every row of each ``*_images`` array of a MedMNIST-style .npz -> (name, row, (C,H,W)),
    prepared exactly as preprocess prepares an .npz row (same aspect rule and illumination)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"not a readable .npz file ({type(exc).__name__})") from None
    with data:
        keys = [k for k in data.files if k.endswith("_images")]
        if not keys:
            raise UserError("no *_images arrays in this .npz")
        for key in keys:
            arr = data[key]
            if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
                raise UserError(f"{key} must be uint8 (N, H, W[, C]), got {arr.dtype} {arr.shape}")
            for i in range(len(arr)):
                yield (
                    f"{path}:{key}",
                    i,
                    prepare_npz_row(arr[i], modality, size, oct_aspect, illumination),
                )


def frames(path: Path, params: Params, size: tuple[int, int]) -> list[tuple[str, int, np.ndarray]]:
    """All (path, frame, (C,H,W) uint8) of one input file, preprocessed; UserError if unusable."""
    if not path.exists():
        raise UserError("file not found")
    modality = params.ingest.modality
    if path.suffix.lower() == ".npz":
        pp = params.preprocess
        return list(npz_frames(path, modality, size, pp.oct_aspect, pp.illumination))
    arrays = prepare_file(
        path,
        modality,
        size,
        params.preprocess.oct_aspect,
        params.ingest.oct_frames,
        min_size=params.ingest.min_size,
        max_pixels=params.ingest.max_pixels,
        illumination=params.preprocess.illumination,
        allow_burned_in=params.ingest.allow_burned_in_annotation,
    )
    return [(str(path), i, arr) for i, arr in enumerate(arrays)]


def encode(
    params: Params,
    model_path: str,
    inputs: list[str],
    out: Path,
    evaluation: Path | None = None,
    html: Path | None = None,
) -> tuple[int, list[str]]:
    """Encode every input; write ``out`` (and, with an ``evaluation`` folder, the placement
    on its maps, and the map ``html``); return (rows written, one-line failures)."""
    if out.suffix not in OUT_SUFFIXES:
        raise UserError(f"{out}: output must end in {', '.join(OUT_SUFFIXES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, extra = load_model(model_path, device)
    params = as_trained(params, extra, model_path)
    cfg = model.config
    modality = params.ingest.modality
    if CHANNELS[modality] != cfg.in_channels:
        raise UserError(
            f"ingest.modality: {modality} images have {CHANNELS[modality]} channel(s) but "
            f"{model_path} was trained on {cfg.in_channels}"
        )
    rows, images, failures = read_inputs(params, inputs, (cfg.height, cfg.width))
    pixels = np.stack(images)  # (N,C,H,W) uint8
    mu, logvar = encode_images(model, pixels, params.evaluate.batch_size, device)  # (N,J)
    sigma = np.exp(0.5 * logvar)  # (N,J) posterior standard deviation
    table = pd.DataFrame(rows, columns=["path", "frame"])
    latent_cols = {f"mu_{j}": mu[:, j] for j in range(cfg.latent_dim)}
    latent_cols.update({f"sigma_{j}": sigma[:, j] for j in range(cfg.latent_dim)})
    table = pd.concat([table, pd.DataFrame(latent_cols)], axis=1)
    if evaluation is not None:
        placed, neighbours = place(mu, evaluation, params.evaluate.knn_k)
        table = pd.concat([table, placed], axis=1)
        if html is not None:
            add_to_map(evaluation, html, table, pixels, neighbours)
    write_table(out, table)
    return len(table), failures


def as_trained(params: Params, extra: dict, model_path: str) -> Params:
    """``params`` with the preprocessing the model's checkpoint records (``extra``, written by
    train), and one log line for each key the params set otherwise. A checkpoint without the
    record (trained before it was kept) leaves ``params`` as they are, with a note."""
    recorded = {key: extra[key] for key in PREPROCESSING if key in extra}
    if not recorded:
        log.warning(
            "%s does not record its preprocessing (trained before checkpoints kept it): "
            "preparing images with the params' %s",
            model_path,
            ", ".join(PREPROCESSING),
        )
        return params
    for key, value in preprocessing(params.flat()).items():
        if key in recorded and recorded[key] != value:
            log.warning(
                "%s: the model was trained with %s; params say %s: using the model's",
                key,
                recorded[key],
                value,
            )
    groups: dict[str, dict[str, str]] = {}
    for key, value in recorded.items():  # "preprocess.illumination" -> preprocess, illumination
        group, name = key.split(".")
        groups.setdefault(group, {})[name] = value
    return replace(params, **{g: replace(getattr(params, g), **kv) for g, kv in groups.items()})


def read_inputs(
    params: Params, inputs: list[str], size: tuple[int, int]
) -> tuple[list[tuple[str, int]], list[np.ndarray], list[str]]:
    """(path, frame) rows, their (C,H,W) uint8 images and one-line failures, for every input;
    UserError when nothing could be read."""
    rows: list[tuple[str, int]] = []
    images: list[np.ndarray] = []
    failures: list[str] = []
    files = expand(inputs)
    for path in files:
        try:
            if not is_utf8(str(path)):  # no output can hold its path; no log shows it
                raise UserError(NOT_UTF8)
            found = frames(path, params, size)
        except UserError as exc:
            failures.append(f"{hidden(path)}: {exc}")
            log.error("%s: %s", hidden(path), exc)
            continue
        rows += [(name, frame) for name, frame, _ in found]
        images += [arr for _, _, arr in found]
    if not images:
        raise UserError(
            f"no image could be encoded from {len(files)} file(s) "
            f"({', '.join(map(hidden, inputs))})"
        )
    return rows, images, failures


def place(mu: np.ndarray, evaluation: Path, k: int) -> tuple[pd.DataFrame, np.ndarray]:
    """New latent means (N,J) on the maps of an ``evaluation`` folder.

    Returns one row per image (``PCA_x``, ``PCA_y``; ``<layout>_x``, ``_y`` of the other 2-D
    layouts by neighbour interpolation; spectrum and probe columns when the evaluation has
    them) and the (N,k) rows of ``maps/map_points.parquet`` nearest each image in mu.
    """
    layout_path = evaluation / LAYOUT_FILE
    if not layout_path.is_file():
        raise UserError(f"{layout_path}: not found (run `retina-vae evaluate` first)")
    layout = json.loads(layout_path.read_text())
    points = pd.read_parquet(evaluation / MAP_POINTS)
    embeddings = pd.read_parquet(evaluation / "embeddings.parquet").set_index("image_id")
    drawn = embeddings.loc[points["image_id"]].filter(regex=r"^mu_\d+$").to_numpy()  # (M,J)
    if drawn.shape[1] != mu.shape[1]:
        raise UserError(
            f"{evaluation}: its maps are of a {drawn.shape[1]}-d latent space but the model "
            f"gives {mu.shape[1]}-d means (evaluate this model first)"
        )
    out = pd.DataFrame(index=range(len(mu)))
    xy = (mu - np.asarray(layout["pca_mean"])) @ np.asarray(layout["pca_components"]).T  # (N,2)
    out["PCA_x"], out["PCA_y"] = xy[:, 0], xy[:, 1]
    dist, nearest = NearestNeighbors(n_neighbors=min(k, len(drawn))).fit(drawn).kneighbors(mu)
    weight = 1.0 / np.maximum(dist, 1e-12)  # (N,k): an exact match takes that point's place
    weight /= weight.sum(1, keepdims=True)
    for name in layout["axes"]:
        if name not in ("PCA", "spectrum"):
            for axis in ("x", "y"):
                coords = points[f"{name}_{axis}"].to_numpy()[nearest]  # (N,k)
                out[f"{name}_{axis}"] = (weight * coords).sum(1)
    if "spectrum" in layout:
        sp = layout["spectrum"]
        out["spectrum_position"] = mu @ np.asarray(sp["direction"])
        out[f"{sp['name']}_fitted"] = sp["slope"] * out["spectrum_position"] + sp["intercept"]
    if (evaluation / PROBE_FILE).is_file():
        probe = json.loads((evaluation / PROBE_FILE).read_text())
        out["predicted_label"], out["predicted_probability"] = probe_predict(probe, mu)
    return out, nearest


def add_to_map(
    evaluation: Path, html: Path, table: pd.DataFrame, images: np.ndarray, neighbours: np.ndarray
) -> None:
    """The evaluation's latent map with the new images (``table`` from :func:`encode`,
    (N,C,H,W) uint8 ``images``) added as split ``new``, written to ``html``."""
    payload = html_map.read_payload(evaluation / "latent_map.html")
    n = len(table)
    predicted = table.get("predicted_label", pd.Series(["?"] * n)).astype(str)
    labels = [f"new (predicted {p})" for p in predicted]
    payload["id"] += [f"new-{i:04d}" for i in range(n)]
    payload["label"] += labels
    payload["split"] += ["new"] * n
    payload["thumb"] += [html_map.thumbnail_uri(img) for img in images]
    if payload.get("neighbours") is not None:
        payload["neighbours"] += neighbours.tolist()
    for name, lay in payload["layouts"].items():
        x = table.get("spectrum_position") if name == "spectrum" else table.get(f"{name}_x")
        y = None if name == "spectrum" else table.get(f"{name}_y")  # no target for new images
        lay["x"] += html_map.numbers(x) if x is not None else [None] * n
        lay["y"] += html_map.numbers(y) if y is not None else [None] * n
    for col, c in payload["columns"].items():
        if c["kind"] == "number":
            c["values"] += html_map.numbers(table[col]) if col in table else [None] * n
            continue
        values = labels if col == "label" else ["new"] * n if col == "split" else [UNKNOWN] * n
        for value in dict.fromkeys(values):
            if value not in c["names"]:
                c["names"].append(value)
                c["colours"].append("#000000" if value != UNKNOWN else "#b0b0b0")
        c["codes"] += [c["names"].index(v) for v in values]
    payload["header"] = payload.get("header", []) + [
        f"+ {n} new images placed by retina-vae encode (split 'new'; PCA exact, other "
        "layouts at the mean position of their nearest drawn images in the latent space)"
    ]
    first = next(iter(payload["layouts"].values()))
    html_map.write(html, payload, first["axes"], "Latent means with new images")
    log.info("wrote the map with %d new images to %s", n, html)


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--model", help="trained checkpoint (default: paths.model)")
    parser.add_argument(
        "--out", default="latents.csv", help="output .csv/.tsv/.parquet (default: latents.csv)"
    )
    parser.add_argument(
        "--map",
        metavar="DIR",
        help="an evaluation folder (e.g. reports/evaluation): place the images on its maps",
    )
    parser.add_argument(
        "--html", metavar="OUT.html", help="with --map: also write its map with the new images"
    )


def _body(params: Params, args: argparse.Namespace) -> None:
    out = Path(args.out)
    if args.html and not args.map:
        raise UserError("--html needs --map (the evaluation folder whose map to add to)")
    evaluation = Path(args.map) if args.map else None
    html = Path(args.html) if args.html else None
    model = args.model or params.paths.model
    written, failures = encode(params, model, args.paths, out, evaluation, html)
    log.info("wrote %d latent rows to %s", written, out)
    if failures:
        raise UserError(
            f"{len(failures)} file(s) could not be encoded (listed above); the rest are in {out}"
        )


def main(argv: list[str] | None = None) -> int:
    return run_stage("encode", argv, _body, _add_args, description=__doc__.splitlines()[0])
