"""``retina-vae preprocess``: crop, resize and subject-split the manifest into uint8 arrays.

Pixels are read from the source files listed in ``paths.manifest`` (relative to
:func:`pipeline.manifest.source_root`) and prepared by :mod:`pipeline.pixels` (field-of-view
crop, aspect, resize, illumination), over a pool of ``preprocess.workers`` processes -- except
those ingest already prepared from its own decode with these params (:mod:`pipeline.pixel_cache`:
one decode per image; the same bytes either way).

Split by subject, stratified by each subject's majority label, seeded: a subject's images all
land in one split. A manifest ``split`` (from a labels CSV or an .npz) overrides per subject.
Writes ``paths.processed`` as :mod:`pipeline.processed` lays it out (``{split}_images.npy``
(N, C, H, W) uint8 and ``{split}.parquet`` in the same row order), and
``paths.preprocess_report``. Same inputs and params -> byte-identical files.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline import libwarn, pixel_cache, pixels, processed, ray_data
from pipeline.errors import UserError
from pipeline.io import atomic_path, write_json, write_table
from pipeline.manifest import is_npz, npz_row, source_root
from pipeline.parallel import parallel_imap
from pipeline.params import Params
from pipeline.processed import CHANNELS, SPLITS, TABLE_COLUMNS
from pipeline.stage import run_stage

log = logging.getLogger("retina_vae.preprocess")


def assign_splits(
    df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
    """Split per subject, stratified by each subject's majority label; ``split`` overrides.

    Returns one split name per row (index of ``df``). A subject given explicit splits takes
    its most common one for all its rows (a warning says how many rows moved). Explicit
    splits that name no val subject (an official train/test release, a sheet of train only)
    give val the ``val_fraction`` of their train subjects, drawn the same way. Array work over
    subject codes: no Python object per subject, so memory stays flat at 10^5 images.
    """
    subject, ids = pd.factorize(df["subject_id"])  # (N,) row -> subject, (S,) subject ids
    chosen = _explicit_splits(df, subject, len(ids))  # (S,) index into SPLITS, -1 = free
    majority = _majority_labels(df["label"], subject, len(ids))  # (S,) label code
    ids = np.asarray(ids, dtype=object)
    rng = np.random.default_rng(seed)
    train, val, test = (SPLITS.index(name) for name in SPLITS)
    given = chosen == train
    if given.any() and not (chosen == val).any():
        for group in _strata(given, majority, ids, rng):
            chosen[group[: round(len(group) * val_fraction)]] = val
        log.info(
            "the given splits (a label sheet's split column, an .npz's arrays) name no val "
            "images: val is %d of their %d train subjects (preprocess.val_fraction)",
            int((chosen == val).sum()),
            int(given.sum()),
        )
    for group in _strata(chosen < 0, majority, ids, rng):
        n_test, n_val = round(len(group) * test_fraction), round(len(group) * val_fraction)
        chosen[group] = train
        chosen[group[:n_test]] = test
        chosen[group[n_test : n_test + n_val]] = val
    return pd.Series(np.asarray(SPLITS, dtype=object)[chosen[subject]], index=df.index)


def _strata(
    pool: np.ndarray, majority: np.ndarray, ids: np.ndarray, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """The subjects of ``pool`` ((S,) bool), one majority label at a time (sorted, unlabelled
    first): their indices sorted by id, then shuffled by ``rng`` (a seed's split is stable)."""
    for label in np.unique(majority[pool]):
        group = np.flatnonzero(pool & (majority == label))
        yield rng.permutation(group[np.argsort(ids[group])])


def _explicit_splits(df: pd.DataFrame, subject: np.ndarray, n: int) -> np.ndarray:
    """(n,) each subject's most common explicit split (ties: the earlier in SPLITS) as an
    index into SPLITS, -1 for a subject with none."""
    if "split" not in df.columns:
        return np.full(n, -1)
    given = pd.Categorical(df["split"], categories=SPLITS).codes  # (N,), -1 where none
    rows = given >= 0
    counts = np.zeros((n, len(SPLITS)), dtype=np.int64)  # (S, 3) explicit rows per split
    np.add.at(counts, (subject[rows], given[rows]), 1)
    has = counts.sum(axis=1) > 0
    moved = int((counts.sum(axis=1) - counts.max(axis=1)).sum())
    if moved:
        log.warning(
            "%d rows with an explicit split were moved to their subject's split "
            "(a subject must not appear in two splits)",
            moved,
        )
    return np.where(has, counts.argmax(axis=1), -1)  # argmax: the first of equal counts


def _majority_labels(label: pd.Series, subject: np.ndarray, n: int) -> np.ndarray:
    """(n,) each subject's most common label (ties: the one its rows name first), as a rank in
    sorted label order with unlabelled first (0)."""
    names = np.asarray(sorted(label.dropna().unique()), dtype=object)
    code = np.searchsorted(names, label.fillna(names[0] if len(names) else "").to_numpy())
    code = np.where(label.isna().to_numpy(), 0, code + 1)  # (N,) 0 = unlabelled
    pair = subject.astype(np.int64) * (len(names) + 1) + code  # (N,) one key per (subject, label)
    keys, first, counts = np.unique(pair, return_index=True, return_counts=True)
    owner = keys // (len(names) + 1)  # (P,) the subject of each pair
    best = np.lexsort((first, -counts, owner))  # per subject: most rows, then first named
    owner, start = np.unique(owner[best], return_index=True)
    out = np.zeros(n, dtype=np.int64)
    out[owner] = keys[best[start]] % (len(names) + 1)
    return out


def _by_file(df: pd.DataFrame) -> tuple[pd.Index, Iterator[np.ndarray]]:
    """The source files in first-seen order, and each one's manifest row positions (ascending)
    in that order: ``df.groupby("source", sort=False).indices``, one file at a time instead of
    a dict of all."""
    codes, sources = pd.factorize(df["source"], sort=False)
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=len(sources))
    ends = np.cumsum(counts)
    return sources, (order[start:end] for start, end in zip(ends - counts, ends, strict=True))


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
    if is_npz(root):
        return _fill_npz(df, params, root, put)
    todo, cached = _from_cache(df, params, root, put)
    burned_in = params.ingest.allow_burned_in_annotation
    tasks = [
        (str(root / src), frames, modality, (height, width), aspect, light, burned_in)
        for src, _, frames in todo
    ]
    results = parallel_imap(_prepare, tasks, params.preprocess.workers, desc="preprocess")
    warned = Counter()
    for (src, rows, _), (res, noted) in zip(todo, results, strict=True):
        if isinstance(res, str):
            raise UserError(f"{root / src}: {res} (changed since ingest? re-run retina-vae ingest)")
        warned.update(noted)
        for r, arr in zip(rows, res, strict=True):
            put(r, arr)
    libwarn.report(warned, log)
    return {"cached": cached, "decoded": len(df) - cached}


