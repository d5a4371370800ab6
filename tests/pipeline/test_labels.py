"""Label sheets (pipeline.labels) as public datasets ship them, through the real ingest stage."""

from __future__ import annotations

import csv
import datetime
import json
import logging
import re
import shutil
import unicodedata
import zipfile
from pathlib import Path

import openpyxl
import pandas as pd
import pytest
import xlwt
from PIL import Image

from pipeline import ingest, labels
from pipeline.params import load_params
from tests.pipeline.dicom_factory import gradient, write_params

NAMES = ["a", "b", "c"]


def _images(src: Path, suffix: str = ".png") -> None:
    src.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(NAMES):
        Image.fromarray(gradient(40, 48, seed=k)).save(src / f"{name}{suffix}")


def _ingest(tmp_path: Path, sheet: Path, **keys) -> tuple[int, object]:
    params = write_params(
        tmp_path,
        ingest={"source": str(tmp_path / "src"), "labels": str(sheet), "workers": 1} | keys,
    )
    return ingest.main(["--params", str(params)]), load_params(params).paths


def _write_xlsx(path: Path, text: str) -> None:
    rows = [line.split(",") for line in text.strip("\n").split("\n")]
    pd.DataFrame(rows[1:], columns=rows[0]).to_excel(path, index=False, engine="openpyxl")


def _write_xls(path: Path, rows: list[list[object]], first: str | None = None) -> None:
    """An Excel 97 workbook written by xlwt (not the reader under test); ``first``: a
    read-me worksheet before the one holding ``rows``."""
    book = xlwt.Workbook()
    if first is not None:
        book.add_sheet(first).write(0, 0, "About this dataset")
    sheet = book.add_sheet("grades")
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            style = xlwt.easyxf(num_format_str="YYYY-MM-DD")
            sheet.write(
                i, j, value, style if isinstance(value, datetime.date) else xlwt.Style.default_style
            )
    book.save(str(path))


def _write_sheet(path: Path, text: str) -> None:
    """``text`` (a CSV) saved as the file ``path`` names: ``*.xlsx``, ``*.xls`` (Excel 97
    numbers for the numeric cells), ``xlsx_saved_as.xls`` (an .xlsx misnamed), else the text."""
    rows = [line.split(",") for line in text.strip("\n").split("\n")]
    if path.name == "xlsx_saved_as.xls":
        _write_xlsx(path.with_suffix(".xlsx"), text)
        path.with_suffix(".xlsx").rename(path)
    elif path.suffix == ".xlsx":
        _write_xlsx(path, text)
    elif path.name == "excel97.xls":
        _write_xls(path, [[float(c) if c.isdigit() else c for c in r] for r in rows], "Read me")
    else:
        path.write_bytes(text.encode())


# Each sheet names images a, b, c (grades 0, 1, 2) its own way; all read alike.
SHEETS = {
    "bom_crlf_excel_leftovers.csv": (
        "\ufeff Image name ,Retinopathy grade,,\r\na,0,,\r\n,,,\r\nb,1,,\r\nc,2,,\r\n,,,\r\n"
    ),
    "tab_separated.tsv": "Image name\tRetinopathy grade\na.png\t0\nb.png\t1\nc.png\t2\n",
    "excel.xlsx": "Image name,Retinopathy grade\na,0\nb.png,1\nc,2\n",
    # Messidor's Annotation_Base*.xls; an .xlsx or a CSV given an .xls name by hand
    "excel97.xls": "Image name,Retinopathy grade\na,0\nb.png,1\nc,2\n",
    "xlsx_saved_as.xls": "Image name,Retinopathy grade\na,0\nb.png,1\nc,2\n",
    "csv_saved_as.xls": "Image name,Retinopathy grade\na,0\nb.png,1\nc,2\n",
}


@pytest.mark.parametrize("name", sorted(SHEETS))
def test_sheet_shapes_read_alike(tmp_path, name):
    _images(tmp_path / "src")
    sheet = tmp_path / name
    _write_sheet(sheet, SHEETS[name])
    rc, paths = _ingest(
        tmp_path, sheet, path_column="image name", label_column=" Retinopathy Grade"
    )
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    assert dict(zip(m["source"], m["label"], strict=True)) == {
        "a.png": "0",
        "b.png": "1",
        "c.png": "2",
    }
    r = json.loads(Path(paths.ingest_report).read_text())
    assert (r["listed_missing"], r["unlisted"], r["quarantined"]) == (0, 0, 0)


@pytest.mark.parametrize(
    ("sheet_text", "keys", "expected"),
    [
        (
            "image,level\na,0\n",
            {},
            "no column 'path' (ingest.path_column) among the 2 columns of the first row, which "
            "must be a header naming them",
        ),
        (
            "id_code,level\na,0\n",
            {"path_column": "id_code", "label_column": "diagnosis"},
            "no column 'diagnosis' (ingest.label_column) among the 2 columns of the first row, "
            "which must be a header naming them",
        ),
        ("path\nd\n", {}, "line 2: 'd' matches 2 files; give its suffix or folder"),
        ("path,split\na,train\nb,later\n", {}, "line 3: split 'later' is not train, val or test"),
    ],
)
def test_sheet_problems_are_one_line(tmp_path, capsys, sheet_text, keys, expected):
    _images(tmp_path / "src")
    for suffix in (".png", ".jpg"):  # one stem, two files
        Image.fromarray(gradient(40, 48, seed=9)).save(tmp_path / "src" / f"d{suffix}")
    sheet = tmp_path / "labels.csv"
    sheet.write_text(sheet_text)
    rc, _ = _ingest(tmp_path, sheet, **keys)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1] == f"retina-vae ingest: error: {sheet}: {expected}"


