"""The label sheet of a folder source (``ingest.labels``): read it, name its columns, and find
the file each row means.

A sheet is a CSV, TSV or Excel (``.xlsx``, or Excel 97 ``.xls``, as Messidor ships its grades)
file with one row per image, as public datasets ship
them: any column names (``ingest.path_column``, ``label_column``, ``patient_column``,
``eye_column``; matched without regard to case or surrounding spaces), a UTF-8 byte-order mark,
CRLF line ends, and the empty rows and columns Excel leaves are all accepted, and so are the
files spreadsheet programs save (:func:`_raw`): UTF-16 text, legacy Windows-1252, ``;``/tab/``|``
delimiters, title rows above the header, the labels on a later worksheet. A row's path may
be a path relative to the source, a bare file name anywhere in the source tree, or either one
without its suffix (EyePACS ``10_left``, APTOS ``000c1434d8d7``, IDRiD ``IDRiD_001``): it then
matches the one file of that stem, and a stem that two files share is a one-line error; a name
no file has exactly matches without regard to case (:meth:`FileIndex.find`).
Cells are stripped, missing markers (``nan``, ``#N/A`` ...) are empty; in a label column of
numbers each is written in its canonical form (``01``, ``+1``, ``1.0``, ``1e0`` are ``1``,
``1.50`` is ``1.5``: one class per number), while patient IDs keep their leading zeros
(``007`` and ``7`` are different patients in real registries; only Excel's ``7.0`` is ``7``).
Rows naming one file are merged, or, when they disagree, the file is left out with its reason
(ingest quarantines it). Errors name the file's own line.
"""

from __future__ import annotations

import codecs
import csv
import datetime
import io
import logging
import math
import os
import posixpath
import re
import unicodedata
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import pandas as pd

from pipeline import readers
from pipeline.errors import UserError
from pipeline.params import IngestParams

log = logging.getLogger("retina_vae.ingest")

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
# the signatures that tell a workbook from text, whatever the suffix says (an .xlsx saved as
# .xls, a CSV named .xls): an Excel 97 file is an OLE2 compound file, an .xlsx a zip
OLE2_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
ZIP_MAGIC = b"PK\x03\x04"
# what reading a damaged sheet raises (csv, openpyxl and the zip file an .xlsx is)
UNREADABLE = (ValueError, OSError, KeyError, csv.Error, zipfile.BadZipFile)
# cells that mean "no value" (pandas' and Excel's markers, compared without regard to case);
# not 'None', a grade's name in some sheets ("no retinopathy")
MISSING = {"nan", "-nan", "na", "n/a", "#n/a", "#n/a n/a", "#na", "<na>", "null", "nat"}
MISSING |= {"1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan"}
# the error values a spreadsheet saves for a formula that failed (#N/A is in MISSING): read as
# empty, counted in one warning
ERRORS = {"#div/0!", "#value!", "#ref!", "#name?", "#num!", "#null!", "#getting_data"}
ERRORS |= {"#spill!", "#calc!", "#field!", "#blocked!", "#connect!", "#busy!", "#unknown!"}
ERRORS |= {"#python!", "#external!"}
# the columns whose cells may be missing
VALUES = ("label", "patient_id", "eye", "split", "severity")


def _header(name: object) -> str:
    """A column name as compared: no BOM, no surrounding spaces, lower case."""
    return str(name).replace("\ufeff", "").strip().lower()


