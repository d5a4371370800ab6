"""``retina-vae ingest``: find, decode, de-identify and check every image of a source.

Sources (``ingest.source``):
- ``demo``: the folder ``paths.demo`` written by ``retina-vae demo`` (with its labels.csv);
- a folder: every file in the tree is tried (DICOM with or without a suffix; DICOMDIR, hidden
  files and text sidecars are skipped). Labels come from ``ingest.labels``, a label sheet read
  by :mod:`pipeline.labels` (columns named by ``ingest.path_column`` etc.; then only the files
  its rows name are read, rows naming no file counted as ``listed_missing``, files no row
  names as ``unlisted``; an optional numeric ``severity`` column is copied into the manifest
  for evaluate's spectrum axis) or, with ``ingest.folder_labels``, from each file's parent
  folder (class-per-folder layout such as Kermany's ``train/CNV/CNV-<patient>-<n>.jpeg``);
- a MedMNIST-style ``.npz`` file: ``{split}_images`` (N, H, W[, C]) uint8 and
  ``{split}_labels`` (N,) or (N, 1), one label per image (a multi-label (N, k) array is
  refused); each row an image, the official split kept.
A relative ``ingest.source`` or ``ingest.labels`` is at the repository root, also when DVC runs
the stage in an experiment's temporary copy (:func:`pipeline.params.external_path`).

Patient, in every layout: the sheet's patient column > DICOM PatientID >
``ingest.patient_pattern`` on the file name > none (the image is its own subject). It is
stored only as a keyed hash (:mod:`pipeline.deid`).

Each file is fully decoded (JPEGs at a reduced DCT scale, see :mod:`pipeline.readers`) to
catch truncation; a bad file is quarantined with a one-line reason. ``content_hash`` is the
SHA-256 of the decoded pixels at that check scale plus their shape: two images are duplicates
when their full-size pixels are identical. For a JPEG hashed at a reduced scale the hash is a
first filter: a match is confirmed by the files' bytes (a byte copy is a duplicate without
decoding), else on the full-size decodes of the two files (only those are decoded again),
and two JPEGs equal only at the reduced scale are both kept (with one ``content_hash``).
Library warnings raised while decoding are counted per kind (:mod:`pipeline.libwarn`).
Counts balance: found = ingested + quarantined + duplicates (in images: a multi-frame file
counts one per frame kept; a quarantined file counts one).

From that same decode ingest also makes the training pixels for the current ``preprocess``
params where preprocess's decode would give identical pixels, and leaves them in
:mod:`pipeline.pixel_cache` (a keyed accelerator, not a stage output): one decode per image.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import deid, labels, libwarn, pixel_cache, pixels, ray_data, readers
from pipeline.errors import UserError
from pipeline.io import ArrowRows, write_json, write_table
from pipeline.manifest import (
    MANIFEST_COLUMNS,
    NOT_UTF8,
    broken_link,
    escaped,
    is_candidate,
    is_npz,
    is_utf8,
    labels_path,
    npz_key,
    npz_source,
    source_files,
    source_root,
    source_shown,
)
from pipeline.parallel import parallel_imap
from pipeline.params import Params
from pipeline.processed import SPLITS
from pipeline.stage import run_stage

log = logging.getLogger("retina_vae.ingest")

# JPEG draft bound for validation and the duplicate hash (a first filter, confirmed at full
# size by :class:`FullSize`): >= 64 px each side. Any scale decodes
# the whole entropy stream (so truncation is caught alike); 64 is preprocess's draft at the
# default 64 px image size, so there ingest's decode is the one preprocess uses, for JPEGs of
# every size (at 128 the demo's 256 px and 1024 px photos were decoded twice).
CHECK_SIZE = (64, 64)
BROKEN_LINK = "symbolic link to a missing file"
SHEET_CONFLICT = "label sheet gives conflicting values"  # the quarantine kind
DUPLICATE_COLUMNS = [
    "path",
    "frame",
    "label",
    "duplicate_of",
    "duplicate_of_frame",
    "duplicate_of_label",
]


@dataclass(frozen=True)
class Entry:
    """One file of a folder source to inspect, with what the CSV or its folder says of it."""

    source: str  # path relative to the source root
    label: str | None
    patient: str | None  # raw patient ID from the sheet: only its keyed hash is ever stored
    eye: str | None
    split: str | None
    name_patient: str | None = None  # ingest.patient_pattern's match in the file name
    severity: float | None = None  # the label sheet's optional severity column


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row (``modality`` is the stage's) and whether it is its own subject."""

    image_id: str
    source: str
    frame: int
    label: str | None
    subject_id: str
    eye: str | None
    width: int
    height: int
    content_hash: str
    split: str | None
    severity: float | None = None
    own_subject: bool = False  # no patient ID anywhere: the image is its own subject