# Excel 97 cells that are not text -> what a CSV export of the sheet writes (by hand)
XLS_CELLS = [
    (2.0, "2"),  # every .xls number is a float: an integral grade is its integer
    (0.25, "0.25"),
    (datetime.date(2020, 1, 2), "2020-01-02"),
    (True, "TRUE"),
]


def test_xls_cells_read_as_a_csv_export_writes_them(tmp_path):
    _images(tmp_path / "src")
    sheet = tmp_path / "Annotation_Base11.xls"
    cells = [value for value, _ in XLS_CELLS]
    _write_xls(sheet, [["path", "label"], *([f"r{i}.png", c] for i, c in enumerate(cells))])
    params = load_params(write_params(tmp_path, ingest={"source": str(tmp_path / "src")}))
    table = labels.read_sheet(sheet, params.ingest, tmp_path / "src")
    assert list(table["label"]) == [text for _, text in XLS_CELLS]


def test_xls_error_cells_are_unlabelled_and_a_damaged_xls_is_one_line(tmp_path, capsys, caplog):
    _images(tmp_path / "src")
    sheet = tmp_path / "grades.xls"
    book = xlwt.Workbook()
    ws = book.add_sheet("grades")
    for i, row in enumerate([["path", "label"], ["a", 1.0], ["b"], ["c", 0.0]]):
        for j, value in enumerate(row):
            ws.write(i, j, value)
    ws.row(2).set_cell_error(1, "#DIV/0!")  # b's grade: a formula that failed
    book.save(str(sheet))
    rc, paths = _ingest(tmp_path, sheet)
    m = pd.read_parquet(paths.manifest)
    got = {s: None if pd.isna(v) else v for s, v in zip(m["source"], m["label"], strict=True)}
    assert rc == 0 and got == {"a.png": "1", "b.png": None, "c.png": "0"}
    assert "(#DIV/0! 1)" in caplog.text

    for damaged in (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504), sheet.read_bytes()[:1500]):
        sheet.write_bytes(damaged)  # an OLE2 header alone; a download cut short
        capsys.readouterr()
        assert _ingest(tmp_path, sheet)[0] == 1
        out = capsys.readouterr()
        (line,) = out.err.strip().splitlines()
        assert line.startswith(f"retina-vae ingest: error: {sheet}: not a readable CSV/TSV/Excel ")
        assert "WARNING" not in out.out  # xlrd's own diagnostics are not printed


def test_listed_but_missing_and_unlisted_are_counted_apart(tmp_path, capsys, caplog):
    """Every row names a .png while the files are .jpg: no file is quarantined (none was
    refused), the rows are 'listed but missing' with a suffix hint, the files 'unlisted'
    (before: 'found 3 = ingested 0 + quarantined 3', the 3 real files merely 'unlisted')."""
    caplog.set_level(logging.INFO)
    _images(tmp_path / "src", ".jpg")
    sheet = tmp_path / "labels.csv"
    sheet.write_text("path,label\n" + "".join(f"{n}.png,x\n" for n in NAMES))
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 1
    r = json.loads(Path(paths.ingest_report).read_text())
    assert (r["found"], r["quarantined"], r["listed_missing"], r["unlisted"]) == (0, 0, 3, 3)
    assert "3 of them exist with another suffix" in caplog.text
    assert (
        "label sheet: 3 rows listed but missing, 3 image files on disk but unlisted" in caplog.text
    )
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "3 label-sheet rows name no file and 3 image files are unlisted" in err


@pytest.mark.parametrize(("pattern", "own"), [(r"^(\d+)_", False), (r"^p(\d+)_", True)])
def test_patient_pattern_applies_to_sheet_layouts_and_the_log_says_so(
    tmp_path, caplog, pattern, own
):
    caplog.set_level(logging.INFO)
    src = tmp_path / "src"
    src.mkdir()
    for k, name in enumerate(["7_left", "7_right", "9_left"]):
        Image.fromarray(gradient(40, 48, seed=k)).save(src / f"{name}.jpeg")
    sheet = tmp_path / "trainLabels.csv"
    sheet.write_text("image,level\n7_left,0\n7_right,1\n9_left,0\n")
    rc, paths = _ingest(
        tmp_path, sheet, path_column="image", label_column="level", patient_pattern=pattern
    )
    assert rc == 0
    assert pd.read_parquet(paths.manifest)["subject_id"].nunique() == (3 if own else 2)
    assert ("3 images have no patient ID" in caplog.text) == own


def test_file_index_finds_by_path_name_and_stem(tmp_path):
    index = labels.FileIndex(tmp_path, ["train/10_left.jpeg", "train/sub/x.png", "y.PNG"])
    for value in ("train/10_left.jpeg", "train/10_left", "10_left.jpeg", "10_left"):
        assert index.find(value) == ["train/10_left.jpeg"], value
    assert index.find("y") == ["y.PNG"] and index.find("sub/x") == []
    assert index.other_suffix("10_left.png") and not index.other_suffix("10_left")


