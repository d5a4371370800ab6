"""``retina-vae preprocess``: crop, resize and subject-split the manifest into uint8 arrays.

Pixels are read from the source files listed in ``paths.manifest`` (relative to
:func:`pipeline.ingest.source_root`), JPEGs at the smallest DCT scale that still covers
``preprocess.image_size`` (Pillow ``draft``), over a pool of ``preprocess.workers`` processes --
except those ingest already prepared from its own decode with these params
(:mod:`pipeline.pixel_cache`: one decode per image; the same bytes either way).

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
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage import exposure

from pipeline import pixel_cache, ray_data, readers, shards
from pipeline.errors import UserError
from pipeline.ingest import SPLITS, source_root
from pipeline.io import atomic_path, write_json
from pipeline.parallel import parallel_imap
from pipeline.params import Params
from pipeline.stage import run_stage

log = logging.getLogger("retina_vae.preprocess")

TABLE_COLUMNS = ["image_id", "label", "subject_id", "eye", "modality", "split", "source", "frame"]
FOV_THRESHOLD = 0.08  # share of the brightest channel's maximum that counts as "inside the field"


def crop_fov(img: np.ndarray) -> np.ndarray:
    """Crop an (H, W, 3) fundus photo to the bounding box of its bright circular field."""
    mask = _fov_mask(img)  # (H, W)
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


def _fov_mask(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) fundus -> (H, W) bool: inside the bright field of view."""
    red = img[..., 0]  # red is the brightest channel of a fundus, up to the field's rim
    return red > max(8, FOV_THRESHOLD * int(red.max()))


def graham_normalise(img: np.ndarray) -> np.ndarray:
    """Subtract the local mean colour (Graham 2015): (H, W, 3) uint8 -> (H, W, 3) uint8.

    out = 128 + 4 (I - G * I), G a Gaussian of sigma = width / 30, averaged inside the field of
    view only (G*(I M) / G*M), so the black border does not bleed a bright ring into the rim.
    Camera colour, exposure and vignetting go; vessels, lesions and the disc stay. Outside the
    field stays black.
    """
    mask = _fov_mask(img)
    sigma = max(1.0, img.shape[1] / 30.0)
    m = mask.astype(np.float32)
    weight = gaussian_filter(m, sigma)  # (H, W)
    local = gaussian_filter(img.astype(np.float32) * m[..., None], (sigma, sigma, 0))
    local /= np.maximum(weight, 1e-6)[..., None]  # (H, W, 3) local mean colour inside the field
    out = np.clip(128.0 + 4.0 * (img - local), 0, 255)
    return np.where(mask[..., None], out, 0).astype(np.uint8)