@dataclass(frozen=True)
class Refused:
    """One quarantined file (or .npz row): the one-line ``reason`` and its ``kind``."""

    path: str
    reason: str
    kind: str


class Found:
    """The images a scan finds, in scan order, deduplicated as they come: the first image of
    each content hash is kept (in :class:`pipeline.io.ArrowRows`: ingest's memory stays flat
    in the image count), the rest listed in :attr:`duplicates` with the copy kept.

    A hash of pixels decoded below full size (a JPEG's DCT-reduced check decode) is only a
    first filter: when it collides, ``confirm(source, frame, kept_source, kept_frame)`` decides
    on the full-size pixels whether the two are one image; without ``confirm`` (or when it
    says no) both are kept."""

    FIELDS = tuple(c for c in MANIFEST_COLUMNS if c != "modality")  # the stage adds modality
    INTS = ("frame", "width", "height")
    FLOATS = ("severity",)

    def __init__(self, confirm: Callable[[str, int, str, int], bool] | None = None) -> None:
        types = [
            pa.int64()
            if f in self.INTS
            else pa.float64()
            if f in self.FLOATS
            else pa.large_string()
            for f in self.FIELDS
        ]
        self.rows = ArrowRows(pa.schema(list(zip(self.FIELDS, types, strict=True))))
        self._first: dict[bytes, int] | None = {}  # content hash -> its kept row
        self._more: dict[bytes, list[int]] = {}  # hash -> further kept rows (distinct at full size)
        self._reduced: set[int] = set()  # kept rows whose hash is of a reduced decode
        self._confirm = confirm
        self.duplicates: list[dict] = []
        self.own_subjects = 0  # kept images that are their own subject
        self.total = 0  # images found, duplicates included

    def add(self, row: ManifestRow, reduced: bool = False) -> None:
        """Keep ``row``, or list it as a duplicate of a kept row; ``reduced``: its hash is of
        pixels decoded below full size."""
        self.total += 1
        digest = bytes.fromhex(row.content_hash)
        first = self._first.get(digest)
        kept = None
        if first is not None:
            rows = [first, *self._more.get(digest, ())]
            kept = next((k for k in rows if self._same(row, reduced, k)), None)
        if kept is None:
            if first is None:
                self._first[digest] = len(self.rows)
            else:
                self._more.setdefault(digest, []).append(len(self.rows))
            if reduced:
                self._reduced.add(len(self.rows))
            self.own_subjects += row.own_subject
            self.rows.append(tuple(getattr(row, f) for f in self.FIELDS))
            return
        self.duplicates.append(
            {
                "path": row.source,
                "frame": row.frame,
                "label": row.label,
                "duplicate_of": self.rows.value(kept, "source"),
                "duplicate_of_frame": self.rows.value(kept, "frame"),
                "duplicate_of_label": self.rows.value(kept, "label"),
            }
        )

    def _same(self, row: ManifestRow, reduced: bool, kept: int) -> bool:
        """Whether ``row`` is the image of kept row ``kept`` (their hashes are equal): so when
        both hashes are of full-size pixels, else as ``confirm`` finds."""
        if not (reduced or kept in self._reduced):
            return True
        if self._confirm is None:
            return False
        return self._confirm(
            row.source, row.frame, self.rows.value(kept, "source"), self.rows.value(kept, "frame")
        )

    def seal(self) -> None:
        """The scan is over: drop the duplicate index (its memory is the manifest's to use)."""
        self._first, self._more, self._reduced = None, {}, set()

    def manifest(self, modality: str) -> pa.Table:
        """The kept images as the manifest table (MANIFEST_COLUMNS, integer sizes and frames),
        with the pandas schema that ``pd.DataFrame(<one dict per row>, columns=...)`` gets
        (text Arrow-backed ``str``, an all-empty column ``object``): written, the same bytes
        as that DataFrame's ``to_parquet``, without a Python object per value on the way."""
        if not len(self.rows):
            empty = pd.DataFrame([], columns=MANIFEST_COLUMNS)
            empty["modality"] = modality
            empty = empty.astype(dict.fromkeys(self.INTS, "int64"))
            return pa.Table.from_pandas(empty, preserve_index=False)
        table = self.rows.table()
        n = len(table)
        columns = {name: table.column(name) for name in self.FIELDS}
        columns["modality"] = pa.repeat(pa.scalar(modality, pa.large_string()), n)
        for name, col in columns.items():
            if col.null_count == n:
                columns[name] = pa.nulls(n)  # pandas keeps an all-None column as object
        table = pa.table({name: columns[name] for name in MANIFEST_COLUMNS})
        sample = {}  # one row with the DataFrame's dtypes: its pandas schema is the table's
        for name, col in zip(table.column_names, table.slice(0, 1).columns, strict=True):
            if pa.types.is_null(col.type):
                sample[name] = np.full(1, None, dtype=object)
            elif name in self.INTS or name in self.FLOATS:
                sample[name] = col.to_numpy(zero_copy_only=False)
            else:
                sample[name] = pd.array(col, dtype=pd.StringDtype("pyarrow", np.nan))
        schema = pa.Schema.from_pandas(pd.DataFrame(sample), preserve_index=False)
        return table.cast(schema)