# A source assembled with links: x.png links to a file outside the source (DVC's symlink cache,
# `ln -s`), gone.png to a file that no longer exists. Each case: the sheet (None: no sheet, the
# folder walk) -> manifest {source: (label, width, height)} and quarantine {path: reason}.
LINKS = {
    "walk": (None, {"a.png": None, "x.png": None}, {"gone.png": "symbolic link to a missing file"}),
    "sheet": (
        "path,label\na.png,p\nx.png,q\n",
        {"a.png": "p", "x.png": "q"},
        {},
    ),
    "sheet_dotted_and_absolute": (
        "path,label\n./sub/../a.png,p\n{src}/x.png,q\n",
        {"a.png": "p", "x.png": "q"},
        {},
    ),
    "sheet_broken_link": (
        "path,label\na.png,p\nx.png,q\ngone.png,r\n",
        {"a.png": "p", "x.png": "q"},
        {"gone.png": "symbolic link to a missing file"},
    ),
}


@pytest.mark.parametrize("case", sorted(LINKS))
def test_symlinked_files_are_inside_the_source_as_listed(tmp_path, case):
    sheet_text, kept, refused = LINKS[case]
    src, store = tmp_path / "src", tmp_path / "store"
    (src / "sub").mkdir(parents=True)
    store.mkdir()
    Image.fromarray(gradient(40, 48, seed=1)).save(src / "a.png")
    Image.fromarray(gradient(36, 44, seed=2)).save(store / "x.png")
    (src / "x.png").symlink_to(store / "x.png")
    (src / "gone.png").symlink_to(store / "gone.png")
    sheet = tmp_path / "labels.csv"
    keys = {}
    if sheet_text is None:
        keys = {"source": str(src), "labels": None, "workers": 1}
    else:
        sheet.write_text(sheet_text.format(src=src))
    rc, paths = _ingest(tmp_path, sheet, **keys)
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    sizes = {n: Image.open(src / n).size for n in kept}  # Pillow's, through the link
    got = {s: (lab, w, h) for s, lab, w, h in m[["source", "label", "width", "height"]].values}
    assert got == {n: (lab, *sizes[n]) for n, lab in kept.items()}
    q = pd.read_csv(paths.quarantine)
    assert dict(zip(q["path"], q["reason"], strict=True)) == refused


def test_a_path_leading_outside_the_source_is_still_refused(tmp_path, capsys):
    _images(tmp_path / "src")
    Image.fromarray(gradient(40, 48, seed=5)).save(tmp_path / "outside.png")
    sheet = tmp_path / "labels.csv"
    sheet.write_text("path,label\na.png,x\nsub/../../outside.png,y\n")
    rc, _ = _ingest(tmp_path, sheet)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "line 3: path 'sub/../../outside.png' is outside the source folder" in err


# Label cells as sheets write them -> the manifest's labels of a, b, c (None: unlabelled).
LABEL_CELLS = {
    "missing_markers": ("a,x\nb,NaN\nc,#N/A\n", {"a.png": "x", "b.png": None, "c.png": None}),
    "excel_integral_floats": ("a,1\nb,1.0\nc, 2 \n", {"a.png": "1", "b.png": "1", "c.png": "2"}),
    "not_all_numbers": ("a,1\nb,1.0\nc,n/a\n", {"a.png": "1", "b.png": "1", "c.png": None}),
    # every cell a number (float() of each: 1.5, 1.5, 7): one class per number, written canonically
    "numbers_canonical": ("a,1.5\nb,1.50\nc,007\n", {"a.png": "1.5", "b.png": "1.5", "c.png": "7"}),
    "signs_and_leading_zeros": ("a,+1\nb,01\nc,00\n", {"a.png": "1", "b.png": "1", "c.png": "0"}),
    "exponent_and_negative_zero": (
        "a,1e0\nb,02.0\nc,-0\n",
        {"a.png": "1", "b.png": "2", "c.png": "0"},
    ),
    "words_keep_every_cell_as_written": (
        "a,01\nb,1\nc,mild\n",
        {"a.png": "01", "b.png": "1", "c.png": "mild"},
    ),
}


@pytest.mark.parametrize("case", sorted(LABEL_CELLS))
def test_label_cells_are_read_as_one_class_per_value(tmp_path, case):
    rows, expected = LABEL_CELLS[case]
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.csv"
    sheet.write_text("path,label\n" + rows)
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    got = [None if pd.isna(v) else v for v in m["label"]]
    assert dict(zip(m["source"], got, strict=True)) == expected


def test_xlsx_number_and_text_cells_of_one_number_are_one_class(tmp_path):
    """A number cell 1 and a text cell '01' (openpyxl writes each as given) are one class;
    2.50 as a number cell is 2.5."""
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.xlsx"
    book = openpyxl.Workbook()
    for row in (["path", "label"], ["a", 1], ["b", "01"], ["c", 2.50]):
        book.active.append(row)
    book.save(sheet)
    rc, paths = _ingest(tmp_path, sheet)
    m = pd.read_parquet(paths.manifest)
    assert rc == 0 and dict(zip(m["source"], m["label"], strict=True)) == {
        "a.png": "1",
        "b.png": "1",
        "c.png": "2.5",
    }


def test_label_numbers_are_one_class_but_patient_ids_keep_leading_zeros(tmp_path):
    """Grades 01, 1 and 1.0 are one class; patients 007 and 7 are different people
    (registries number them so), only Excel's 7.0 is 7."""
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.csv"
    sheet.write_text("path,label,patient_id\na,01,007\nb,1,7\nc,1.0,7.0\n")
    rc, paths = _ingest(tmp_path, sheet)
    m = pd.read_parquet(paths.manifest)
    subject = dict(m[["source", "subject_id"]].values)
    assert rc == 0 and set(m["label"]) == {"1"}
    assert subject["a.png"] != subject["b.png"] == subject["c.png"]