def _prepare(task: tuple) -> tuple[list[np.ndarray] | str, list[str]]:
    """:func:`pipeline.pixels.prepare_frames` in a worker, and the kinds of library warnings
    it raised (reported once per kind, :mod:`pipeline.libwarn`)."""
    with libwarn.caught() as noted:
        result = pixels.prepare_frames(task)
    return result, noted


def _from_cache(df: pd.DataFrame, params: Params, root: Path, put) -> tuple[list[tuple], int]:
    """``put(row, pixels)`` for every row whose file's pixels ingest prepared (an exact key,
    manifest, file and frame match in :mod:`pipeline.pixel_cache`); return the files left to
    decode, (source, rows, frames) each, and how many rows were put."""
    cache = pixel_cache.PreparedCache.open(
        pixel_cache.cache_dir(params), pixel_cache.prepare_spec(params), params.paths.manifest
    )
    frame_of = df["frame"].to_numpy()
    top = str(root)  # os.path.join, not pathlib: no interned string per file
    todo = []
    cached = 0
    sources, rows_of = _by_file(df)
    entry = cache.entries(sources) if cache is not None else None
    for j, (src, rows) in enumerate(zip(sources, rows_of, strict=True)):
        frames = [int(f) for f in frame_of[rows]]
        hit = cache.lookup(entry[j], frames, os.path.join(top, src)) if entry is not None else None
        if hit is None:
            todo.append((src, rows, frames))
            continue
        for r, arr in zip(rows, hit, strict=True):
            put(r, arr)
        cached += len(rows)
    if cache is not None:
        cache.close()
    return todo, cached