def _raw(path: Path, wanted: str | None = None) -> pd.DataFrame:
    """Every cell of the sheet as stripped text ('' when empty), header names as
    :func:`_header` makes them, indexed by the row's line in the file (CSV/TSV: the line its
    record starts on, blank lines and multi-line cells counted; .xlsx: the row number); rows
    left empty are no rows. One line when the file cannot be read.

    ``wanted``: the path column's name (as :func:`_header` makes it). The header is the first
    of the sheet's first :data:`HEAD_ROWS` rows that names it (title rows and merged group
    cells above a header are skipped), a CSV's delimiter the one that makes a header name it
    (:data:`DELIMITERS`: Excel writes ``;`` where the decimal mark is a comma), an .xlsx's
    worksheet the first whose header names it; failing that, the first row, the suffix's
    delimiter and the first worksheet (and the error then says the column is missing)."""
    if not path.is_file():
        raise UserError(f"{path}: labels file not found (ingest.labels)")
    unsaved: dict[int, int] = {}  # column index -> first row of a formula without a value
    delimiter = None
    try:
        with path.open("rb") as f:
            magic = f.read(8)
        if magic.startswith(ZIP_MAGIC):
            records, unsaved = _xlsx_records(path, wanted)
        elif magic == OLE2_MAGIC:
            records = _xls_records(path, wanted)
        else:
            records, delimiter = _csv_records(path, path.suffix.lower(), wanted)
    except UNREADABLE as exc:
        raise UserError(
            f"{path}: not a readable CSV/TSV/Excel sheet ({type(exc).__name__})"
        ) from None
    records = _filled(records)
    if not records:
        raise UserError(f"{path}: not a readable CSV/TSV/Excel sheet (no header row)")
    start = _header_row(records, wanted) or 0
    if start:
        log.info(
            "%s: the header naming %r is on line %d; the %d rows above it (titles, group "
            "headings) are not read",
            path,
            wanted,
            records[start][0],
            start,
        )
    (_, header), body = records[start], records[start + 1 :]
    width = len(header)
    for n, record in body:
        if any(record[width:]):
            raise UserError(f"{path}: line {n}: {len(record)} values, but the header names {width}")
    rows = [(record + [""] * width)[:width] for _, record in body]
    names = _names(header)
    df = pd.DataFrame(rows, columns=names, index=[n for n, _ in body], dtype=object)
    df.attrs["unsaved"] = {names[j]: n for j, n in unsaved.items() if j < width}
    df.attrs["delimiter"] = delimiter
    return df


# how many of a sheet's first rows (empty ones not counted) may hold its header
HEAD_ROWS = 10
# the delimiters a CSV/TSV is tried with, after its suffix's own: Excel's "CSV" is ``;``
# where the decimal mark is a comma, its "Unicode text" (.txt) is tab-separated
DELIMITERS = (",", ";", "\t", "|")


def _filled(records: Iterable[tuple[int, list[str]]]) -> list[tuple[int, list[str]]]:
    """The records with their cells stripped, empty ones left out."""
    records = ((n, [c.strip() for c in r]) for n, r in records)
    return [(n, r) for n, r in records if any(r)]


def _header_row(records: list[tuple[int, list[str]]], wanted: str | None) -> int | None:
    """The index of the first of the first :data:`HEAD_ROWS` filled records that has a cell
    named ``wanted`` (as :func:`_header` makes it), or None."""
    if wanted is None:
        return None
    for i, (_, record) in enumerate(_filled(records)[:HEAD_ROWS]):
        if wanted in map(_header, record):
            return i
    return None


def _csv_records(
    path: Path, suffix: str, wanted: str | None = None
) -> tuple[list[tuple[int, list[str]]], str]:
    """(line the record starts on, its cells) for each record of a CSV/TSV/.txt (text as
    :func:`_decode` reads it), and the delimiter: the suffix's own (tab for .tsv, else
    comma), or the first of :data:`DELIMITERS` whose header row names ``wanted``."""
    text = _decode(path)
    default = "\t" if suffix == ".tsv" else ","
    for delimiter in dict.fromkeys((default, *DELIMITERS)):
        head = _csv_parse(text, delimiter, rows=HEAD_ROWS * 4)
        if _header_row(head, wanted) is not None:
            return _csv_parse(text, delimiter), delimiter
    return _csv_parse(text, default), default


def _csv_parse(text: str, delimiter: str, rows: int | None = None) -> list[tuple[int, list[str]]]:
    """(line the record starts on, its cells) for each record (the first ``rows`` only)."""
    out, line = [], 1
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    for record in reader:
        out.append((line, record))
        line = reader.line_num + 1  # lines read so far: a quoted cell may hold line ends
        if rows is not None and len(out) >= rows:
            break
    return out