@dataclass(frozen=True)
class Scan:
    """What a scanner found: images (deduplicated), refusals and listing counts."""

    found: Found
    quarantine: list[Refused]
    counts: dict[str, int]
    warnings: Counter = field(default_factory=Counter)  # library warning kind -> files


class Entries:
    """The files of a folder source to inspect, in order, held compactly (their relative
    paths, or the labels table): each :class:`Entry` is made as it is iterated."""

    def __init__(self, count: int, make: Callable[[], Iterator[Entry]]) -> None:
        self._count, self._make = count, make

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Entry]:
        return self._make()


class FullSize:
    """Confirms a collision of check-scale hashes on the full-size pixels: two frames are one
    image when their full-size decodes (no DCT reduction) are identical. The same frame of
    two byte-identical files (same size, same SHA-256 of the bytes) is that without decoding:
    a byte copy, the common case, costs two reads. Otherwise each frame is decoded once, and
    only frames whose hashes collided ever are; a frame that fails to decode now is never
    called a copy."""

    def __init__(self, root: Path, max_pixels: int | None) -> None:
        self.root, self.max_pixels = root, max_pixels
        self._hashes: dict[tuple[str, int], str | None] = {}
        self._bytes: dict[str, str | None] = {}  # source -> SHA-256 of its bytes

    def __call__(self, source: str, frame: int, other: str, other_frame: int) -> bool:
        if frame == other_frame and self._byte_copy(source, other):
            return True
        a, b = self._hash(source, frame), self._hash(other, other_frame)
        return a is not None and a == b

    def _byte_copy(self, source: str, other: str) -> bool:
        """Whether the two files hold the same bytes (sizes compared first)."""
        try:
            sizes = {os.path.getsize(os.path.join(self.root, s)) for s in (source, other)}
        except OSError:
            return False
        if len(sizes) > 1:
            return False
        a, b = self._file_hash(source), self._file_hash(other)
        return a is not None and a == b

    def _file_hash(self, source: str) -> str | None:
        if source not in self._bytes:
            try:
                with open(os.path.join(self.root, source), "rb") as f:
                    self._bytes[source] = hashlib.file_digest(f, "sha256").hexdigest()
            except OSError:
                self._bytes[source] = None
        return self._bytes[source]

    def _hash(self, source: str, frame: int) -> str | None:
        key = (source, frame)
        if key not in self._hashes:
            try:
                d = readers.read_image(
                    os.path.join(self.root, source), max_pixels=self.max_pixels, frames=[frame]
                )
                self._hashes[key] = pixel_hash(d.frames[0][1])
            except readers.BadImage:
                self._hashes[key] = None
        return self._hashes[key]


