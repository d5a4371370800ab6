"""``retina-vae preprocess``: crop, resize and subject-split the manifest into uint8 arrays.

Pixels are re-read from the source files listed in ``paths.manifest`` (relative to
:func:`pipeline.ingest.source_root`), JPEGs at the smallest DCT scale that still covers
``preprocess.image_size`` (Pillow ``draft``), over a pool of ``preprocess.workers`` processes.

- fundus: cropped to the circular field of view (dark border thresholded away), padded to the
  target aspect (square for a square size), resized; RGB, 3 channels;
- OCT: grayscale, padded or cropped to the target aspect (``preprocess.oct_aspect``), resized;
  1 channel.
- rows of an .npz source (MedMNIST) are already cropped and square: only resized.

Split by subject, stratified by each subject's majority label, seeded: a subject's images all
land in one split. A manifest ``split`` (from a labels CSV or an .npz) overrides per subject.
Writes ``paths.processed/{split}_images.npy`` (N, C, H, W) uint8 and ``{split}.parquet`` in the
same row order, and ``paths.preprocess_report``. Same inputs and params -> byte-identical files.
"""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import readers
from pipeline.errors import UserError
from pipeline.ingest import SPLITS, source_root
from pipeline.io import atomic_path, write_json
from pipeline.parallel import parallel_map
from pipeline.params import Params
from pipeline.stage import run_stage

log = logging.getLogger("retina_vae.preprocess")

TABLE_COLUMNS = ["image_id", "label", "subject_id", "eye", "modality", "split", "source", "frame"]
FOV_THRESHOLD = 0.08  # share of the brightest channel's maximum that counts as "inside the field"