# byte-order marks and their codecs (UTF-32's before UTF-16's: it starts with the same bytes)
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _decode(path: Path) -> str:
    """A text sheet's text as the program that saved it wrote it: UTF-8/16/32 by its byte-order
    mark (Excel's "CSV UTF-8" and "Unicode text"), else UTF-8, else the Windows code page
    Excel's plain "CSV" is in west-European locales (cp1252, Latin-1 where it has no
    character), with one warning."""
    data = path.read_bytes()
    for bom, codec in BOMS:
        if data.startswith(bom):
            return data.decode(codec)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    log.warning(
        "%s: not UTF-8: read as Windows-1252 (Excel's plain CSV in western Europe); if its "
        'accented letters read wrong, save it as "CSV UTF-8"',
        path,
    )
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _xlsx_records(
    path: Path, wanted: str | None = None
) -> tuple[list[tuple[int, list[str]]], dict[int, int]]:
    """(row number, its cells as text) for each row of the workbook's first sheet (the values
    of formulas as the spreadsheet program that last saved it computed them), and, per
    column index (0-based), the first row whose cell is a formula without such a saved
    value: a workbook written by a script (openpyxl, pandas) and never opened and saved in
    Excel or LibreOffice holds none, and its cells would read as empty."""
    sheet = _xlsx_sheet(path, wanted)
    formulas = {
        (cell.row, cell.column)
        for row in _xlsx_rows(path, data_only=False, sheet=sheet)
        for cell in row
        if cell.data_type == "f"
    }
    records, unsaved = [], {}
    for n, row in enumerate(_xlsx_rows(path, data_only=True, sheet=sheet), 1):
        records.append((n, [_cell_text(c.value) for c in row]))
        for j, cell in enumerate(row):
            # a saved empty text result is <v></v> typed "str"; a formula never computed has
            # no typed value at all
            if (n, j + 1) in formulas and cell.value is None and cell.data_type != "str":
                unsaved.setdefault(j, n)
    return records, unsaved


def _cell_text(value: object) -> str:
    """An .xlsx cell's value as a CSV export of the sheet writes it: '' for none, ``TRUE`` /
    ``FALSE``, a date in ISO form (``2020-01-02``; with its time only when not midnight)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, datetime.datetime) and value.time() == datetime.time():
        return value.date().isoformat()
    return str(value)  # a datetime with its time as "2020-01-02 13:00:00", as CSV exports do


def _xlsx_book(path: Path, data_only: bool):
    """The workbook, read-only; ValueError when it is not one."""
    import openpyxl  # here: only an .xlsx sheet pays for its import
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        # from its bytes: openpyxl refuses a file by its name's suffix (an .xlsx saved as .xls)
        return openpyxl.load_workbook(
            io.BytesIO(path.read_bytes()), read_only=True, data_only=data_only
        )
    except InvalidFileException:
        raise ValueError("not an Excel workbook") from None


def _xlsx_sheet(path: Path, wanted: str | None) -> int:
    """The index of the .xlsx worksheet to read (:func:`_pick_sheet`)."""
    if wanted is None:
        return 0
    book = _xlsx_book(path, data_only=True)
    try:
        heads = []
        for sheet in book.worksheets:
            sheet.reset_dimensions()
            rows = sheet.iter_rows(max_row=HEAD_ROWS * 4, values_only=True)
            heads.append(
                (sheet.title, [(n, [_cell_text(v) for v in r]) for n, r in enumerate(rows)])
            )
    finally:
        book.close()
    return _pick_sheet(path, wanted, heads)


def _pick_sheet(path: Path, wanted: str, heads: list[tuple[str, list]]) -> int:
    """The index of the worksheet to read, given each one's (title, first rows as
    :func:`_header_row` takes them): the first whose first rows hold a header naming
    ``wanted`` (a workbook may open on a read-me or summary sheet), else the first. One log
    line when it is not the first; one warning when later worksheets name it too (their rows
    are not read: their images count as unlisted)."""
    naming = [
        (i, title) for i, (title, head) in enumerate(heads) if _header_row(head, wanted) is not None
    ]
    if not naming:
        return 0
    (index, title), more = naming[0], naming[1:]
    if index:
        log.info("%s: read worksheet %r, the first whose header names %r", path, title, wanted)
    if more:
        log.warning(
            "%s: %d more worksheets (%s) have a column %r: only worksheet %r is read",
            path,
            len(more),
            ", ".join(repr(t) for _, t in more),
            wanted,
            title,
        )
    return index


def _xlsx_rows(path: Path, data_only: bool, sheet: int = 0) -> list[tuple]:
    """The cells of each row of the workbook's worksheet ``sheet`` (openpyxl's read-only
    cells); ``data_only``: formulas' saved values, else the formulas (``data_type`` ``"f"``)."""
    book = _xlsx_book(path, data_only)
    try:
        ws = book.worksheets[sheet]
        ws.reset_dimensions()  # read-only mode trusts the stored extent, often stale
        return list(ws.iter_rows(min_row=1))
    finally:
        book.close()