def pixel_hash(image: np.ndarray) -> str:
    """SHA-256 of an image's shape and uint8 pixels (the duplicate key)."""
    h = hashlib.sha256(str(image.shape).encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()


def _prepared(path: str, d: readers.Decoded, spec: dict) -> np.ndarray | None:
    """The training pixels of every decoded frame, (F, C, H, W) uint8, made from ingest's own
    decode when preprocess's decode would give the same pixels (:mod:`pipeline.pixel_cache`);
    else None (preprocess then decodes the file itself)."""
    size, light = tuple(spec["image_size"]), spec["illumination"]
    jpeg = d.info.get("format") in ("JPEG", "MPO")  # the only formats Pillow decodes reduced
    # header only: the DCT scale preprocess's draft picks, against the one decoded here
    if jpeg and readers.jpeg_draft_size(path, pixels.draft_size(size)) != d.info["decoded_size"]:
        return None
    try:
        return np.stack(
            [
                pixels.prepare_pixels(px, spec["modality"], size, spec["oct_aspect"], True, light)
                for _, px in d.frames
            ]
        )
    except Exception:  # noqa: BLE001 -- preprocess re-does the file and reports what fails
        return None


def inspect(task: tuple) -> dict:
    """Decode one file in a worker: frame sizes and hashes, or the quarantine reason and kind;
    with a prepare spec, also the training pixels made from the same decode; ``warnings``:
    the kinds of library warnings the decode raised (:mod:`pipeline.libwarn`)."""
    with libwarn.caught() as noted:
        result = _inspect(task)
    return {**result, "warnings": noted} if noted else result


def _inspect(task: tuple) -> dict:
    path, oct_central, min_size, max_pixels, burned_in, salt, spec = task
    try:
        stat = pixel_cache.file_stat(path)  # before decoding: a later change shows as a miss
    except OSError:
        stat = None
    try:
        d = readers.read_image(
            path,
            min_size=min_size,
            max_pixels=max_pixels,
            draft=CHECK_SIZE,
            oct_central=oct_central,
            allow_burned_in=burned_in,
        )
    except readers.BadImage as exc:
        return {"reason": str(exc), "kind": exc.kind}
    return {
        "frames": [(i, pixel_hash(px)) for i, px in d.frames],
        # hashed below full size (a JPEG's DCT-reduced decode): a collision must be confirmed
        "reduced": any(
            px.shape[:2] != (h, w) for (_, px), (w, h) in zip(d.frames, d.sizes, strict=True)
        ),
        "prepared": _prepared(path, d, spec) if (spec and stat) else None,
        "stat": stat,
        "sizes": d.sizes,  # each kept frame's upright (width, height): TIFF pages differ
        # the raw header patient ID never leaves the worker: only its keyed hash does
        "subject_id": deid.subject_id(d.patient_id, salt) if d.patient_id else None,
        "eye": d.eye,
    }


def _folder_entries(params: Params, root: Path) -> tuple[Entries, dict, list[Refused]]:
    """One entry per file to inspect (from the label sheet, else the folder); listing counts;
    the files refused before decoding: a file or folder name that is not UTF-8 (in every
    layout: no sheet row can name it, no output can hold it; quarantine.csv shows it
    :func:`~pipeline.manifest.escaped`, no log line shows it), a file the sheet's rows
    disagree on."""
    ing = params.ingest
    sheet = labels_path(params)
    if sheet is None and ing.source == "demo":
        sheet = root / "labels.csv"
    skipped, candidates, odd = set(), [], []
    for rel in source_files(root):
        if not is_candidate(rel):
            skipped.add(rel)
        elif is_utf8(rel):
            candidates.append(rel)
        else:
            odd.append(Refused(escaped(rel), NOT_UTF8, NOT_UTF8))
    pattern = re.compile(ing.patient_pattern)
    if sheet is None:
        return _listed_entries(params, candidates, pattern), {"skipped_sidecars": len(skipped)}, odd
    table = labels.read_sheet(sheet, ing, root, named=ing.source != "demo")
    listing = labels.match(sheet, table, labels.FileIndex(root, candidates), len(candidates))
    del candidates
    _log_listing(sheet, root, listing)
    named = set(listing.table["path"]) | set(listing.conflicts)  # a row may name a hidden file
    counts = {
        "skipped_sidecars": len(skipped - named),
        "unlisted": listing.unlisted,
        "listed_missing": len(listing.missing),
    }
    table = listing.table
    refused = odd + [Refused(f, why, SHEET_CONFLICT) for f, why in listing.conflicts.items()]
    return Entries(len(table), lambda: _sheet_entries(table, pattern)), counts, refused


def _log_listing(sheet: Path, root: Path, listing: labels.Listing) -> None:
    """One line each: rows naming no file (with a hint when the name exists with another
    suffix), files no row names, rows naming a file twice."""
    if listing.missing:
        shown = ", ".join(listing.missing[:3]) + (", ..." if len(listing.missing) > 3 else "")
        hint = (
            f"; {listing.other_suffix} of them exist with another suffix (list the file's "
            "own suffix, or none: a name without suffix matches by stem)"
            if listing.other_suffix
            else ""
        )
        log.warning(
            "%d rows of %s are listed but missing from %s (%s)%s",
            len(listing.missing),
            sheet,
            root,
            shown,
            hint,
        )
    if listing.unlisted:
        log.info(
            "%d image files in %s are on disk but unlisted in %s", listing.unlisted, root, sheet
        )
    if listing.repeated:
        log.info(
            "%s: %d rows name a file again without contradicting its other rows; each file is "
            "read once",
            sheet,
            listing.repeated,
        )
    if listing.conflicts:
        log.warning(
            "%s: %d files are named by rows with conflicting labels, patients, eyes, splits or "
            "severities: quarantined (reasons in the quarantine list)",
            sheet,
            len(listing.conflicts),
        )
    variants = labels.case_variants(listing.table["label"])
    if variants:
        shown = "; ".join(" / ".join(f"{v} ({n})" for v, n in g) for g in variants[:10])
        log.warning(
            "%s: labels that differ only in case are separate classes: %s%s (write each class "
            "alike in the sheet to merge them)",
            sheet,
            shown,
            f"; ... {len(variants) - 10} more groups" if len(variants) > 10 else "",
        )


def _sheet_entries(table: pd.DataFrame, pattern: re.Pattern) -> Iterator[Entry]:
    keys = ("path", "label", "patient_id", "eye", "split", "severity")
    columns = (table[k] for k in keys)
    for source, label, patient, eye, split, severity in zip(*columns, strict=True):
        yield Entry(
            source=source,
            label=label or None,
            patient=patient or None,
            eye=readers.normalise_eye(eye),
            split=labels.SPLIT_ALIASES[split.lower()] if split else None,
            name_patient=_name_patient(pattern, source),
            severity=float(severity) if severity else None,
        )


def _name_patient(pattern: re.Pattern, source: str) -> str | None:
    """``ingest.patient_pattern``'s group 1 in the file name, or None."""
    match = pattern.match(source.rsplit("/", 1)[-1])
    return match.group(1) if match else None


def _listed_entries(params: Params, sources: list[str], pattern: re.Pattern) -> Entries:
    """Entries of a folder without a label sheet: label = parent folder, patient from the name."""
    by_folder = params.ingest.folder_labels

    def entries() -> Iterator[Entry]:
        for source in sources:
            folders = source.split("/")[:-1]
            folder = folders[-1] if by_folder and folders else None
            yield Entry(source, folder, None, None, None, _name_patient(pattern, source))

    return Entries(len(sources), entries)


def _scan_folder(params: Params, root: Path, salt: bytes, cache=None) -> Scan:
    """Inspect every entry of a folder source.

    ``cache``: a :class:`pipeline.pixel_cache.CacheWriter` that receives each file's
    training pixels as they come (never all held at once), or None.
    """
    if not root.is_dir():
        what = "not a folder or an .npz file" if root.exists() else "source folder not found"
        raise UserError(f"{source_shown(params)}: {what} (ingest.source)")
    entries, counts, refused = _folder_entries(params, root)
    ing = params.ingest
    central = ing.modality == "oct" and ing.oct_frames == "central"
    spec = pixel_cache.prepare_spec(params) if cache is not None else None
    top = str(root)  # os.path.join, not pathlib: no interned string per file name
    burned_in = ing.allow_burned_in_annotation
    tasks = (
        (os.path.join(top, e.source), central, ing.min_size, ing.max_pixels, burned_in, salt, spec)
        for e in entries
    )
    if ray_data.engine(params) == "ray":
        with ray_data.session(params):
            results = ray_data.inspect_files(list(tasks), inspect, cache and cache.tmp)
    else:
        results = parallel_imap(inspect, tasks, ing.workers, desc="ingest", total=len(entries))
    found, quarantine, warned = Found(FullSize(root, ing.max_pixels)), list(refused), Counter()
    for e, r in zip(entries, results, strict=True):
        warned.update(r.get("warnings", ()))
        if r.get("prepared") is not None:
            cache.add(e.source, [i for i, _ in r["frames"]], r["stat"], r["prepared"])
        elif r.get("part") is not None:
            cache.add_part(e.source, [i for i, _ in r["frames"]], r["stat"], *r["part"])
        if "reason" in r:
            quarantine.append(_refused(root, e, r))
        else:
            for row in _rows(e, r, salt):
                found.add(row, r["reduced"])
    return Scan(found, quarantine, {**counts, "files": len(entries) + len(refused)}, warned)


def _refused(root: Path, e: Entry, result: dict) -> Refused:
    full = os.path.join(root, e.source)
    if broken_link(full):
        return Refused(e.source, BROKEN_LINK, BROKEN_LINK)
    if not os.path.exists(full):
        return Refused(e.source, "listed but file not found", "listed but file not found")
    return Refused(e.source, result["reason"], result["kind"])


def _rows(e: Entry, result: dict, salt: bytes) -> Iterator[ManifestRow]:
    """The manifest rows of one inspected file, one per frame kept."""
    # the patient: the sheet's > the DICOM header's > the file name's > none (own subject)
    if e.patient:
        subject = deid.subject_id(e.patient, salt)
    elif result["subject_id"]:
        subject = result["subject_id"]
    else:
        subject = deid.subject_id(e.name_patient or "file:" + e.source, salt)
    own = not (e.patient or result["subject_id"] or e.name_patient)
    return (
        ManifestRow(
            image_id=deid.image_id(e.source, frame, salt),
            source=e.source,
            frame=frame,
            label=e.label,
            subject_id=subject,
            eye=e.eye or result["eye"],
            width=width,
            height=height,
            content_hash=digest,
            split=e.split,
            severity=e.severity,
            own_subject=own,
        )
        for (frame, digest), (width, height) in zip(result["frames"], result["sizes"], strict=True)
    )


def _npz_labels(path: Path, data: np.lib.npyio.NpzFile, split: str, n: int) -> np.ndarray | None:
    """``{split}_labels`` as (N,), or None when absent; one line if not one label per image."""
    if f"{split}_labels" not in data.files:
        return None
    labels = data[f"{split}_labels"]
    if labels.shape not in ((n,), (n, 1)):
        raise UserError(
            f"{path}: {split}_labels has shape {labels.shape} but one label per image, (N,) or "
            f"(N, 1) with N = {n}, is needed (multi-label arrays are not supported)"
        )
    return labels.reshape(n)


def _scan_npz(params: Params, path: Path, salt: bytes) -> Scan:
    """Every row of a MedMNIST-style .npz, official splits kept."""
    if params.ingest.labels:
        raise UserError(f"ingest.labels: not used with an .npz source ({path} holds its labels)")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__})") from None
    with data:
        keys = [s for s in SPLITS if npz_key(s) in data.files]
        if not keys:
            raise UserError(f"{path}: no train_images/val_images/test_images arrays")
        found, quarantine = Found(), []
        for split in keys:
            quarantine += _scan_npz_split(params, path, data, split, salt, found)
    return Scan(found, quarantine, {"files": found.total + len(quarantine)})