def _fill_npz(df: pd.DataFrame, params: Params, root: Path, put) -> dict[str, int]:
    """:func:`_fill` for an .npz source: each manifest row is a row of one of its arrays."""
    pp, modality, size = (
        params.preprocess,
        df["modality"].iloc[0],
        tuple(params.preprocess.image_size),
    )
    with np.load(root, allow_pickle=False) as data:
        arrays: dict[str, np.ndarray] = {}
        for i, source in enumerate(df["source"]):
            key, index = npz_row(source)
            arr = arrays.setdefault(key, data[key])
            put(
                i,
                pixels.prepare_npz_row(arr[index], modality, size, pp.oct_aspect, pp.illumination),
            )
    return {"cached": 0, "decoded": len(df)}


def _fill_on_ray(df: pd.DataFrame, params: Params, write, split_of, position) -> dict[str, int]:
    """:func:`_fill` on Ray Data: rows whose pixels ingest's tasks prepared are copied here from
    the cache (small: (C, H, W) at the training size, streamed, never all held); Ray tasks
    decode the other files and write each image into its slot of ``write``'s files
    (:mod:`pipeline.ray_data`; no Ray at all when nothing is left). Returns the counts."""
    pp, root = params.preprocess, source_root(params)
    todo, cached = _from_cache(
        df, params, root, lambda r, arr: write(split_of[r], position[r], arr)
    )
    groups = []
    for src, rows, frames in todo:
        slots = [write.slot(split_of[r], position[r]) for r in rows]  # (file, byte offset)
        groups.append((os.path.abspath(root / src), frames, [(str(f), o) for f, o in slots]))
    burned_in = params.ingest.allow_burned_in_annotation
    spec = (df["modality"].iloc[0], tuple(pp.image_size), pp.oct_aspect, pp.illumination, burned_in)
    if groups:
        with ray_data.session(params):
            ray_data.prepare_files(groups, spec)
    return {"cached": cached, "decoded": len(df) - cached}


class _SplitWriter:
    """The split arrays, written row by row at their offsets as pixels come.

    ``shard_size`` None: one ``{split}_images.npy`` per split; else ``{split}_images/00000.npy``
    ... of ``shard_size`` images each (:mod:`pipeline.processed`). Plain positioned writes, not a
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
                parts = [(processed.images_file(folder, split), n)]
            else:
                shard_folder = processed.shard_folder(folder, split)
                shard_folder.mkdir()
                count = max(1, -(-n // shard_size))  # an empty split keeps one empty shard
                parts = [
                    (shard_folder / processed.shard_name(k), min(shard_size, n - k * shard_size))
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


def preprocess(params: Params) -> dict:
    """Run the stage; return the report."""
    p, pp = params.paths, params.preprocess
    df = read_manifest(params)
    modality = df["modality"].iloc[0]
    channels = CHANNELS[modality]
    sheet = params.ingest.labels is not None and not is_npz(source_root(params))
    explicit = sheet and "split" in df.columns and df["split"].notna().all()
    given = df["split"].copy() if "split" in df.columns else None  # the sheet's own
    df["split"] = assign_splits(df, pp.val_fraction, pp.test_fraction, pp.seed)
    if explicit and pp.test_fraction > 0:
        check_sheet_test_split(df["split"], given, params.ingest.labels)
    report = {
        "image_size": list(pp.image_size),
        "channels": channels,
        "modality": modality,
        "classes": sorted(df["label"].dropna().unique().tolist()),
        "splits": {},
    }
    with atomic_path(p.processed) as tmp:
        tmp.mkdir()
        write_images(df, params, tmp, channels)
        write_json(tmp / processed.RECORD, processed.preprocessing(params.flat()))
        for split in SPLITS:
            part = df.iloc[np.flatnonzero(df["split"].to_numpy() == split)]
            write_table(processed.table_path(tmp, split), part[TABLE_COLUMNS])
            report["splits"][split] = split_summary(part)
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
    for line in small_split_warnings(report["splits"], pp.val_fraction, pp.test_fraction):
        log.warning("%s", line)
    return report


MIN_EVAL_IMAGES = 30  # below this a probe accuracy's 95% interval is wider than +-0.18


def small_split_warnings(splits: dict, val_fraction: float, test_fraction: float) -> list[str]:
    """One warning per evaluation split (val, test) asked for but left with fewer than
    MIN_EVAL_IMAGES images: its figures are too uncertain to compare runs. The width is the
    worst case of a binomial proportion's normal interval, 1.96 * sqrt(0.25 / n)."""
    out = []
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        n, subjects = splits[split]["images"], splits[split]["subjects"]
        if fraction <= 0 or n >= MIN_EVAL_IMAGES:
            continue
        width = "it is empty" if n == 0 else f"an accuracy on it is +-{0.98 / n**0.5:.2f} (95%)"
        out.append(
            f"the {split} split has {n} images from {subjects} subjects ({width}): "
            f"too few to compare runs; add images or raise preprocess.{split}_fraction"
        )
    return out