def _xls_records(path: Path, wanted: str | None = None) -> list[tuple[int, list[str]]]:
    """(row number, its cells as text, :func:`_xls_text`) for each row of an Excel 97 ``.xls``
    workbook's worksheet that names ``wanted`` (:func:`_pick_sheet`); an .xls always holds its
    formulas' computed values. ValueError when it is not a readable workbook."""
    sheets = _xls_sheets(path)
    index = 0
    if wanted is not None:
        heads = [(title, list(enumerate(rows[: HEAD_ROWS * 4]))) for title, rows in sheets]
        index = _pick_sheet(path, wanted, heads)
    return [(n, cells) for n, cells in enumerate(sheets[index][1] if sheets else [], 1)]


def _xls_sheets(path: Path) -> list[tuple[str, list[list[str]]]]:
    """Each worksheet's (title, rows of cell texts), read by xlrd with its diagnostics (printed
    to stdout by default) discarded. ValueError when the workbook cannot be read."""
    import xlrd  # here: only an .xls sheet pays for its import

    try:
        book = xlrd.open_workbook(path, logfile=io.StringIO())
        try:
            return [
                (s.name, [[_xls_text(c, book.datemode) for c in s.row(r)] for r in range(s.nrows)])
                for s in book.sheets()
            ]
        finally:
            book.release_resources()
    except Exception as exc:  # xlrd fails on a damaged file with whatever its parser hit
        raise ValueError(f"damaged Excel 97 workbook ({type(exc).__name__})") from None


def _xls_text(cell, datemode: int) -> str:
    """An .xls cell (xlrd) as a CSV export of the sheet writes it: every number is stored as a
    float, so an integral one is written without ``.0`` (grade ``2``, not ``2.0``); dates, booleans
    as :func:`_cell_text`; an error value as its text (``#DIV/0!``), read as empty later."""
    import xlrd

    if cell.ctype == xlrd.XL_CELL_NUMBER:
        return str(int(cell.value)) if float(cell.value).is_integer() else repr(cell.value)
    if cell.ctype == xlrd.XL_CELL_DATE:
        return _cell_text(xlrd.xldate_as_datetime(cell.value, datemode))
    if cell.ctype == xlrd.XL_CELL_BOOLEAN:
        return _cell_text(bool(cell.value))
    if cell.ctype == xlrd.XL_CELL_ERROR:
        return xlrd.error_text_from_code.get(cell.value, "#N/A")
    return str(cell.value)  # text; '' for empty and blank cells


def _names(header: list[str]) -> list[str]:
    """Column names as :func:`_header` makes them; an empty one ``unnamed: i``, a repeated one
    ``name.1``, ``name.2``... (as pandas names them)."""
    out: list[str] = []
    for i, name in enumerate(header):
        name = _header(name) or f"unnamed: {i}"
        base, k = name, 0
        while name in out:
            k += 1
            name = f"{base}.{k}"
        out.append(name)
    return out


def read_sheet(path: Path, ing: IngestParams, root: Path, named: bool = True) -> pd.DataFrame:
    """The label sheet as columns ``path, label, patient_id, eye, split, severity`` (text, '' when
    empty), indexed by sheet line. ``named``: columns as ``ing`` names them (else the
    built-in names, as the demo's labels.csv has them).

    Raises UserError (one line) for an unreadable file, a missing path column or a column
    named in params but absent, a column read holding formulas without a saved value (.xlsx),
    a sheet without rows, an empty path, a path outside ``root`` or an unknown split.
    """
    df = _raw(path, _header(ing.path_column if named else "path"))
    out = pd.DataFrame(index=df.index)
    taken = {}  # role -> the sheet's column read for it
    for role, key in ROLES.items():
        name = getattr(ing, key) if named else role
        if _header(name) in df.columns:
            taken[role] = _header(name)
        elif role == "path" or _header(name) != role:  # a default name may be absent
            raise UserError(f"{path}: {_no_column(name, key, len(df.columns))}")
    if df.empty:  # a header and nothing, or only the empty rows a spreadsheet leaves
        raise UserError(f"{path}: no rows below the header (one row per image is expected)")
    split = (ing.split_column if named else "split") or ""  # null: the sheet's split ignored
    if split and _header(split) in df.columns:
        taken["split"] = _header(split)
    if "severity" in df.columns:
        taken["severity"] = "severity"
    _refuse_unsaved(path, df, taken.values())
    for role in (*ROLES, "split", "severity"):
        out[role] = df[taken[role]] if role in taken else ""
    _warn_errors(out[list(VALUES)])
    if df.attrs.get("delimiter") == ";":  # a decimal-comma locale's CSV: 1,5 is 1.5
        for role in ("label", "severity"):
            out[role] = _decimal_commas(out[role])
    for role in VALUES:
        out[role] = _values(out[role], NUMBERED.get(role))
    out["path"] = _paths(path, out["path"], root)
    _check(path, out)
    return out


