"""The label sheet of a folder source (``ingest.labels``): read it, name its columns, and find
the file each row means.

A sheet is a CSV, TSV or Excel ``.xlsx`` file with one row per image, as public datasets ship
them: any column names (``ingest.path_column``, ``label_column``, ``patient_column``,
``eye_column``; matched without regard to case or surrounding spaces), a UTF-8 byte-order mark,
CRLF line ends, and the empty rows and columns Excel leaves are all accepted. A row's path may
be a path relative to the source, a bare file name anywhere in the source tree, or either one
without its suffix (EyePACS ``10_left``, APTOS ``000c1434d8d7``, IDRiD ``IDRiD_001``): it then
matches the one file of that stem, and a stem that two files share is a one-line error.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.errors import UserError
from pipeline.params import IngestParams

# what each canonical column of a read sheet holds, and the params key that names it
ROLES = {"path": "path_column", "label": "label_column", "patient_id": "patient_column"}
ROLES |= {"eye": "eye_column"}
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
EXCEL = (".xlsx", ".xlsm")


def _header(name: object) -> str:
    """A column name as compared: no BOM, no surrounding spaces, lower case."""
    return str(name).replace("\ufeff", "").strip().lower()


def _raw(path: Path) -> pd.DataFrame:
    """Every cell of the sheet as text ('' when empty), header names as :func:`_header` makes
    them; one line when the file cannot be read."""
    if not path.is_file():
        raise UserError(f"{path}: labels file not found (ingest.labels)")
    suffix = path.suffix.lower()
    if suffix == ".xls":
        raise UserError(f"{path}: Excel 97 .xls is not read; save it as .xlsx or .csv")
    try:
        if suffix in EXCEL:
            df = pd.read_excel(path, dtype=str, keep_default_na=False, engine="openpyxl")
        else:
            sep = "\t" if suffix == ".tsv" else ","
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (ValueError, OSError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise UserError(f"{path}: not a readable CSV/TSV/.xlsx ({type(exc).__name__})") from None
    df.columns = [_header(c) for c in df.columns]
    df.index = df.index + 2  # the sheet's line number: line 1 is the header
    df = df.map(lambda v: str(v).strip())
    return df[(df != "").any(axis=1)]  # rows Excel left empty are no rows


def read_sheet(path: Path, ing: IngestParams, root: Path, named: bool = True) -> pd.DataFrame:
    """The label sheet as columns ``path, label, patient_id, eye, split, severity`` (text, '' when
    empty), indexed by sheet line. ``named``: columns as ``ing`` names them (else the
    built-in names, as the demo's labels.csv has them).

    Raises UserError (one line) for an unreadable file, a missing path column or a column
    named in params but absent, an empty path, a path outside ``root`` or an unknown split.
    """
    df = _raw(path)
    out = pd.DataFrame(index=df.index)
    for role, key in ROLES.items():
        name = getattr(ing, key) if named else role
        if _header(name) in df.columns:
            out[role] = df[_header(name)]
        elif role == "path" or _header(name) != role:  # a default name may be absent
            found = ", ".join(df.columns) or "none"
            raise UserError(f"{path}: no column {name!r} (ingest.{key}; found {found})")
        else:
            out[role] = ""
    split = (ing.split_column if named else "split") or ""  # null: the sheet's split ignored
    out["split"] = df[_header(split)] if split and _header(split) in df.columns else ""
    out["severity"] = df["severity"] if "severity" in df.columns else ""
    out["path"] = _paths(path, out["path"], root)
    _check(path, out)
    return out


def relative(root: Path, value: str) -> str | None:
    """A sheet's path (relative to ``root`` or absolute; ``/`` or ``\\``) as a normalised posix
    path relative to ``root``, or None when it leads outside. Judged on the path as listed:
    ``.`` and ``..`` are folded by their text and no link is followed, so a symlinked file
    inside the source is inside, as the folder walk lists it (its target may be anywhere). An
    absolute path that reaches ``root`` only through a link in the folders above (``/data`` a
    link to ``/mnt/data``) is judged against ``root``'s real path instead."""
    text = value.replace("\\", "/")
    top = os.path.abspath(root)
    full = os.path.normpath(os.path.join(top, text))  # an absolute ``text`` replaces ``top``
    rel = os.path.relpath(full, top)
    if _outside(rel) and os.path.isabs(text):
        real = os.path.join(os.path.realpath(os.path.dirname(full)), os.path.basename(full))
        rel = os.path.relpath(real, os.path.realpath(top))
    return None if _outside(rel) else rel.replace(os.sep, "/")


def _outside(rel: str) -> bool:
    return rel == os.pardir or rel.startswith(os.pardir + os.sep)


def _paths(path: Path, values: pd.Series, root: Path) -> list[str]:
    """Each row's path made relative to ``root`` by :func:`relative`; one line for an empty
    path or one outside the source."""
    out = []
    for n, value in values.items():
        if not value:
            raise UserError(f"{path}: line {n}: empty path")
        rel = relative(root, value)
        if rel is None:
            raise UserError(f"{path}: line {n}: path {value!r} is outside the source folder {root}")
        out.append(rel)
    return out


def _check(path: Path, table: pd.DataFrame) -> None:
    for n, value in table["split"].items():
        if value and value.lower() not in SPLIT_ALIASES:
            raise UserError(f"{path}: line {n}: split {value!r} is not train, val or test")
    for n, value in table["severity"].items():
        if value and not _is_number(value):
            raise UserError(f"{path}: line {n}: severity {value!r} is not a number")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


class FileIndex:
    """The image files of a source, found by relative path, by bare name, or by either one
    without its suffix."""

    def __init__(self, root: Path, files: Iterable[str]) -> None:
        self.root = root
        self.files: set[str] = set()
        self._by_key: dict[str, set[str]] = defaultdict(set)
        for rel in files:
            self.files.add(rel)
            name = posixpath.basename(rel)
            for key in (rel, posixpath.splitext(rel)[0], name, posixpath.splitext(name)[0]):
                self._by_key[key].add(rel)

    def find(self, value: str) -> list[str]:
        """The files ``value`` may mean (sorted): itself when it exists (a folder, other
        non-image or link to a missing file then is quarantined with its reason), else every
        image file whose path, name or stem it is."""
        if value in self.files or os.path.lexists(os.path.join(self.root, value)):
            return [value]
        return sorted(self._by_key.get(value, ()))

    def other_suffix(self, value: str) -> bool:
        """Whether a file of ``value``'s stem exists with another suffix (``a.png`` listed,
        ``a.jpg`` on disk)."""
        stem, suffix = posixpath.splitext(value)
        return bool(suffix) and bool(self._by_key.get(stem))


@dataclass(frozen=True)
class Listing:
    """A sheet matched to the files: ``table`` holds the rows that name a file (``path`` now
    that file), first row of each file kept; the rest is counted."""

    table: pd.DataFrame
    missing: list[str]  # sheet values that name no file
    other_suffix: int  # of those, how many exist with another suffix
    unlisted: int  # image files on disk that no row names
    repeated: int  # rows naming a file an earlier row named


def match(path: Path, table: pd.DataFrame, index: FileIndex, candidates: int) -> Listing:
    """Resolve each row's path against ``index`` (``candidates``: image files on disk).

    Raises UserError (one line) when a row's name matches several files.
    """
    resolved, missing = [], []
    for n, value in table["path"].items():
        hits = index.find(value)
        if len(hits) > 1:
            shown = ", ".join(hits[:3]) + (", ..." if len(hits) > 3 else "")
            raise UserError(
                f"{path}: line {n}: {value!r} matches {len(hits)} files ({shown}); "
                "give its suffix or folder"
            )
        resolved.append(hits[0] if hits else None)
        if not hits:
            missing.append(value)
    table = table.assign(path=resolved)[[r is not None for r in resolved]]
    repeated = table["path"].duplicated()
    table = table[~repeated]
    listed = index.files & set(table["path"])
    return Listing(
        table=table,
        missing=missing,
        other_suffix=sum(index.other_suffix(v) for v in missing),
        unlisted=candidates - len(listed),
        repeated=int(repeated.sum()),
    )