def _scan_npz_split(
    params: Params, path: Path, data: np.lib.npyio.NpzFile, split: str, salt: bytes, found: Found
) -> list[Refused]:
    """One split's array of an .npz: its rows into ``found``, or all of them refused when too
    small."""
    arr = data[npz_key(split)]
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        raise UserError(
            f"{path}: {npz_key(split)} must be uint8 (N, H, W[, C]), got {arr.dtype} {arr.shape}"
        )
    labels = _npz_labels(path, data, split, len(arr))
    h, w = arr.shape[1:3]
    min_size = params.ingest.min_size
    if min(h, w) < min_size:  # one size per array: all its rows are refused
        reason = f"too small: {w}x{h} is below ingest.min_size ({min_size})"
        return [Refused(npz_source(split, i), reason, "too small") for i in range(len(arr))]
    for i in range(len(arr)):
        source = npz_source(split, i)
        found.add(
            ManifestRow(
                image_id=deid.image_id(source, 0, salt),
                source=source,
                frame=0,
                label=str(labels[i].item()) if labels is not None else None,
                subject_id=deid.subject_id(f"{path.name}:{source}", salt),
                eye=None,
                width=w,
                height=h,
                content_hash=pixel_hash(arr[i]),
                split=split,
            )
        )
    return []