def _warn_errors(table: pd.DataFrame) -> None:
    """One warning counting the spreadsheet error values (:data:`ERRORS`) by kind; neither the
    sheet's rows nor any file is named. :func:`_values` reads them as empty."""
    kinds = Counter(v.upper() for v in table.to_numpy().ravel() if v.casefold() in ERRORS)
    if kinds:
        log.warning(
            "label sheet: %d cells hold a spreadsheet error value (%s): read as empty "
            "(fix the formulas and save the sheet again to use them)",
            kinds.total(),
            ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())),
        )


def _no_column(name: str, key: str, width: int) -> str:
    """The reason a column named in params is absent. The first row's cells are not shown: in
    a sheet without a header row they are a patient's data (file name, name, ID)."""
    return (
        f"no column {name!r} (ingest.{key}) among the {width} columns of the first row, "
        "which must be a header naming them"
    )


def _refuse_unsaved(path: Path, df: pd.DataFrame, read: Iterable[str]) -> None:
    """One line when a column the stage reads holds a formula without a saved value
    (:func:`_xlsx_records`): its cells would be read as empty, every image silently
    unlabelled or a path empty. Formulas in other columns are fine."""
    unsaved = df.attrs.get("unsaved", {})
    for name in read:
        if name in unsaved:
            raise UserError(
                f"{path}: column {name!r}, row {unsaved[name]}: formulas without a saved "
                "value: open and save the sheet in Excel or LibreOffice, or export CSV"
            )


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
    """Each row's path made relative to ``root`` by :func:`relative`, or, for a path rooted
    at the dataset's own top folder, by :func:`rooted`; one line for an empty path or one
    outside the source."""
    out, anchored = [], 0
    for n, value in values.items():
        if not value:
            raise UserError(f"{path}: line {n}: empty path")
        rel = relative(root, value)
        if rel is None:
            rel = rooted(root, value)
            anchored += rel is not None
        if rel is None:
            raise UserError(f"{path}: line {n}: path {value!r} is outside the source folder {root}")
        out.append(rel)
    if anchored:
        log.info(
            "%s: %d paths start at the dataset's top folder (a leading / or \\, not a file on "
            "this machine): read as the file under %s they end with",
            path,
            anchored,
            root,
        )
    return out


def rooted(root: Path, value: str) -> str | None:
    """A path written from the top of the dataset as its makers had it (OLIVES'
    ``/TREX DME/GILA/0201GOD/V1/OD/1.tif``, DeepDRiD's
    ``\\regular-fundus-training\\Images\\1\\1_l1.jpg``) as its longest tail naming a file
    under ``root``; None when it is no such path, a file on this machine, holds ``..``, or no
    tail of it is under ``root``."""
    text = value.replace("\\", "/")
    if not text.startswith("/") or os.path.lexists(text):
        return None
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    for i in range(len(parts)):
        tail = "/".join(parts[i:])
        if os.path.lexists(os.path.join(root, tail)):
            return tail
    return None


def _decimal_commas(column: pd.Series) -> pd.Series:
    """A column of a ``;``-separated sheet whose cells are all numbers written with a decimal
    comma (``1,5``, ``2,0``) or plain numbers, with a decimal point instead; else as it is."""
    filled = [v for v in column if v and v.casefold() not in MISSING | ERRORS]
    pointed = [v.replace(",", ".", 1) if v.count(",") == 1 else v for v in filled]
    if not any("," in v for v in filled) or not all(map(_is_number, pointed)):
        return column
    return column.map(lambda v: v.replace(",", ".", 1) if _is_number(v.replace(",", ".", 1)) else v)


