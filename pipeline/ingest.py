"""``retina-vae ingest``: find, decode, de-identify and check every image of a source.

Sources (``ingest.source``):
- ``demo``: the folder ``paths.demo`` written by ``retina-vae demo`` (with its labels.csv);
- a folder: every file in the tree is tried (DICOM with or without a suffix; DICOMDIR, hidden
  files and text sidecars are skipped). Labels come from ``ingest.labels`` (CSV/TSV with
  ``path,label`` and optional ``patient_id,eye,split``; then only the listed files are read)
  or, with ``ingest.folder_labels``, from each file's parent folder (class-per-folder layout
  such as Kermany's ``train/CNV/CNV-<patient>-<n>.jpeg``);
- a MedMNIST-style ``.npz`` file: ``{split}_images`` (N, H, W[, C]) uint8 and
  ``{split}_labels`` (N,) or (N, 1), one label per image (a multi-label (N, k) array is
  refused); each row an image, the official split kept.

Patient: CSV ``patient_id`` > DICOM PatientID > ``ingest.patient_pattern`` on the file name >
none (the image is its own subject). It is stored only as a keyed hash (:mod:`pipeline.deid`).

Each file is fully decoded (JPEGs at a reduced DCT scale, see :mod:`pipeline.readers`) to
catch truncation; a bad file is quarantined with a one-line reason. ``content_hash`` is the
SHA-256 of the decoded pixels at that check scale plus their shape: two images are duplicates
when those pixels are identical (for JPEGs: identical at the reduced scale, i.e. identical
low-frequency DCT content -- byte copies and lossless re-encodes always are).
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
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import deid, pixel_cache, pixels, ray_data, readers
from pipeline.errors import UserError
from pipeline.io import write_json, write_table
from pipeline.manifest import MANIFEST_COLUMNS, is_npz, npz_key, npz_source, source_root
from pipeline.parallel import parallel_imap
from pipeline.params import Params
from pipeline.processed import SPLITS
from pipeline.stage import run_stage

log = logging.getLogger("retina_vae.ingest")

CHECK_SIZE = (128, 128)  # JPEG draft bound for validation/hashing: >= 128 px each side
DUPLICATE_COLUMNS = [
    "path",
    "frame",
    "label",
    "duplicate_of",
    "duplicate_of_frame",
    "duplicate_of_label",
]
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class Entry:
    """One file of a folder source to inspect, with what the CSV or its folder says of it."""

    source: str  # path relative to the source root
    label: str | None
    patient: str | None  # raw patient ID: only its keyed hash is ever stored
    eye: str | None
    split: str | None


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
    own_subject: bool = False  # no patient ID anywhere: the image is its own subject


@dataclass(frozen=True)
class Refused:
    """One quarantined file (or .npz row): the one-line ``reason`` and its ``kind``."""

    path: str
    reason: str
    kind: str


@dataclass(frozen=True)
class Scan:
    """What a scanner found: images, refusals and listing counts."""

    images: list[ManifestRow]
    quarantine: list[Refused]
    counts: dict[str, int]


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
    if d.info.get("format") in ("JPEG", "MPO"):  # the only formats Pillow decodes reduced
        with Image.open(path) as im:  # header only: the DCT scale preprocess's draft picks
            im.draft(im.mode, pixels.draft_size(size))
            if im.size != d.info.get("decoded_size"):
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


def inspect(task: tuple, data: bytes | None = None) -> dict:
    """Decode one file in a worker: frame sizes and hashes, or the quarantine reason and kind;
    with a prepare spec, also the training pixels made from the same decode. ``data``: the
    file's bytes when already read (the Ray Data engine)."""
    path, oct_central, min_size, max_pixels, salt, spec = task
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
            data=data,
        )
    except readers.BadImage as exc:
        return {"reason": str(exc), "kind": exc.kind}
    return {
        "frames": [(i, pixel_hash(px)) for i, px in d.frames],
        "prepared": _prepared(path, d, spec) if (spec and stat) else None,
        "stat": stat,
        "width": d.width,
        "height": d.height,
        # the raw header patient ID never leaves the worker: only its keyed hash does
        "subject_id": deid.subject_id(d.patient_id, salt) if d.patient_id else None,
        "eye": d.eye,
    }