def _formula_sheet(path: Path, rows: list[list], cached: dict[str, str]) -> None:
    """An .xlsx written by openpyxl (formulas without a saved value, as any script leaves
    them), then given the saved text values ``cached`` (cell -> text) a spreadsheet program
    writes (``<c t="str"><f>..</f><v>text</v></c>``) by editing the sheet's XML."""
    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    book.save(path)
    with zipfile.ZipFile(path) as z:
        parts = {name: z.read(name) for name in z.namelist()}
    xml = parts["xl/worksheets/sheet1.xml"].decode()
    for cell, text in cached.items():
        xml = re.sub(
            f'<c r="{cell}"><f>(.*?)</f><v ?/>',
            lambda m, t=text, c=cell: f'<c r="{c}" t="str"><f>{m[1]}</f><v>{t}</v>',
            xml,
        )
    parts["xl/worksheets/sheet1.xml"] = xml.encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)


FORMULA = '=IF(C{r}=0,"normal","dr")'
# case: (rows after the header path,label,grade,note; saved values; error or manifest labels)
FORMULAS = {
    "label formulas never saved": (
        [["a", FORMULA, 0, ""], ["b", FORMULA, 1, ""], ["c", FORMULA, 2, ""]],
        {},
        "column 'label', row 2: formulas without a saved value",
    ),
    "path formula never saved, from row 3": (
        [["a", "x", 0, ""], ['="b"&".png"', "y", 1, ""], ["c", "z", 2, ""]],
        {},
        "column 'path', row 3: formulas without a saved value",
    ),
    "saved by a spreadsheet program": (
        [["a", FORMULA, 0, ""], ["b", FORMULA, 1, ""], ["c", FORMULA, 2, ""]],
        {"B2": "normal", "B3": "dr", "B4": ""},  # an empty result is an empty label
        {"a.png": "normal", "b.png": "dr", "c.png": None},
    ),
    "formula in a column not read": (
        [["a", "x", 0, "=C2*2"], ["b", "y", 1, "=C3*2"], ["c", "z", 2, "=C4*2"]],
        {},
        {"a.png": "x", "b.png": "y", "c.png": "z"},
    ),
}


@pytest.mark.parametrize("case", FORMULAS)
def test_xlsx_formulas_without_a_saved_value_are_a_one_line_error(tmp_path, capsys, case):
    """Reference: openpyxl's own reading without data_only shows the formulas; the values a
    spreadsheet program saved are read as it shows them."""
    rows, cached, want = FORMULAS[case]
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.xlsx"
    rows = [
        [v.format(r=r) if isinstance(v, str) else v for v in row] for r, row in enumerate(rows, 2)
    ]
    _formula_sheet(sheet, [["path", "label", "grade", "note"], *rows], cached)
    formulas = openpyxl.load_workbook(sheet).active
    assert any(str(c.value).startswith("=") for row in formulas.iter_rows() for c in row)
    rc, paths = _ingest(tmp_path, sheet)
    if isinstance(want, str):
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and want in err[0]
        assert "open and save the sheet in Excel or LibreOffice, or export CSV" in err[0]
        return
    m = pd.read_parquet(paths.manifest)
    got = [None if pd.isna(v) else v for v in m["label"]]
    assert rc == 0 and dict(zip(m["source"], got, strict=True)) == want


def test_labels_differing_only_in_case_are_named_in_one_warning(tmp_path, caplog):
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.csv"
    sheet.write_text("path,label\na,Normal\nb,normal\nc,normal\n")
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 0
    lines = [r.getMessage() for r in caplog.records if "differ only in case" in r.getMessage()]
    assert len(lines) == 1 and "normal (2) / Normal (1)" in lines[0]
    assert not any(f"{n}.png" in lines[0] or f" {n} " in lines[0] for n in NAMES)
    assert json.loads(Path(paths.ingest_report).read_text())["labels"] == {"Normal": 1, "normal": 2}


def _xlsx_rows(path: Path, rows: dict[int, list[str]]) -> None:
    """An .xlsx whose rows (1-based row number -> cells) are where given, the rest empty."""
    book = openpyxl.Workbook()
    for n, cells in rows.items():
        for k, value in enumerate(cells, 1):
            book.active.cell(row=n, column=k, value=value)
    book.save(path)


# A bad split in each sheet, at file line (or row) 5 -> the error names line 5.
LINES = {
    "blank_lines.csv": "path,split\n\n\na,train\nb,bogus\n",
    "crlf_blank_lines.tsv": "path\tsplit\r\n\r\na\ttrain\r\n\r\nb\tbogus\r\n",
    "multi_line_cell.csv": 'path,split,note\na,train,"one\ntwo\nthree"\nb,bogus,x\n',
    "blank_rows.xlsx": {2: ["path", "split"], 3: ["a", "train"], 5: ["b", "bogus"]},
}


def _ingest_sheet(tmp_path: Path, name: str, content: str | dict) -> tuple[int, Path]:
    """Ingest the three images with a sheet ``name`` holding ``content`` (text, or .xlsx rows
    as :func:`_xlsx_rows` takes them); (exit code, the sheet's path)."""
    _images(tmp_path / "src")
    sheet = tmp_path / name
    if name.endswith(".xlsx"):
        _xlsx_rows(sheet, content)
    else:
        sheet.write_bytes(content.encode())
    return _ingest(tmp_path, sheet)[0], sheet