def _warn_conflicts(conflicts: list[dict]) -> None:
    for d in conflicts[:5]:
        log.warning(
            "duplicate images with different labels: %s (%s) = %s (%s)",
            d["path"],
            d["label"],
            d["duplicate_of"],
            d["duplicate_of_label"],
        )
    if len(conflicts) > 5:
        log.warning(
            "... %d more duplicates with conflicting labels (see duplicates csv)",
            len(conflicts) - 5,
        )


def _scan(params: Params, root: Path, salt: bytes) -> tuple[Scan, pixel_cache.CacheWriter | None]:
    """Scan the source; on a folder, fill the prepared-pixel cache too (on either engine;
    returned open: it is bound to the manifest once that is written)."""
    if is_npz(root):  # no cache: preprocess reads the arrays
        shutil.rmtree(pixel_cache.cache_dir(params), ignore_errors=True)
        return _scan_npz(params, root, salt), None
    cache = pixel_cache.CacheWriter(pixel_cache.cache_dir(params), pixel_cache.prepare_spec(params))
    try:
        return _scan_folder(params, root, salt, cache), cache
    except BaseException:
        cache.abort()
        raise


def _source_kind(params: Params, root: Path) -> str:
    if is_npz(root):
        return "npz"
    if params.ingest.source == "demo":
        return "demo"
    return "csv" if params.ingest.labels else "folder"