def clahe_normalise(img: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of luminance: (H, W, 3) uint8 -> same.

    scikit-image equalises the HSV value channel and keeps hue and saturation.
    """
    out = exposure.equalize_adapthist(img, clip_limit=0.01)  # float in [0, 1]
    return np.round(out * 255.0).astype(np.uint8)


ILLUMINATION = {"none": None, "graham": graham_normalise, "clahe": clahe_normalise}


def prepare_pixels(
    px: np.ndarray,
    modality: str,
    image_size: tuple[int, int],
    oct_aspect: str,
    fov_crop: bool = True,
    illumination: str = "none",
) -> np.ndarray:
    """One decoded frame (H, W) or (H, W, 3) uint8 -> training pixels (C, H', W') uint8.

    ``fov_crop=False`` keeps a fundus image's framing (arrays from an .npz are already cropped).
    ``illumination`` (fundus only) normalises the resized photo: none, graham or clahe.
    """
    height, width = image_size
    if modality == "fundus":
        rgb = px if px.ndim == 3 else np.repeat(px[..., None], 3, axis=2)  # (H, W) -> (H, W, 3)
        img = fit_aspect(crop_fov(rgb) if fov_crop else rgb, height, width, "pad")
    else:
        gray = px if px.ndim == 2 else np.asarray(Image.fromarray(px).convert("L"))
        img = fit_aspect(gray, height, width, oct_aspect)
    out = np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))
    if modality == "fundus" and ILLUMINATION[illumination] is not None:
        out = ILLUMINATION[illumination](out)
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
    illumination: str = "none",
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
    return [
        prepare_pixels(px, modality, image_size, oct_aspect, illumination=illumination)
        for _, px in d.frames
    ]


def _prepare_task(task: tuple, data: bytes | None = None) -> list[np.ndarray] | str:
    """Worker: the listed frames of one file -> arrays, or the one-line reason it failed.
    ``data``: the file's bytes when already read (the Ray Data engine)."""
    path, frames, modality, image_size, oct_aspect, illumination = task
    try:
        d = readers.read_image(path, draft=_draft(image_size), frames=frames, data=data)
    except readers.BadImage as exc:
        return str(exc)
    return [
        prepare_pixels(px, modality, image_size, oct_aspect, illumination=illumination)
        for _, px in d.frames
    ]


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


def _fill(df: pd.DataFrame, params: Params, put) -> dict[str, int]:
    """Every manifest row's training pixels -> ``put(row, (C, H, W) uint8)``, as they come.

    Files whose pixels ingest already prepared from its own decode (:mod:`pipeline.pixel_cache`,
    used only on an exact key, manifest, file and frame match) are copied from that cache; the
    rest are decoded here over the process pool. Returns how many rows came from each.
    """
    height, width = params.preprocess.image_size
    modality, aspect = df["modality"].iloc[0], params.preprocess.oct_aspect
    light = params.preprocess.illumination
    root = source_root(params)
    if root.suffix.lower() == ".npz" and root.is_file():
        with np.load(root, allow_pickle=False) as data:
            arrays: dict[str, np.ndarray] = {}
            for i, source in enumerate(df["source"]):
                key, index = _npz_row(source)
                arr = arrays.setdefault(key, data[key])
                px = arr[index].squeeze()  # (H, W, 1) -> (H, W); (H, W, 3) stays
                put(i, prepare_pixels(px, modality, (height, width), aspect, False, light))
        return {"cached": 0, "decoded": len(df)}
    cache = pixel_cache.PreparedCache.open(
        pixel_cache.cache_dir(params), pixel_cache.prepare_spec(params), params.paths.manifest
    )
    groups = df.groupby("source", sort=False).indices  # source -> row positions, first-seen order
    frame_of = df["frame"].to_numpy()
    todo = []
    cached = 0
    for src, rows in groups.items():
        frames = [int(f) for f in frame_of[rows]]
        hit = cache.lookup(src, frames, root / src) if cache is not None else None
        if hit is None:
            todo.append((src, rows, frames))
            continue
        for r, arr in zip(rows, hit, strict=True):
            put(r, arr)
        cached += len(rows)
    if cache is not None:
        cache.close()
    tasks = [
        (str(root / src), frames, modality, (height, width), aspect, light)
        for src, _, frames in todo
    ]
    results = parallel_imap(_prepare_task, tasks, params.preprocess.workers, desc="preprocess")
    for (src, rows, _), res in zip(todo, results, strict=True):
        if isinstance(res, str):
            raise UserError(f"{root / src}: {res} (changed since ingest? re-run retina-vae ingest)")
        for r, arr in zip(rows, res, strict=True):
            put(r, arr)
    return {"cached": cached, "decoded": len(df) - cached}


def _fill_on_ray(df: pd.DataFrame, params: Params, write, split_of, position) -> None:
    """:func:`_fill` on Ray Data: tasks decode the files and write each image into its slot
    of ``write``'s files (:mod:`pipeline.ray_data`)."""
    pp, root = params.preprocess, source_root(params)
    groups = []
    frame_of = df["frame"].to_numpy()
    for src, rows in df.groupby("source", sort=False).indices.items():
        frames = [int(f) for f in frame_of[rows]]
        slots = [write.slot(split_of[r], position[r]) for r in rows]  # (file, byte offset)
        groups.append((os.path.abspath(root / src), frames, [(str(f), o) for f, o in slots]))
    spec = (df["modality"].iloc[0], tuple(pp.image_size), pp.oct_aspect, pp.illumination)
    with ray_data.session(params):
        ray_data.prepare_files(groups, spec)


class _SplitWriter:
    """The split arrays, written row by row at their offsets as pixels come.

    ``shard_size`` None: one ``{split}_images.npy`` per split; else ``{split}_images/00000.npy``
    ... of ``shard_size`` images each (:mod:`pipeline.shards`). Plain positioned writes, not a
    memory map: the page cache holds the data, not this process, so no stage keeps every image
    resident (peak RSS flat in the image count). Each file is the same bytes ``np.save``
    writes for its rows (same header, C order).
    """

    def __init__(
        self, folder: Path, split_of: np.ndarray, channels: int, size, shard_size=None
    ) -> None:
        self.row_bytes = channels * size[0] * size[1]
        self.shard_size = shard_size
        self.files: dict[tuple[str, int], tuple[Path, int]] = {}  # (split, shard) -> file
        self._fds: dict[Path, int] = {}
        for split in SPLITS:
            n = int((split_of == split).sum())
            if shard_size is None:
                parts = [(folder / f"{split}_images.npy", n)]
            else:
                (folder / f"{split}_images").mkdir()
                count = max(1, -(-n // shard_size))  # an empty split keeps one empty shard
                parts = [
                    (
                        folder / f"{split}_images" / shards.shard_name(k),
                        min(shard_size, n - k * shard_size),
                    )
                    for k in range(count)
                ]
            for k, (path, rows) in enumerate(parts):
                shape = (max(rows, 0), channels, *size)
                if not shape[0]:  # a zero-length array cannot be mapped; nothing to fill
                    np.save(path, np.zeros(shape, np.uint8))
                    continue
                header = np.lib.format.open_memmap(path, "w+", np.uint8, shape)  # header + size
                self.files[(split, k)] = (path, header.offset)
                del header  # never touched: no page of it becomes resident

    def slot(self, split: str, position: int) -> tuple[Path, int]:
        """(file, byte offset) of row ``position`` of ``split``."""
        position = int(position)
        k, row = (0, position) if self.shard_size is None else divmod(position, self.shard_size)
        path, offset = self.files[(split, k)]
        return path, int(offset + row * self.row_bytes)

    def __call__(self, split: str, position: int, arr: np.ndarray) -> None:
        path, offset = self.slot(split, position)
        data = np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
        if len(data) != self.row_bytes:
            raise ValueError(f"row of {len(data)} bytes, expected {self.row_bytes}")
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_WRONLY)
        os.pwrite(self._fds[path], data, offset)

    def __enter__(self) -> _SplitWriter:
        return self

    def __exit__(self, *exc) -> None:
        for fd in self._fds.values():
            os.close(fd)


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
    report = {
        "image_size": list(pp.image_size),
        "channels": channels,
        "modality": modality,
        "classes": sorted(df["label"].dropna().unique().tolist()),
        "splits": {},
    }
    with atomic_path(p.processed) as tmp:
        tmp.mkdir()
        split_of = df["split"].to_numpy()
        position = df.groupby("split", sort=False).cumcount().to_numpy()
        on_ray = ray_data.engine(params) == "ray"
        shard = params.data.shard_size if on_ray else None
        with _SplitWriter(tmp, split_of, channels, pp.image_size, shard) as write:
            if on_ray and source_root(params).suffix.lower() != ".npz":
                _fill_on_ray(df, params, write, split_of, position)
            else:
                used = _fill(df, params, lambda row, arr: write(split_of[row], position[row], arr))
                log.info("pixels: %(cached)d from ingest's decode, %(decoded)d decoded here", used)
        for split in SPLITS:
            rows = np.flatnonzero(split_of == split)
            part = df.iloc[rows]
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