@pytest.mark.parametrize("name", sorted(LINES))
def test_errors_name_the_line_of_the_file(tmp_path, capsys, name):
    rc, sheet = _ingest_sheet(tmp_path, name, LINES[name])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err.endswith(f"{sheet}: line 5: split 'bogus' is not train, val or test")


# A header and no image rows, as a spreadsheet saves an emptied sheet -> one line, no traceback.
NO_ROWS = {
    "header_only.csv": "path,label\n",
    "excel_leftovers.csv": "path,label,,\r\n,,,\r\n,,,\r\n",
    "header_only.xlsx": {1: ["path", "label"]},
}


@pytest.mark.parametrize("name", sorted(NO_ROWS))
def test_a_sheet_without_rows_is_one_line(tmp_path, capsys, name):
    rc, sheet = _ingest_sheet(tmp_path, name, NO_ROWS[name])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.endswith(f"{sheet}: no rows below the header (one row per image is expected)")


# A hidden folder beside the images: (what is there, the sheet's rows, sources, skipped files).
HIDDEN = {
    # a sheet naming images by stem (EyePACS, IDRiD) beside a file manager's thumbnails: the
    # row names the image, not the hidden copy, which is skipped
    "thumbnail_copy": (
        (shutil.copy, "a.png", ".thumbnails/a.png"),
        "a,x\nb,x\nc,y\n",
        ["a.png", "b.png", "c.png"],
        1,
    ),
    # a row naming a file in a hidden folder: the sheet says so, it is taken, once
    "named_by_a_row": (
        (shutil.move, "c.png", ".data/c.png"),
        "a,x\nb,x\n.data/c.png,y\n",
        [".data/c.png", "a.png", "b.png"],
        0,
    ),
}


@pytest.mark.parametrize("case", sorted(HIDDEN))
def test_a_hidden_folder_is_no_second_match_and_a_row_naming_it_wins(tmp_path, case):
    (put, source, target), rows, expected, skipped = HIDDEN[case]
    src = tmp_path / "src"
    _images(src)
    (src / target).parent.mkdir()
    put(src / source, src / target)
    sheet = tmp_path / "labels.csv"
    sheet.write_text("path,label\n" + rows)
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 0
    assert sorted(pd.read_parquet(paths.manifest)["source"]) == expected
    r = json.loads(Path(paths.ingest_report).read_text())
    assert (r["ingested"], r["skipped_sidecars"]) == (3, skipped)


def test_an_absolute_path_inside_the_source_is_stored_relative_and_listed(tmp_path):
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.csv"
    sheet.write_text(f"path,label\na,x\nb.png,x\n{tmp_path / 'src' / 'c.png'},y\n")
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    assert sorted(m["source"]) == ["a.png", "b.png", "c.png"]
    r = json.loads(Path(paths.ingest_report).read_text())
    assert (r["ingested"], r["unlisted"], r["listed_missing"]) == (3, 0, 0)


# Rows naming one file again: the sheet -> labels kept, quarantine {path: reason}.
REPEATS = {
    "conflicting_labels": (
        "path,label\na,mild\nb,mild\nc,mild\na.png,severe\n",
        {"b.png": "mild", "c.png": "mild"},
        {"a.png": "label sheet gives conflicting labels: mild, severe"},
    ),
    "same_or_empty_repeats": (
        "path,label,eye\na,mild,R\nb,,\nc,mild,L\na.png,mild,OD\n./b.png,severe,L\n",
        {"a.png": "mild", "b.png": "severe", "c.png": "mild"},
        {},
    ),
    "one_number_written_two_ways": (
        "path,label\na,1\nb,2\nc,0\na.png,01\nb.png,2.0\nc,+0\n",
        {"a.png": "1", "b.png": "2", "c.png": "0"},
        {},
    ),
    "conflicting_patients": (
        "path,label,patient_id\na,x,P-1001\nb,x,P-1002\nc,x,P-1003\na,x,P-1004\n",
        {"b.png": "x", "c.png": "x"},
        {"a.png": "label sheet gives conflicting patient IDs: 2 different"},
    ),
}


@pytest.mark.parametrize("case", sorted(REPEATS))
def test_rows_that_disagree_on_a_file_quarantine_it(tmp_path, caplog, case):
    text, kept, refused = REPEATS[case]
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.csv"
    sheet.write_text(text)
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    assert dict(zip(m["source"], m["label"], strict=True)) == kept
    q = pd.read_csv(paths.quarantine)
    assert dict(zip(q["path"], q["reason"], strict=True)) == refused
    r = json.loads(Path(paths.ingest_report).read_text())
    assert (r["found"], r["quarantined"], r["unlisted"]) == (3, len(refused), 0)
    assert "P-100" not in caplog.text and "a.png" not in caplog.text