def _manifest(found: Found, modality: str) -> pa.Table:
    """The manifest table of the images kept (MANIFEST_COLUMNS, integer sizes and frames)."""
    if found.own_subjects:
        log.warning(
            "%d images have no patient ID (none in the label sheet's patient column or the "
            "DICOM PatientID, and the file name does not match ingest.patient_pattern): each "
            "is its own subject",
            found.own_subjects,
        )
    return found.manifest(modality)


def _warn_patient_label_folders(manifest: pa.Table) -> None:
    """A warning where label folders (``ingest.folder_labels``) hold a single patient's images
    each: a folder named for a patient would put an identifier into the labels, and from there
    into metrics, maps and MLflow. Counts only, no folder names (a log line is an output)."""
    table = manifest.select(["label", "subject_id"]).to_pandas().dropna(subset=["label"])
    subjects = table.groupby("label")["subject_id"].nunique()
    single = int((subjects == 1).sum())
    if single:
        log.warning(
            "ingest.folder_labels: %d of %d label folders hold a single patient's images; a "
            "folder named for a patient puts an identifier into the labels, metrics and "
            "MLflow: check the class folder names, or write a label sheet (ingest.labels)",
            single,
            len(subjects),
        )


def _value_counts(column: pa.ChunkedArray) -> dict[str | None, int]:
    """How often each value occurs (None: missing)."""
    return {v["values"]: v["counts"] for v in column.value_counts().to_pylist()}


def _report(params: Params, root: Path, scan: Scan, manifest: pa.Table, dups: list[dict]) -> dict:
    """The stage's counts (``paths.ingest_report``): found = ingested + quarantined + duplicates."""
    labels = _value_counts(manifest.column("label"))  # a few labels: as Python values
    subjects = manifest.column("subject_id")  # one per image, often: counted in Arrow
    reasons = Counter(q.kind for q in scan.quarantine)
    return {
        "source_kind": _source_kind(params, root),
        "modality": params.ingest.modality,
        "found": len(manifest) + len(scan.quarantine) + len(dups),
        "ingested": len(manifest),
        "quarantined": len(scan.quarantine),
        "duplicates": len(dups),
        "files": scan.counts.get("files", 0),
        "skipped_sidecars": scan.counts.get("skipped_sidecars", 0),
        "unlisted": scan.counts.get("unlisted", 0),
        "listed_missing": scan.counts.get("listed_missing", 0),
        "subjects": pc.count_distinct(subjects).as_py() if len(subjects) else 0,
        "labels": {str(k) if isinstance(k, str) else "null": int(v) for k, v in labels.items()},
        "quarantine_reasons": dict(sorted(reasons.items())),
        "duplicate_label_conflicts": sum(d["label"] != d["duplicate_of_label"] for d in dups),
        "decode_warnings": dict(sorted(scan.warnings.items())),
    }