def _check(path: Path, table: pd.DataFrame) -> None:
    for n, value in table["split"].items():
        if value and value.lower() not in SPLIT_ALIASES:
            raise UserError(f"{path}: line {n}: split {value!r} is not train, val or test")
    for n, value in table["eye"].items():
        if value and readers.normalise_eye(value) is None:
            raise UserError(
                f"{path}: line {n}: eye {value!r} is not R/L, OD/OS or right/left "
                "(ingest.eye_column; a sheet coding eyes otherwise, such as 1/2, needs them "
                "written out first)"
            )
    for n, value in table["severity"].items():
        if value and not _is_number(value):
            raise UserError(f"{path}: line {n}: severity {value!r} is not a number")


def _values(column: pd.Series, numbered: Callable[[str], str] | None = None) -> pd.Series:
    """A column's cells with the missing markers and error values (:data:`MISSING`,
    :data:`ERRORS`) made '' and, when every
    other cell is a number, each written as ``numbered`` makes it (:data:`NUMBERED`: a
    label's canonical number, a patient ID's integral float as the integer)."""
    column = column.mask(column.str.casefold().isin(MISSING | ERRORS), "")
    filled = column[column != ""]
    if numbered is None or not len(filled) or not all(map(_is_number, filled)):
        return column
    return column.map(lambda text: numbered(text) if text else text)


def _canonical(text: str) -> str:
    """A number cell in one form per number, exactly (decimal, no float rounding): ``01``,
    ``+1``, ``1.0``, ``1e0`` -> ``1``; ``1.50`` -> ``1.5``; ``-0`` -> ``0``; ``1e2`` -> ``100``.
    So a grade is one class however the sheet wrote it."""
    try:
        value = Decimal(text).normalize()
    except InvalidOperation:  # not reached for a cell _is_number accepts: as written
        return text
    return "0" if value.is_zero() else format(value, "f")


def _integral(text: str) -> str:
    """A patient ID that is a number: an integral float (Excel's ``7.0``, ``7e0``) as the
    integer (``7``); an integer kept as written (``007`` and ``7`` are different patients in
    registries that number them with leading zeros), so is any other number."""
    if not text.lstrip("+-").isdigit() and float(text).is_integer():
        return str(int(float(text)))
    return text


# how each column's cells are written when every one is a number (others: as written)
NUMBERED: dict[str, Callable[[str], str]] = {"label": _canonical, "patient_id": _integral}


# a number as a spreadsheet or CSV writes one: ASCII digits, an optional sign, fraction and
# exponent; not Python's digit-group underscores (``1_0``), other scripts' digits, ``inf``, hex
NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _is_number(text: str) -> bool:
    """Whether a cell is a finite number in plain ASCII decimal notation (:data:`NUMBER`)."""
    return NUMBER.fullmatch(text) is not None and math.isfinite(float(text))


class FileIndex:
    """The image files of a source, found by relative path, by bare name, or by either one
    without its suffix."""

    def __init__(self, root: Path, files: Iterable[str]) -> None:
        self.root = root
        self.files: set[str] = set()
        self._by_key: dict[str, set[str]] = defaultdict(set)
        self._by_folded: dict[str, set[str]] = defaultdict(set)  # the keys by :func:`_fold`
        for rel in files:
            self.files.add(rel)
            name = posixpath.basename(rel)
            for key in (rel, posixpath.splitext(rel)[0], name, posixpath.splitext(name)[0]):
                self._by_key[key].add(rel)
                self._by_folded[_fold(key)].add(rel)

    def find(self, value: str) -> list[str]:
        """The files ``value`` may mean (sorted): itself when it exists (a folder, other
        non-image or link to a missing file then is quarantined with its reason), else every
        image file whose path, name or stem it is; failing that, every one whose path, name
        or stem it is without regard to case or Unicode normal form (sheets made on Windows or
        macOS, whose file systems ignore case: ``IM002385.jpg`` for ``IM002385.JPG``; a typed
        ``Müller.jpg`` for a name macOS or a zip made there stored decomposed); failing that,
        for an integral float (``12.0``: an ID column a program read as floats), the
        integer's."""
        if value in self.files or os.path.lexists(os.path.join(self.root, value)):
            return [value]
        hits = self._by_key.get(value) or self._by_folded.get(_fold(value))
        if not hits and INTEGRAL_FLOAT.fullmatch(value):
            return self.find(value.split(".")[0])
        return sorted(hits or ())

    def other_suffix(self, value: str) -> bool:
        """Whether a file of ``value``'s stem exists with another suffix (``a.png`` listed,
        ``a.jpg`` on disk)."""
        stem, suffix = posixpath.splitext(value)
        return bool(suffix) and bool(self._by_folded.get(_fold(stem)))