def crop_fov(img: np.ndarray) -> np.ndarray:
    """Crop an (H, W, 3) fundus photo to the bounding box of its bright circular field."""
    red = img[..., 0]  # (H, W): red is the brightest channel of a fundus, up to the field's rim
    mask = red > max(8, FOV_THRESHOLD * int(red.max()))
    rows = np.flatnonzero(np.count_nonzero(mask, axis=1) > 0.01 * mask.shape[1])
    cols = np.flatnonzero(np.count_nonzero(mask, axis=0) > 0.01 * mask.shape[0])
    if len(rows) < 8 or len(cols) < 8:  # no clear field (dark or odd image): keep it whole
        return img
    return img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fit_aspect(img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Pad (black, centred) or centre-crop ``img`` (H, W[, 3]) to the aspect ``width/height``."""
    h, w = img.shape[:2]
    if h * width == w * height:
        return img
    too_wide = w * height > h * width
    if mode == "crop":
        if too_wide:
            new_w = max(1, round(h * width / height))
            x0 = (w - new_w) // 2
            return img[:, x0 : x0 + new_w]
        new_h = max(1, round(w * height / width))
        y0 = (h - new_h) // 2
        return img[y0 : y0 + new_h]
    new_h, new_w = (round(w * height / width), w) if too_wide else (h, round(h * width / height))
    out = np.zeros((new_h, new_w, *img.shape[2:]), np.uint8)
    y0, x0 = (new_h - h) // 2, (new_w - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = img
    return out


def prepare_pixels(
    px: np.ndarray,
    modality: str,
    image_size: tuple[int, int],
    oct_aspect: str,
    fov_crop: bool = True,
) -> np.ndarray:
    """One decoded frame (H, W) or (H, W, 3) uint8 -> training pixels (C, H', W') uint8.

    ``fov_crop=False`` keeps a fundus image's framing (arrays from an .npz are already cropped).
    """
    height, width = image_size
    if modality == "fundus":
        rgb = px if px.ndim == 3 else np.repeat(px[..., None], 3, axis=2)  # (H, W) -> (H, W, 3)
        img = fit_aspect(crop_fov(rgb) if fov_crop else rgb, height, width, "pad")
    else:
        gray = px if px.ndim == 2 else np.asarray(Image.fromarray(px).convert("L"))
        img = fit_aspect(gray, height, width, oct_aspect)
    out = np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)  # (H, W[, 3]) -> (C, H, W)


def _draft(image_size: tuple[int, int]) -> tuple[int, int]:
    """JPEG draft bound (width, height): every side stays >= the target's larger side."""
    side = max(image_size)
    return (side, side)


def prepare_file(
    path: str | Path,
    modality: str,
    image_size: tuple[int, int],
    oct_aspect: str,
    oct_frames: str,
    *,
    min_size: int = 1,
    max_pixels: int | None = None,
) -> list[np.ndarray]:
    """Decode any accepted image file exactly as the pipeline does -> list of (C, H, W) uint8.

    One array per frame kept (``oct_frames`` "all" or "central" for a multi-frame OCT file).
    Raises :class:`~pipeline.errors.UserError` (a ``BadImage``) with a one-line reason.
    """
    central = modality == "oct" and oct_frames == "central"
    d = readers.read_image(
        path,
        min_size=min_size,
        max_pixels=max_pixels,
        draft=_draft(image_size),
        oct_central=central,
    )
    return [prepare_pixels(px, modality, image_size, oct_aspect) for _, px in d.frames]


def _prepare_task(task: tuple) -> list[np.ndarray] | str:
    """Worker: the listed frames of one file -> arrays, or the one-line reason it failed."""
    path, frames, modality, image_size, oct_aspect = task
    try:
        d = readers.read_image(path, draft=_draft(image_size), frames=frames)
    except readers.BadImage as exc:
        return str(exc)
    return [prepare_pixels(px, modality, image_size, oct_aspect) for _, px in d.frames]


def assign_splits(
    df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
    """Split per subject, stratified by each subject's majority label; ``split`` overrides.

    Returns one split name per row (index of ``df``). A subject given explicit splits takes
    its most common one for all its rows (a warning says how many rows moved).
    """
    fixed = df["split"] if "split" in df.columns else pd.Series(None, index=df.index)
    subject_split: dict[str, str] = {}
    moved = 0
    for subject, splits in fixed.dropna().groupby(df["subject_id"]):
        counts = Counter(splits)
        best = max(SPLITS, key=lambda s: (counts[s], -SPLITS.index(s)))
        subject_split[subject] = best
        moved += len(splits) - counts[best]
    if moved:
        log.warning(
            "%d rows with an explicit split were moved to their subject's split "
            "(a subject must not appear in two splits)",
            moved,
        )
    free = df[~df["subject_id"].isin(subject_split)]
    majority = free.groupby("subject_id")["label"].agg(
        lambda s: Counter(s.fillna("\0unlabelled")).most_common(1)[0][0]
    )
    rng = np.random.default_rng(seed)
    for _, subjects in sorted(majority.groupby(majority), key=lambda kv: kv[0]):
        ids = rng.permutation(np.array(sorted(subjects.index), dtype=object))
        n_test, n_val = round(len(ids) * test_fraction), round(len(ids) * val_fraction)
        for i, subject in enumerate(ids):
            subject_split[subject] = (
                "test" if i < n_test else ("val" if i < n_test + n_val else "train")
            )
    return df["subject_id"].map(subject_split)


def _decode_all(df: pd.DataFrame, params: Params, channels: int) -> np.ndarray:
    """All manifest rows -> (N, C, H, W) uint8 in row order."""
    height, width = params.preprocess.image_size
    out = np.zeros((len(df), channels, height, width), np.uint8)
    modality, aspect = df["modality"].iloc[0], params.preprocess.oct_aspect
    root = source_root(params)
    if root.suffix.lower() == ".npz" and root.is_file():
        with np.load(root, allow_pickle=False) as data:
            cache: dict[str, np.ndarray] = {}
            for i, source in enumerate(df["source"]):
                key, index = _npz_row(source)
                arr = cache.setdefault(key, data[key])
                px = arr[index].squeeze()  # (H, W, 1) -> (H, W); (H, W, 3) stays
                out[i] = prepare_pixels(px, modality, (height, width), aspect, fov_crop=False)
        return out
    groups = df.groupby("source", sort=False).indices  # source -> row positions, first-seen order
    tasks = [
        (
            str(root / src),
            [int(f) for f in df["frame"].iloc[rows]],
            modality,
            (height, width),
            aspect,
        )
        for src, rows in groups.items()
    ]
    results = parallel_map(_prepare_task, tasks, params.preprocess.workers, desc="preprocess")
    for (src, rows), res in zip(groups.items(), results, strict=True):
        if isinstance(res, str):
            raise UserError(f"{root / src}: {res} (changed since ingest? re-run retina-vae ingest)")
        for r, arr in zip(rows, res, strict=True):
            out[r] = arr
    return out


def _npz_row(source: str) -> tuple[str, int]:
    key, _, rest = source.partition("[")
    if not rest.endswith("]") or not rest[:-1].isdigit():
        raise UserError(f"manifest source {source!r} is not an .npz row (re-run retina-vae ingest)")
    return key, int(rest[:-1])


def preprocess(params: Params) -> dict:
    """Run the stage; return the report."""
    p, pp = params.paths, params.preprocess
    try:
        df = pd.read_parquet(p.manifest)
    except (FileNotFoundError, OSError) as exc:
        raise UserError(
            f"{p.manifest}: manifest not readable ({type(exc).__name__}); "
            "run retina-vae ingest first"
        ) from None
    if df.empty:
        raise UserError(f"{p.manifest}: manifest has no images")
    modality = df["modality"].iloc[0]
    if modality != params.ingest.modality:
        raise UserError(
            f"{p.manifest}: made for modality {modality!r} but ingest.modality is "
            f"{params.ingest.modality!r}; re-run retina-vae ingest"
        )
    if pp.val_fraction + pp.test_fraction >= 1.0:
        raise UserError("preprocess.val_fraction + preprocess.test_fraction must be below 1")
    channels = 3 if modality == "fundus" else 1
    df = df.reset_index(drop=True)
    df["split"] = assign_splits(df, pp.val_fraction, pp.test_fraction, pp.seed)
    pixels = _decode_all(df, params, channels)
    report = {
        "image_size": list(pp.image_size),
        "channels": channels,
        "modality": modality,
        "classes": sorted(df["label"].dropna().unique().tolist()),
        "splits": {},
    }
    with atomic_path(p.processed) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            rows = np.flatnonzero((df["split"] == split).to_numpy())
            part = df.iloc[rows]
            np.save(tmp / f"{split}_images.npy", pixels[rows])  # (N_split, C, H, W)
            part[TABLE_COLUMNS].to_parquet(tmp / f"{split}.parquet", index=False)
            labels = part["label"].value_counts(dropna=False)
            report["splits"][split] = {
                "images": len(part),
                "subjects": int(part["subject_id"].nunique()),
                "labels": {k if isinstance(k, str) else "null": int(v) for k, v in labels.items()},
            }
    write_json(p.preprocess_report, report)
    sizes = ", ".join(f"{s} {report['splits'][s]['images']}" for s in SPLITS)
    log.info(
        "wrote %s (%d channel%s, %dx%d): %s",
        p.processed,
        channels,
        "s" if channels > 1 else "",
        *pp.image_size,
        sizes,
    )
    return report


def _body(params: Params, args: argparse.Namespace) -> None:
    preprocess(params)


def main(argv: list[str] | None = None) -> int:
    return run_stage("preprocess", argv, _body, description=__doc__.splitlines()[0])