def ingest(params: Params) -> dict:
    """Run the stage: write manifest, quarantine, duplicates and report (all of them, also when
    the stage then refuses the result); return the report."""
    root, p = source_root(params), params.paths
    salt = deid.resolve_salt()
    if deid.is_builtin(salt) and params.ingest.source != "demo":
        log.warning(
            "subject_id is keyed with the built-in salt, which anyone with this code can use to "
            "re-identify patients by trying IDs: for real data set %s to a secret",
            deid.SALT_ENV,
        )
    scan, cache = _scan(params, root, salt)
    scan.found.seal()
    dups = scan.found.duplicates
    _warn_conflicts([d for d in dups if d["label"] != d["duplicate_of_label"]])
    libwarn.report(scan.warnings, log)
    quarantine = pd.DataFrame(
        [(q.path, q.reason) for q in scan.quarantine], columns=["path", "reason"]
    )
    write_table(p.quarantine, quarantine)
    write_table(p.duplicates, pd.DataFrame(dups, columns=DUPLICATE_COLUMNS))
    manifest = _manifest(scan.found, params.ingest.modality)
    write_table(p.manifest, manifest)
    if _source_kind(params, root) == "folder" and params.ingest.folder_labels:
        _warn_patient_label_folders(manifest)
    if cache is not None:
        cache.close(p.manifest)  # bound to this manifest: preprocess checks its hash
    report = _report(params, root, scan, manifest, dups)
    write_json(p.ingest_report, report)
    log.info(
        "found %d = ingested %d + quarantined %d + duplicates %d (%d subjects, %d labels)",
        report["found"],
        report["ingested"],
        report["quarantined"],
        report["duplicates"],
        report["subjects"],
        sum(k is not None for k in _value_counts(manifest.column("label"))),
    )
    if "listed_missing" in scan.counts:
        log.info(
            "label sheet: %d rows listed but missing, %d image files on disk but unlisted",
            report["listed_missing"],
            report["unlisted"],
        )
    _refuse_if_bad(params, report)
    return report


def _refuse_if_bad(params: Params, report: dict) -> None:
    """The stage's verdict, after every output is written: the quarantine list and report the
    error points at are this run's, never beside a manifest of an earlier run."""
    found, refused = report["found"], report["quarantined"]
    limit, root = params.ingest.max_quarantine_fraction, source_shown(params)
    if not found and not report["listed_missing"]:
        raise UserError(
            f"{root}: no image files found (hidden files, DICOMDIR and text sidecars are "
            "skipped; ingest.source?)"
        )
    if not report["ingested"]:
        reasons = Counter(report["quarantine_reasons"])
        why = f" (most common: {reasons.most_common(1)[0][0]})" if reasons else ""
        listing = (
            f"; {report['listed_missing']} label-sheet rows name no file and "
            f"{report['unlisted']} image files are unlisted (ingest.path_column?)"
            if report["listed_missing"]
            else ""
        )
        raise UserError(
            f"{root}: no usable image: {refused} of {found} quarantined"
            f"{why}, {report['duplicates']} duplicates{listing}; see {params.paths.quarantine}"
        )
    share = refused / found
    if share > limit:
        raise UserError(
            f"{root}: {refused} of {found} images quarantined ({share:.0%}) exceeds "
            f"ingest.max_quarantine_fraction ({limit}); "
            f"see {params.paths.quarantine}"
        )


def _body(params: Params, args: argparse.Namespace) -> None:
    ingest(params)


def main(argv: list[str] | None = None) -> int:
    return run_stage("ingest", argv, _body, description=__doc__.splitlines()[0])