def _read_csv(path: Path, root: Path) -> pd.DataFrame:
    """The labels manifest: columns path[,label,patient_id,eye,split]; paths inside ``root``."""
    if not path.is_file():
        raise UserError(f"{path}: labels file not found (ingest.labels)")
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: not a readable CSV/TSV ({type(exc).__name__})") from None
    df.columns = [c.strip().lower() for c in df.columns]
    if "path" not in df.columns:
        raise UserError(f"{path}: needs a 'path' column (found {', '.join(df.columns)})")
    top = root.resolve()
    for n, rel in enumerate(df["path"], start=2):  # line 1 is the header
        if not rel.strip():
            raise UserError(f"{path}: line {n}: empty path")
        full = (root / rel.strip()).resolve()
        if full != top and top not in full.parents:
            raise UserError(f"{path}: line {n}: path {rel!r} is outside the source folder {root}")
    if "split" in df.columns:
        for n, value in enumerate(df["split"], start=2):
            if value.strip() and value.strip().lower() not in _SPLIT_ALIASES:
                raise UserError(f"{path}: line {n}: split {value!r} is not train, val or test")
    df["path"] = [Path(p.strip()).as_posix() for p in df["path"]]
    dup = df["path"].duplicated()
    if dup.any():
        log.warning("%s: %d paths listed twice; the first row of each is used", path, dup.sum())
        df = df[~dup]
    return df.reset_index(drop=True)


def _cell(row: pd.Series, key: str) -> str | None:
    value = str(row.get(key, "") or "").strip()
    return value or None


def _folder_entries(params: Params, root: Path) -> tuple[list[Entry], dict]:
    """One entry per file to inspect (from the labels CSV, else the folder); listing counts."""
    ing = params.ingest
    labels_path = Path(ing.labels) if ing.labels else None
    if labels_path is None and ing.source == "demo":
        labels_path = root / "labels.csv"
    all_files = sorted(p for p in root.rglob("*") if p.is_file())
    candidates = [p for p in all_files if readers.is_candidate(p)]
    counts = {"skipped_sidecars": len(all_files) - len(candidates)}
    if labels_path is None:
        return _listed_entries(params, root, candidates), counts
    table = _read_csv(labels_path, root)
    listed = set(table["path"])
    counts["unlisted"] = sum(p.relative_to(root).as_posix() not in listed for p in candidates)
    if counts["unlisted"]:
        log.info(
            "%d files in %s are not listed in %s and were not read",
            counts["unlisted"],
            root,
            labels_path,
        )
    return [_csv_entry(row) for _, row in table.iterrows()], counts


def _csv_entry(row: pd.Series) -> Entry:
    split = _cell(row, "split")
    return Entry(
        source=row["path"],
        label=_cell(row, "label"),
        patient=_cell(row, "patient_id"),
        eye=readers.normalise_eye(_cell(row, "eye")),
        split=_SPLIT_ALIASES[split.lower()] if split else None,
    )


def _listed_entries(params: Params, root: Path, candidates: list[Path]) -> list[Entry]:
    """Entries of a folder without a labels CSV: label = parent folder, patient from the name."""
    pattern = re.compile(params.ingest.patient_pattern)
    entries = []
    for p in candidates:
        rel = p.relative_to(root)
        match = pattern.match(p.name)
        folder = (
            rel.parent.name if params.ingest.folder_labels and rel.parent != Path(".") else None
        )
        entries.append(Entry(rel.as_posix(), folder, match.group(1) if match else None, None, None))
    return entries


def _scan_folder(params: Params, root: Path, salt: bytes, cache=None) -> Scan:
    """Inspect every entry of a folder source.

    ``cache``: a :class:`pipeline.pixel_cache.CacheWriter` that receives each file's
    training pixels as they come (never all held at once), or None.
    """
    if not root.is_dir():
        raise UserError(f"{root}: source folder not found (ingest.source)")
    entries, counts = _folder_entries(params, root)
    ing = params.ingest
    central = ing.modality == "oct" and ing.oct_frames == "central"
    spec = pixel_cache.prepare_spec(params) if cache is not None else None
    tasks = [
        (str(root / e.source), central, ing.min_size, ing.max_pixels, salt, spec) for e in entries
    ]
    if ray_data.engine(params) == "ray":
        with ray_data.session(params):
            results = ray_data.inspect_files(tasks, inspect)
    else:
        results = parallel_imap(inspect, tasks, ing.workers, desc="ingest")
    images, quarantine = [], []
    for e, r in zip(entries, results, strict=True):
        if r.get("prepared") is not None:
            cache.add(e.source, [i for i, _ in r["frames"]], r["stat"], r["prepared"])
        if "reason" in r:
            quarantine.append(_refused(root, e, r))
        else:
            images += _rows(e, r, salt)
    return Scan(images, quarantine, {**counts, "files": len(entries)})


def _refused(root: Path, e: Entry, result: dict) -> Refused:
    if not (root / e.source).exists():
        return Refused(e.source, "listed but file not found", "listed but file not found")
    return Refused(e.source, result["reason"], result["kind"])


def _rows(e: Entry, result: dict, salt: bytes) -> list[ManifestRow]:
    """The manifest rows of one inspected file, one per frame kept."""
    if e.patient:
        subject = deid.subject_id(e.patient, salt)
    else:
        subject = result["subject_id"] or deid.subject_id("file:" + e.source, salt)
    return [
        ManifestRow(
            image_id=deid.image_id(e.source, frame, salt),
            source=e.source,
            frame=frame,
            label=e.label,
            subject_id=subject,
            eye=e.eye or result["eye"],
            width=result["width"],
            height=result["height"],
            content_hash=digest,
            split=e.split,
            own_subject=not (e.patient or result["subject_id"]),
        )
        for frame, digest in result["frames"]
    ]


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
        images, quarantine = [], []
        for split in keys:
            found, refused = _scan_npz_split(params, path, data, split, salt)
            images += found
            quarantine += refused
    return Scan(images, quarantine, {"files": len(images) + len(quarantine)})