def check_sheet_test_split(splits: pd.Series, given: pd.Series, labels: str | None) -> None:
    """UserError when the label sheet's own split column (``ingest.split_column``, ``given``)
    leaves the test split (``splits``, as assigned) empty, as sheets that say ``train`` on
    every row do."""
    if (splits == "test").any():
        return
    counts = given.value_counts()
    raise UserError(
        f"{labels}: the test split is empty: the sheet's split column (ingest.split_column) "
        f"gives every image (train {counts.get('train', 0)}, val {counts.get('val', 0)}, "
        "test 0); set ingest.split_column: null to split by subject with "
        "preprocess.val_fraction/test_fraction"
    )


def read_manifest(params: Params) -> pd.DataFrame:
    """Ingest's manifest (index 0..N-1), checked against the params; UserError if unusable."""
    p, pp = params.paths, params.preprocess
    try:
        names = pq.read_schema(p.manifest).names
    except OSError as exc:
        raise UserError(
            f"{p.manifest}: manifest not readable ({type(exc).__name__}); "
            "run retina-vae ingest first"
        ) from None
    except ValueError:  # pyarrow: no Parquet magic bytes (empty, truncated, another format)
        raise UserError(f"{p.manifest}: not a Parquet manifest; re-run retina-vae ingest") from None
    wanted = [*TABLE_COLUMNS, "source"]  # the source path to decode from; not written out
    missing = [c for c in wanted if c not in names]
    if missing:
        raise UserError(
            f"{p.manifest}: manifest lacks column(s) {', '.join(missing)}; re-run retina-vae ingest"
        )
    df = pd.read_parquet(p.manifest, columns=wanted)  # the content hashes were ~30%
    if df.empty:
        raise UserError(f"{p.manifest}: manifest has no images")
    if df["subject_id"].isna().any():  # the split is per subject: every row needs one
        raise UserError(
            f"{p.manifest}: {int(df['subject_id'].isna().sum())} rows have no subject_id; "
            "re-run retina-vae ingest"
        )
    modality = df["modality"].iloc[0]
    if modality != params.ingest.modality:
        raise UserError(
            f"{p.manifest}: made for modality {modality!r} but ingest.modality is "
            f"{params.ingest.modality!r}; re-run retina-vae ingest"
        )
    if pp.val_fraction + pp.test_fraction >= 1.0:
        raise UserError("preprocess.val_fraction + preprocess.test_fraction must be below 1")
    return df.reset_index(drop=True)


def write_images(df: pd.DataFrame, params: Params, folder: Path, channels: int) -> None:
    """Every manifest row's pixels into its split's array (or shards, on Ray) in ``folder``."""
    split_of = df["split"].to_numpy()
    position = df.groupby("split", sort=False).cumcount().to_numpy()  # row within its split
    on_ray = ray_data.engine(params) == "ray"
    shard = params.data.shard_size if on_ray else None
    size = params.preprocess.image_size
    with _SplitWriter(folder, split_of, channels, size, shard) as write:
        if on_ray and not is_npz(source_root(params)):
            used = _fill_on_ray(df, params, write, split_of, position)
        else:
            used = _fill(df, params, lambda row, arr: write(split_of[row], position[row], arr))
        log.info("pixels: %(cached)d from ingest's decode, %(decoded)d decoded here", used)


def split_summary(part: pd.DataFrame) -> dict:
    """One split's entry in the report: images, subjects, images per label (missing: "null")."""
    labels = part["label"].value_counts(dropna=False)
    return {
        "images": len(part),
        "subjects": int(part["subject_id"].nunique()),
        "labels": {k if isinstance(k, str) else "null": int(v) for k, v in labels.items()},
    }


def _body(params: Params, args: argparse.Namespace) -> None:
    preprocess(params)


def main(argv: list[str] | None = None) -> int:
    return run_stage("preprocess", argv, _body, description=__doc__.splitlines()[0])