def _fold(name: str) -> str:
    """``name`` case-folded and in Unicode normal form C, so the same name typed (composed:
    ``ü``) and stored decomposed (``u`` + combining diaeresis, as macOS and zips made there
    write it) or in another case are one key."""
    return unicodedata.normalize("NFC", name.casefold())


# a file ID written as a float by a program that read the column as numbers (``12.0``)
INTEGRAL_FLOAT = re.compile(r"[0-9]+\.0+")


@dataclass(frozen=True)
class Listing:
    """A sheet matched to the files: ``table`` holds one row per file named (``path`` now that
    file; where several rows name it, their values merged into the first); the rest is
    counted."""

    table: pd.DataFrame
    missing: list[str]  # sheet values that name no file
    other_suffix: int  # of those, how many exist with another suffix
    unlisted: int  # image files on disk that no row names
    repeated: int  # rows naming a file an earlier row named, without contradicting it
    conflicts: dict[str, str]  # file -> reason: rows naming it disagree (not in ``table``)


# what a file's rows may not disagree on, as each is compared and named in a reason
COMPARED = {
    "label": ("labels", str),
    "patient_id": ("patient IDs", str),
    "eye": ("eyes", lambda v: readers.normalise_eye(v) or v),
    "split": ("splits", lambda v: SPLIT_ALIASES.get(v.lower(), v)),
    "severity": ("severities", float),
}
SECRET = ("patient_id",)  # never in a reason: only how many values disagree


def match(path: Path, table: pd.DataFrame, index: FileIndex, candidates: int) -> Listing:
    """Resolve each row's path against ``index`` (``candidates``: image files on disk).

    Raises UserError (one line) when a row's name matches several files.
    """
    resolved, missing = [], []
    for n, value in table["path"].items():
        hits = index.find(value)
        if len(hits) > 1:  # the files' names (folders may be patients') are not shown
            raise UserError(
                f"{path}: line {n}: {value!r} matches {len(hits)} files; give its suffix or folder"
            )
        resolved.append(hits[0] if hits else None)
        if not hits:
            missing.append(value)
    table = table.assign(path=resolved).loc[[r is not None for r in resolved]]
    table, repeated, conflicts = _merge_repeats(table)
    listed = index.files & (set(table["path"]) | set(conflicts))
    return Listing(
        table=table,
        missing=missing,
        other_suffix=sum(index.other_suffix(v) for v in missing),
        unlisted=candidates - len(listed),
        repeated=repeated,
        conflicts=conflicts,
    )


def _merge_repeats(table: pd.DataFrame) -> tuple[pd.DataFrame, int, dict[str, str]]:
    """One row per file: the rows naming a file again merged into its first (an empty cell
    gives way to a filled one), or, where they disagree, the file taken out with the reason.
    Returns (table, rows merged away, {file: reason})."""
    again = table["path"].duplicated(keep=False)
    first = table[~table["path"].duplicated()]
    if not again.any():
        return first, 0, {}
    merged, conflicts, repeated = {}, {}, 0
    for file, rows in table[again].groupby("path", sort=False):
        values, reasons = {}, []
        for column, (what, key) in COMPARED.items():
            seen = list(dict.fromkeys(v for v in rows[column] if v))  # in sheet order
            if len({key(v) for v in seen}) > 1:
                shown = f"{len(seen)} different" if column in SECRET else ", ".join(seen)
                reasons.append(f"{what}: {shown}")
            values[column] = seen[0] if seen else ""
        if reasons:
            conflicts[file] = "label sheet gives conflicting " + "; ".join(reasons)
        else:
            merged[rows.index[0]] = values  # by the file's first row
            repeated += len(rows) - 1
    first = first[~first["path"].isin(conflicts)].copy()
    if merged:
        first.update(pd.DataFrame.from_dict(merged, orient="index"))
    return first, repeated, conflicts


def case_variants(values: Iterable[str]) -> list[list[tuple[str, int]]]:
    """Labels that differ only in case (``Normal``, ``normal``): each group of spellings with
    how many rows use each, most used first; groups in order of their first spelling."""
    counts = Counter(v for v in values if v)
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        groups[value.casefold()].append((value, n))
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: g[0][0])