def _scan_npz_split(
    params: Params, path: Path, data: np.lib.npyio.NpzFile, split: str, salt: bytes
) -> tuple[list[ManifestRow], list[Refused]]:
    """One split's array of an .npz: its rows, or all of them refused when too small."""
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
        return [], [Refused(npz_source(split, i), reason, "too small") for i in range(len(arr))]
    rows = []
    for i in range(len(arr)):
        source = npz_source(split, i)
        rows.append(
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
    return rows, []


def _deduplicate(images: list[ManifestRow]) -> tuple[list[ManifestRow], list[dict]]:
    """Keep the first image of each content hash; list the rest with the copy kept."""
    first: dict[str, ManifestRow] = {}
    kept, dups = [], []
    for img in images:
        k = first.get(img.content_hash)
        if k is None:
            first[img.content_hash] = img
            kept.append(img)
        else:
            dups.append(
                {
                    "path": img.source,
                    "frame": img.frame,
                    "label": img.label,
                    "duplicate_of": k.source,
                    "duplicate_of_frame": k.frame,
                    "duplicate_of_label": k.label,
                }
            )
    _warn_conflicts([d for d in dups if d["label"] != d["duplicate_of_label"]])
    return kept, dups


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
    """Scan the source; with the local engine on a folder, fill the prepared-pixel cache too
    (returned open: it is bound to the manifest once that is written)."""
    if is_npz(root) or ray_data.engine(params) == "ray":  # no cache: preprocess decodes
        shutil.rmtree(pixel_cache.cache_dir(params), ignore_errors=True)
        scan = _scan_npz(params, root, salt) if is_npz(root) else _scan_folder(params, root, salt)
        return scan, None
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


def _manifest(kept: list[ManifestRow], modality: str) -> pd.DataFrame:
    """The manifest table of the images kept (MANIFEST_COLUMNS, integer sizes and frames)."""
    own = sum(img.own_subject for img in kept)
    if own:
        log.warning(
            "%d images have no patient ID (no CSV patient_id, DICOM PatientID or "
            "ingest.patient_pattern match): each is its own subject",
            own,
        )
    manifest = pd.DataFrame([asdict(img) for img in kept], columns=MANIFEST_COLUMNS)
    manifest["modality"] = modality
    for col in ("frame", "width", "height"):
        manifest[col] = manifest[col].astype("int64")
    return manifest


def _report(
    params: Params, root: Path, scan: Scan, manifest: pd.DataFrame, dups: list[dict]
) -> dict:
    """The stage's counts (``paths.ingest_report``): found = ingested + quarantined + duplicates."""
    labels = manifest["label"].value_counts(dropna=False)
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
        "subjects": int(manifest["subject_id"].nunique()),
        "labels": {str(k) if isinstance(k, str) else "null": int(v) for k, v in labels.items()},
        "quarantine_reasons": dict(sorted(reasons.items())),
        "duplicate_label_conflicts": sum(d["label"] != d["duplicate_of_label"] for d in dups),
    }


def ingest(params: Params) -> dict:
    """Run the stage: write manifest, quarantine, duplicates and report (all of them, also when
    the stage then refuses the result); return the report."""
    root, p = source_root(params), params.paths
    scan, cache = _scan(params, root, deid.resolve_salt(params.ingest.salt))
    kept, dups = _deduplicate(scan.images)
    quarantine = pd.DataFrame(
        [(q.path, q.reason) for q in scan.quarantine], columns=["path", "reason"]
    )
    write_table(p.quarantine, quarantine)
    write_table(p.duplicates, pd.DataFrame(dups, columns=DUPLICATE_COLUMNS))
    manifest = _manifest(kept, params.ingest.modality)
    write_table(p.manifest, manifest)
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
        manifest["label"].nunique(),
    )
    _refuse_if_bad(root, params, report)
    return report


def _refuse_if_bad(root: Path, params: Params, report: dict) -> None:
    """The stage's verdict, after every output is written: the quarantine list and report the
    error points at are this run's, never beside a manifest of an earlier run."""
    found, refused = report["found"], report["quarantined"]
    limit = params.ingest.max_quarantine_fraction
    if not report["ingested"]:
        reasons = Counter(report["quarantine_reasons"])
        why = f" (most common: {reasons.most_common(1)[0][0]})" if reasons else ""
        raise UserError(
            f"{root}: no usable image: {refused} of {found} quarantined"
            f"{why}, {report['duplicates']} duplicates; see {params.paths.quarantine}"
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