@pytest.mark.parametrize("ref", ["A1:B3", "A1"])
def test_xlsx_rows_beyond_a_stale_dimension_record_are_read(tmp_path, ref):
    """Writers leave the sheet's <dimension ref> stale; openpyxl in normal mode (the
    reference) reads every row regardless, and so must ingest."""
    _images(tmp_path / "src")
    book = openpyxl.Workbook()
    for row in (["path", "label"], ["a", "x"], ["b", "y"], ["c", "z"]):
        book.active.append(row)
    book.save(tmp_path / "ok.xlsx")
    sheet = tmp_path / "labels.xlsx"
    with zipfile.ZipFile(tmp_path / "ok.xlsx") as zin, zipfile.ZipFile(sheet, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.startswith("xl/worksheets/sheet"):
                data = re.sub(rb"<dimension[^>]*>", f'<dimension ref="{ref}"/>'.encode(), data)
            zout.writestr(item, data)
    ws = openpyxl.load_workbook(sheet).active
    want = {f"{r[0]}.png": r[1] for r in ws.iter_rows(min_row=2, values_only=True)}
    rc, paths = _ingest(tmp_path, sheet)
    m = pd.read_parquet(paths.manifest)
    assert rc == 0 and dict(zip(m["source"], m["label"], strict=True)) == want


def _read(tmp_path: Path, rows: list[list[str]]) -> pd.DataFrame:
    """``rows`` (header first) as a CSV sheet read by labels.read_sheet over src/ a, b, c."""
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.csv"
    with open(sheet, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    params = load_params(write_params(tmp_path, ingest={"source": str(tmp_path / "src")}))
    return labels.read_sheet(sheet, params.ingest, tmp_path / "src")


# A cell beside a '01' in the label and the patient column -> (label a, label b, patient a):
# only plain ASCII decimal notation (sign, digits, fraction, exponent) is a number, so only
# then is the column canonicalised ('01' -> '1'); anything else stays as written.
NUMBER_CELLS = {
    "1_0": ("1_0", "01", "1_0"),
    "01_0023": ("01_0023", "01", "01_0023"),
    "\u0663": ("\u0663", "01", "\u0663"),  # Arabic-Indic digit three
    "\u0661\u0662": ("\u0661\u0662", "01", "\u0661\u0662"),
    "\uff11": ("\uff11", "01", "\uff11"),  # full-width digit one
    "inf": ("inf", "01", "inf"),
    "-Infinity": ("-Infinity", "01", "-Infinity"),
    "nan": ("", "1", ""),  # a missing marker: the rest is all numbers
    "1e3": ("1000", "1", "1000"),
    " 1 ": ("1", "1", "1"),  # cells are stripped
    "0x10": ("0x10", "01", "0x10"),
    "1,5": ("1,5", "01", "1,5"),
    "1 000": ("1 000", "01", "1 000"),
    "+.5e+2": ("50", "1", "50"),
    "5.": ("5", "1", "5"),
    "1.5e-1": ("0.15", "1", "1.5e-1"),
}


@pytest.mark.parametrize("cell", sorted(NUMBER_CELLS))
def test_only_plain_decimal_cells_are_numbers(tmp_path, cell):
    table = _read(tmp_path, [["path", "label", "patient_id"], ["a", cell, cell], ["b", "01", "01"]])
    got = (table["label"].iloc[0], table["label"].iloc[1], table["patient_id"].iloc[0])
    assert got == NUMBER_CELLS[cell]


def test_underscored_patient_ids_of_two_sites_stay_two_patients(tmp_path):
    """g06: '01_0023' and '010_023' were both read as the number 10023: one subject."""
    rows = [["path", "label", "patient_id"], ["a", "1_0", "01_0023"], ["b", "1_1", "010_023"]]
    table = _read(tmp_path, rows)
    assert list(table["patient_id"]) == ["01_0023", "010_023"]
    assert list(table["label"]) == ["1_0", "1_1"]


# Sheets whose first row or folders are a patient's data: no error may show them.
HEADERLESS = {
    "headerless.csv": (
        "IMG001.png,Jane Doe,MRN4711,dr\nIMG002.png,John Smith,MRN4712,normal\n",
        {},
    ),
    "label_column_absent.csv": ("path,Jane Doe,MRN4711\na,x,y\n", {"label_column": "grade"}),
    "stem_in_patient_folders.csv": ("path\nd\n", {}),
}


@pytest.mark.parametrize("name", sorted(HEADERLESS))
def test_sheet_errors_quote_no_cell_or_file_name(tmp_path, capsys, name):
    _images(tmp_path / "src")
    for folder in ("Jane Doe", "MRN4711"):  # one stem in two patients' folders
        (tmp_path / "src" / folder).mkdir()
        Image.fromarray(gradient(40, 48, seed=9)).save(tmp_path / "src" / folder / "d.png")
    sheet = tmp_path / name
    text, keys = HEADERLESS[name]
    sheet.write_text(text)
    rc, _ = _ingest(tmp_path, sheet, **keys)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "error" in err[0]
    for secret in ("img001", "jane doe", "mrn4711", "john smith"):
        assert secret not in err[0].lower()


# Error values a failed formula saves, in an .xlsx (typed "e") and as a CSV export writes them:
# each read as empty (unlabelled), the other cells still a column of numbers; one warning.
ERROR_CELLS = {
    "labels.xlsx": (["#DIV/0!", "01", "#REF!"], "#DIV/0! 1, #REF! 1"),
    "labels.csv": (["#VALUE!", "1", "#VALUE!"], "#VALUE! 2"),
    "spill_and_name.csv": (["#SPILL!", "#name?", "1.0"], "#NAME? 1, #SPILL! 1"),
}


@pytest.mark.parametrize("name", sorted(ERROR_CELLS))
def test_spreadsheet_error_values_are_unlabelled_with_one_warning(tmp_path, caplog, name):
    cells, counted = ERROR_CELLS[name]
    _images(tmp_path / "src")
    sheet = tmp_path / name
    rows = [["path", "label"], *([n, c] for n, c in zip(NAMES, cells, strict=True))]
    if name.endswith(".xlsx"):
        book = openpyxl.Workbook()
        for row in rows:
            book.active.append(row)
        for cell in book.active["B"][1:]:
            if cell.value.startswith("#"):
                cell.data_type = "e"
        book.save(sheet)
    else:
        sheet.write_text("".join(",".join(r) + "\n" for r in rows))
    rc, paths = _ingest(tmp_path, sheet)
    m = pd.read_parquet(paths.manifest)
    got = {s: None if pd.isna(v) else v for s, v in zip(m["source"], m["label"], strict=True)}
    want = {
        f"{n}.png": None if c.startswith("#") else "1" for n, c in zip(NAMES, cells, strict=True)
    }
    assert rc == 0 and got == want
    lines = [r.getMessage() for r in caplog.records if "error value" in r.getMessage()]
    assert len(lines) == 1 and f"({counted})" in lines[0]
    assert not any(n in lines[0] for n in ("a.png", "b.png", str(tmp_path)))


# .xlsx cells that are not text -> the label a CSV export of the sheet gives (written by hand).
TYPED_CELLS = {
    "booleans": ([True, False, True], ["TRUE", "FALSE", "TRUE"]),
    "dates": (
        [
            datetime.date(2020, 1, 2),
            datetime.datetime(2020, 1, 3),
            datetime.datetime(2020, 1, 2, 13),
        ],
        ["2020-01-02", "2020-01-03", "2020-01-02 13:00:00"],
    ),
}


@pytest.mark.parametrize("case", sorted(TYPED_CELLS))
def test_xlsx_typed_cells_read_as_a_csv_export_writes_them(tmp_path, case):
    cells, want = TYPED_CELLS[case]
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.xlsx"
    book = openpyxl.Workbook()
    for row in (["path", "label"], *([n, c] for n, c in zip(NAMES, cells, strict=True))):
        book.active.append(row)
    book.save(sheet)
    params = load_params(write_params(tmp_path, ingest={"source": str(tmp_path / "src")}))
    table = labels.read_sheet(sheet, params.ingest, tmp_path / "src")
    assert list(table["label"]) == want


# One sheet (images a, b, c graded 0, 1, 2; accented class names) as each program saves it:
# (file name, bytes, path column, label column); every one reads alike.
_ROWS = [("a.png", "0", "Sain"), ("b.png", "1", "Rétinopathie"), ("c.png", "2", "Rétinopathie")]
SAVED = {
    # Excel "CSV" in a decimal-comma locale: cp1252, ';', CRLF, grades as "1,0"
    "excel_csv_semicolon.csv": (
        "".join(f"{p};{g},0;{c};0,{g}\r\n" for p, g, c in _ROWS),
        "image;grade;diagnostic;severity\r\n",
        "cp1252",
    ),
    # Excel "Unicode text": UTF-16 with its BOM, tab-separated, .txt
    "excel_unicode_text.txt": (
        "".join(f"{p}\t{g}\t{c}\r\n" for p, g, c in _ROWS),
        "image\tgrade\tdiagnostic\r\n",
        "utf-16",
    ),
    # a plain comma CSV saved in Latin-1 by an older tool
    "latin1.csv": (
        "".join(f"{p},{g},{c}\n" for p, g, c in _ROWS),
        "image,grade,diagnostic\n",
        "latin-1",
    ),
    # pipes, UTF-8 without BOM, a title line above the header
    "title_line_pipes.csv": (
        "".join(f"{p}|{g}|{c}\n" for p, g, c in _ROWS),
        "Grading of the first batch\n\nimage|grade|diagnostic\n",
        "utf-8",
    ),
}


@pytest.mark.parametrize("name", sorted(SAVED))
@pytest.mark.parametrize("label", ["grade", "diagnostic"])
def test_sheets_as_spreadsheet_programs_save_them_read_alike(tmp_path, name, label):
    """Before: each was refused (UnicodeDecodeError, or one column named 'image;grade;...'
    and 'line 2: 3 values, but the header names 1')."""
    _images(tmp_path / "src")
    body, header, codec = SAVED[name]
    sheet = tmp_path / name
    sheet.write_bytes((header + body).encode(codec))
    rc, paths = _ingest(tmp_path, sheet, path_column="image", label_column=label)
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    column = 1 if label == "grade" else 2
    assert dict(zip(m["source"], m["label"], strict=True)) == {r[0]: r[column] for r in _ROWS}


def test_decimal_comma_severities_of_a_semicolon_sheet_are_numbers(tmp_path):
    """Before: 'severity '0,25' is not a number'."""
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.csv"
    sheet.write_text("path;label;severity\na.png;x;0,25\nb.png;x;1\nc.png;x;\n")
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 0
    severity = pd.read_parquet(paths.manifest).set_index("source")["severity"]
    assert (severity["a.png"], severity["b.png"]) == (0.25, 1.0) and pd.isna(severity["c.png"])


def test_the_worksheet_and_header_row_naming_the_path_column_are_read(tmp_path, caplog):
    """A workbook opening on a read-me sheet, its labels under a title row and merged group
    headings (PAPILA's two header rows). Before: 'no column ...' / 'N values, but the header
    names M'."""
    caplog.set_level(logging.INFO)
    _images(tmp_path / "src")
    book = openpyxl.Workbook()
    book.active.title = "Read me"
    book.active.append(["This workbook holds the grades of the study."])
    ws = book.create_sheet("Grades")
    ws.append(["Clinical data", None, "Refraction", None])
    ws.merge_cells("A1:B1")
    ws.merge_cells("C1:D1")
    ws.append(["Image", "Diagnosis", "dioptre_1", "dioptre_2"])
    for k, name in enumerate(NAMES):
        ws.append([f"{name}.png", k, -0.5, 1.25])
    sheet = tmp_path / "grades.xlsx"
    book.save(sheet)
    rc, paths = _ingest(tmp_path, sheet, path_column="image", label_column="diagnosis")
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    assert dict(zip(m["source"], m["label"], strict=True)) == {
        "a.png": "0",
        "b.png": "1",
        "c.png": "2",
    }
    assert "read worksheet 'Grades'" in caplog.text
    assert "the header naming 'image' is on line 2" in caplog.text


@pytest.mark.parametrize("cell", ["1", "2", "both", "OU"])
def test_eye_cells_not_naming_right_or_left_are_a_one_line_error(tmp_path, capsys, cell):
    """BRSET's exam_eye is 1/2: before, every eye was silently read as unknown."""
    _images(tmp_path / "src")
    sheet = tmp_path / "labels.csv"
    sheet.write_text(f"path,label,eye\na.png,0,R\nb.png,1,{cell}\nc.png,2,L\n")
    rc, _ = _ingest(tmp_path, sheet)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err[-1].startswith(
        f"retina-vae ingest: error: {sheet}: line 3: eye {cell!r} is not R/L, OD/OS or right/left"
    )


def test_sheet_names_match_files_without_regard_to_case_or_float_ids(tmp_path, capsys):
    """Messidor's sheet lists IM002385.jpg for IM002385.JPG; a pandas export of a numeric ID
    column writes 1.0 for image 1. Before: all 'listed but missing', the files 'unlisted'."""
    src = tmp_path / "src"
    src.mkdir()
    for k, name in enumerate(["IM002385.JPG", "Photo_B.png", "1.png"]):
        Image.fromarray(gradient(40, 48, seed=k)).save(src / name)
    sheet = tmp_path / "labels.csv"
    sheet.write_text("path,label\nim002385.jpg,0\nphoto_b,1\n1.0,2\n")
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    assert dict(zip(m["source"], m["label"], strict=True)) == {
        "IM002385.JPG": "0",
        "Photo_B.png": "1",
        "1.png": "2",
    }
    # two files that differ only in case: a name matching both in that way is ambiguous
    Image.fromarray(gradient(40, 48, seed=7)).save(src / "photo_b.jpg")
    sheet.write_text("path,label\nPHOTO_B,1\n")
    assert _ingest(tmp_path, sheet)[0] == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .splitlines()[-1]
        .endswith("line 2: 'PHOTO_B' matches 2 files; give its suffix or folder")
    )


@pytest.mark.parametrize("on_disk, in_sheet", [("NFD", "NFC"), ("NFC", "NFD")])
def test_sheet_names_match_files_in_either_unicode_normal_form(tmp_path, on_disk, in_sheet):
    """A zip made on macOS stores ``Müller`` decomposed (u + combining diaeresis); a sheet
    typed elsewhere has it composed, and the other way round. Before: every such row 'listed
    but missing', its file 'unlisted'."""
    names = ["Müller_OD.png", "José/Añil_OS.png", "plain.png"]  # one in a folder
    src = tmp_path / "src"
    for k, name in enumerate(names):
        path = src / unicodedata.normalize(on_disk, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient(40, 48, seed=k)).save(path)
    sheet = tmp_path / "labels.csv"
    rows = "".join(f"{unicodedata.normalize(in_sheet, n)},{k}\n" for k, n in enumerate(names))
    sheet.write_text("path,label\n" + rows, encoding="utf-8")
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    expected = {unicodedata.normalize(on_disk, n): str(k) for k, n in enumerate(names)}
    assert dict(zip(m["source"], m["label"], strict=True)) == expected


@pytest.mark.parametrize(
    "written",
    [
        "/TREX DME/GILA/0201GOD/V1/OD/{name}",  # OLIVES: from the dataset's top folder
        "\\download\\src\\TREX DME\\GILA\\0201GOD\\V1\\OD\\{name}",  # DeepDRiD: with Windows \
    ],
)
def test_paths_written_from_the_dataset_top_folder_find_their_files(tmp_path, capsys, written):
    """Before: 'line 2: path '/TREX DME/...' is outside the source folder'."""
    folder = tmp_path / "src" / "TREX DME" / "GILA" / "0201GOD" / "V1" / "OD"
    _images(folder)
    sheet = tmp_path / "labels.csv"
    rows = "".join(f'"{written.format(name=n)}.png",{k}\n' for k, n in enumerate(NAMES))
    sheet.write_text("path,label\n" + rows)
    rc, paths = _ingest(tmp_path, sheet)
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    top = "TREX DME/GILA/0201GOD/V1/OD/"
    assert dict(zip(m["source"], m["label"], strict=True)) == {
        f"{top}a.png": "0",
        f"{top}b.png": "1",
        f"{top}c.png": "2",
    }
    # a file that is there at that absolute path, outside the source, is still refused
    outside = tmp_path / "a.png"
    Image.fromarray(gradient(40, 48, seed=5)).save(outside)
    sheet.write_text(f"path,label\n{outside},0\n")
    assert _ingest(tmp_path, sheet)[0] == 1
    assert "is outside the source folder" in capsys.readouterr().err.strip().splitlines()[-1]
