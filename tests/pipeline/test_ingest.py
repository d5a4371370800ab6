"""Ingest: every source layout, quarantine, duplicates, counts, de-identification."""

from __future__ import annotations

import filecmp
import io
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate

from pipeline import ingest, preprocess
from pipeline.io import ArrowRows
from pipeline.manifest import MANIFEST_COLUMNS
from pipeline.params import load_params
from tests.pipeline.dicom_factory import (
    OCT_TOMOGRAPHY,
    PHI,
    dvc_temp_copy,
    gradient,
    make_dicom,
    write_params,
)


def _run(tmp_path: Path, **groups) -> tuple[int, object]:
    params = write_params(tmp_path, **groups)
    return ingest.main(["--params", str(params)]), load_params(params).paths


def _report(paths) -> dict:
    return json.loads(Path(paths.ingest_report).read_text())


def _kermany(root: Path) -> None:
    """train/<CLASS>/<CLASS>-<patient>-<n>.jpeg, two images for patient 111."""
    names = [
        "CNV/CNV-111-1",
        "CNV/CNV-111-2",
        "DME/DME-222-1",
        "NORMAL/NORMAL-333-1",
        "DRUSEN/DRUSEN-444-1",
    ]
    for k, name in enumerate(names):
        path = root / "train" / f"{name}.jpeg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient(60, 70, seed=k)).save(path, quality=90)


CLASS_FOLDERS = ["CNV/CNV-111-1", "CNV/CNV-222-1", "NORMAL/NORMAL-333-1", "NORMAL/NORMAL-444-1"]


@pytest.mark.parametrize(
    ("names", "warning"),
    [
        (CLASS_FOLDERS, None),  # each class holds several patients
        (
            [*CLASS_FOLDERS, "MRN100001_DOE/OCT-555-1", "MRN100001_DOE/OCT-555-2"],
            "ingest.folder_labels: 1 of 3 label folders hold a single patient's images",
        ),
    ],
)
def test_a_label_folder_of_one_patient_is_warned_about_by_count(tmp_path, caplog, names, warning):
    """With labels from folders, a folder holding one patient's images (its name may be the
    patient's) is counted in a warning that names no folder."""
    caplog.set_level(logging.INFO)
    for k, name in enumerate(names):
        path = tmp_path / "src" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gradient(60, 70, seed=k)).save(path)
    rc, paths = _run(tmp_path, ingest={"source": str(tmp_path / "src")})
    assert rc == 0 and len(pd.read_parquet(paths.manifest)) == len(names)
    lines = [r.getMessage() for r in caplog.records if "ingest.folder_labels" in r.getMessage()]
    assert [line[: len(warning)] for line in lines] == ([warning] if warning else [])
    assert "MRN100001" not in caplog.text


def test_kermany_folder(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.delenv("RETINA_VAE_SALT", raising=False)
    src = tmp_path / "OCT2017"
    _kermany(src)
    (src / "train" / "README.md").write_text("not an image")
    # what a git-LFS clone keeps (each image again, under its hash, in a folder named like a
    # class) and a file manager's thumbnails: hidden folders, never images of the dataset
    lfs = src / ".git" / "lfs" / "objects" / "ab" / "cd"
    lfs.mkdir(parents=True)
    shutil.copy(src / "train" / "DME" / "DME-222-1.jpeg", lfs / "abcd0123456789")
    (src / "train" / "CNV" / ".thumbnails").mkdir()
    thumb = src / "train" / "CNV" / ".thumbnails" / "CNV-111-1.jpeg"
    Image.fromarray(gradient(60, 70, seed=9)).save(thumb)
    rc, paths = _run(tmp_path, ingest={"source": str(src)})
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    assert list(m.columns) == MANIFEST_COLUMNS
    assert sorted(m["label"]) == ["CNV", "CNV", "DME", "DRUSEN", "NORMAL"]
    assert m["subject_id"].nunique() == 4  # patient 111's two images share one subject
    cnv = m[m["label"] == "CNV"]
    assert cnv["subject_id"].nunique() == 1 and not m["subject_id"].str.contains("111").any()
    assert set(m["source"]) == {
        f"train/{n}.jpeg"
        for n in [
            "CNV/CNV-111-1",
            "CNV/CNV-111-2",
            "DME/DME-222-1",
            "NORMAL/NORMAL-333-1",
            "DRUSEN/DRUSEN-444-1",
        ]
    }
    assert (m["width"] == 70).all() and (m["height"] == 60).all() and (m["frame"] == 0).all()
    r = _report(paths)
    assert (r["found"], r["ingested"], r["skipped_sidecars"], r["subjects"]) == (5, 5, 3, 4)
    assert "found 5 = ingested 5 + quarantined 0 + duplicates 0" in caplog.text
    assert caplog.text.count("keyed with the built-in salt") == 1  # real data, no secret salt
    # rerun: same ids (stable pseudonyms)
    first = m[["image_id", "subject_id"]]
    assert _run(tmp_path, ingest={"source": str(src)})[0] == 0
    assert pd.read_parquet(paths.manifest)[["image_id", "subject_id"]].equals(first)


def test_csv_manifest_with_dicom_and_escape_refused(tmp_path, capsys):
    src = tmp_path / "export"
    (src / "a").mkdir(parents=True)
    make_dicom(
        src / "a" / "IM1",
        np.stack([gradient(seed=i) for i in range(3)]),
        sop_class=OCT_TOMOGRAPHY,
        phi={"PatientID": "H-1"},
        laterality="L",
    )
    Image.fromarray(gradient(seed=9)).save(src / "a" / "b.png")
    Image.fromarray(gradient(seed=8)).save(src / "unlisted.png")
    csv = tmp_path / "labels.tsv"
    csv.write_text(
        "path\tlabel\tpatient_id\teye\tsplit\n"
        "a/IM1\tDME\t\t\ttest\n"
        "a/b.png\tNORMAL\tH-2\tOD\t\n"
        "a/missing.png\tCNV\tH-3\t\t\n"
    )
    rc, paths = _run(
        tmp_path, ingest={"source": str(src), "labels": str(csv), "oct_frames": "central"}
    )
    assert rc == 0
    m = pd.read_parquet(paths.manifest).set_index("source")
    assert m.loc["a/IM1", "frame"] == 1 and m.loc["a/IM1", "split"] == "test"  # central of 3
    assert m.loc["a/IM1", "eye"] == "L" and m.loc["a/b.png", "eye"] == "R"
    assert m.loc["a/IM1", "label"] == "DME" and len(m) == 2
    assert pd.read_csv(paths.quarantine).empty  # a row naming no file is no refused file
    r = _report(paths)
    assert (r["found"], r["quarantined"], r["listed_missing"], r["unlisted"]) == (2, 0, 1, 1)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na/b.png,NORMAL\n../outside.png,CNV\n")
    rc, _ = _run(tmp_path, ingest={"source": str(src), "labels": str(csv)})
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and err.startswith("retina-vae ingest: error: ")
    assert "line 3" in err and "outside the source folder" in err


def test_csv_severity_reaches_the_manifest_and_a_bad_one_is_a_one_line_error(tmp_path, capsys):
    src = tmp_path / "export"
    src.mkdir()
    for k in range(3):
        Image.fromarray(gradient(seed=k)).save(src / f"{k}.png")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label,severity\n0.png,DME,0.25\n1.png,DME,\n2.png,NORMAL,0\n")
    rc, paths = _run(tmp_path, ingest={"source": str(src), "labels": str(csv)})
    assert rc == 0
    m = pd.read_parquet(paths.manifest).set_index("source")
    assert m["severity"].dtype == np.float64
    assert m.loc["0.png", "severity"] == 0.25 and m.loc["2.png", "severity"] == 0.0
    assert np.isnan(m.loc["1.png", "severity"])  # an empty cell: unknown
    csv.write_text("path,label,severity\n0.png,DME,0.25\n1.png,DME,severe\n")
    rc, _ = _run(tmp_path, ingest={"source": str(src), "labels": str(csv)})
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 1 and "labels.csv: line 3: severity 'severe' is not a number" in err


def test_npz_source(tmp_path):
    npz = tmp_path / "mnist.npz"
    rng = np.random.default_rng(0)
    np.savez(
        npz,
        train_images=rng.integers(0, 255, (5, 28, 28, 3), dtype=np.uint8),
        train_labels=np.array([[0], [1], [2], [3], [4]]),
        test_images=rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8),
        test_labels=np.array([[1], [0]]),
    )
    rc, paths = _run(tmp_path, ingest={"source": str(npz), "modality": "fundus", "min_size": 28})
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    assert list(m["source"][:2]) == ["train_images[0]", "train_images[1]"]
    assert list(m["label"]) == ["0", "1", "2", "3", "4", "1", "0"]
    assert list(m["split"]) == ["train"] * 5 + ["test"] * 2 and m["subject_id"].nunique() == 7
    rc, _ = _run(tmp_path, ingest={"source": str(npz), "modality": "fundus"})  # 28 < 32
    assert rc == 1


def test_broken_files_quarantined_and_counts_balance(tmp_path, capsys, caplog):
    src = tmp_path / "mixed"
    (src / "NORMAL").mkdir(parents=True)
    (src / "CNV").mkdir()
    for k in range(4):
        Image.fromarray(gradient(seed=k)).save(src / "NORMAL" / f"n{k}.png")
    Image.fromarray(gradient(seed=0)).save(src / "CNV" / "copy.png")  # same pixels, other label
    Image.fromarray(gradient(seed=0)).save(src / "NORMAL" / "copy.bmp")  # same label
    good = src / "NORMAL" / "n0.png"
    (src / "NORMAL" / "trunc.png").write_bytes(good.read_bytes()[:300])
    (src / "NORMAL" / "empty.jpg").write_bytes(b"")
    (src / "NORMAL" / "doc.pdf").write_bytes(b"%PDF-1.4 not an image")
    Image.fromarray(gradient(10, 10)).save(src / "NORMAL" / "tiny.png")
    (src / "DICOMDIR").write_bytes(b"\0" * 200)
    rc, paths = _run(tmp_path, ingest={"source": str(src)})
    assert rc == 0
    r = _report(paths)
    assert (r["found"], r["ingested"], r["quarantined"], r["duplicates"]) == (10, 4, 4, 2)
    assert r["found"] == r["ingested"] + r["quarantined"] + r["duplicates"]
    q = dict(pd.read_csv(paths.quarantine).values)
    assert q["NORMAL/empty.jpg"] == "empty file" and q["NORMAL/doc.pdf"].startswith("not an image")
    assert q["NORMAL/tiny.png"].startswith("too small") and "undecodable" in q["NORMAL/trunc.png"]
    d = pd.read_csv(paths.duplicates)
    # files are read in path order: the CNV copy comes first and is the one kept
    assert set(d["path"]) == {"NORMAL/n0.png", "NORMAL/copy.bmp"}
    assert set(d["duplicate_of"]) == {"CNV/copy.png"}
    assert "different labels: NORMAL/n0.png (NORMAL) = CNV/copy.png (CNV)" in caplog.text
    rc, _ = _run(tmp_path, ingest={"source": str(src), "max_quarantine_fraction": 0.2})
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "exceeds ingest.max_quarantine_fraction" in err[-1]


def test_a_source_without_image_files_says_so_in_one_line(tmp_path, capsys):
    src = tmp_path / "empty"
    (src / "sub").mkdir(parents=True)
    (src / "notes.txt").write_text("no images here")  # a text sidecar: skipped, not an image
    rc, paths = _run(tmp_path, ingest={"source": str(src)})
    err = capsys.readouterr().err.strip().splitlines()
    expected = f"{src}: no image files found (hidden files, DICOMDIR and text sidecars are "
    assert rc == 1 and err[-1].endswith(expected + "skipped; ingest.source?)")
    assert _report(paths)["found"] == 0


def test_nothing_usable_is_a_one_line_error(tmp_path, capsys):
    src = tmp_path / "junk"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"garbage")
    rc, paths = _run(tmp_path, ingest={"source": str(src)})
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "no usable image" in err[-1] and Path(paths.quarantine).exists()
    assert pd.read_parquet(paths.manifest).empty and _report(paths)["quarantined"] == 1
    rc, _ = _run(tmp_path, ingest={"source": str(tmp_path / "nope")})
    assert rc == 1 and "source folder not found" in capsys.readouterr().err
    rc, _ = _run(tmp_path, ingest={"source": str(src / "a.jpg")})  # one image, not a folder
    err = capsys.readouterr().err
    assert rc == 1 and f"{src / 'a.jpg'}: not a folder or an .npz file (ingest.source)" in err


def test_no_phi_in_any_output_or_log(tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RETINA_VAE_SALT", "test-secret")
    src = tmp_path / "clinic"
    src.mkdir()
    vol = np.stack([gradient(64, 64, seed=i) for i in range(3)])
    make_dicom(src / "IM000001", vol, sop_class=OCT_TOMOGRAPHY, syntax="jpeg", phi=PHI)
    make_dicom(src / "IM000002.dcm", gradient(64, 64, seed=7)[None], phi=PHI)
    params = write_params(tmp_path, ingest={"source": str(src), "folder_labels": False})
    from pipeline import preprocess

    assert ingest.main(["--params", str(params)]) == 0
    assert preprocess.main(["--params", str(params)]) == 0
    m = pd.read_parquet(load_params(params).paths.manifest)
    assert len(m) == 4 and m["subject_id"].nunique() == 1 and m["label"].isna().all()
    texts = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    texts.append((capsys.readouterr().err + caplog.text).encode())
    assert len(texts) >= 10
    values = [v for v in PHI.values()] + ["Quartermaine", "Zebedee", "7781234", "1947"]
    for value in values:
        assert not any(value.encode() in t for t in texts), value
    assert "built-in salt" not in caplog.text  # a secret salt is set


def test_patient_ids_in_file_names_stay_out_of_the_processed_arrays_and_tables(tmp_path):
    # Kermany-style names (ingest.patient_pattern's default): the patient number is the file
    # name's middle field; clinical exports name files by MRN and date the same way
    src = tmp_path / "oct"
    ids = [f"{9_100_000 + 37 * p}" for p in range(12)]
    for p, pid in enumerate(ids):
        for label in ("CNV", "NORMAL")[p % 2 : p % 2 + 1]:
            (src / label).mkdir(parents=True, exist_ok=True)
            for k in (1, 2):
                Image.fromarray(gradient(seed=10 * p + k)).save(
                    src / label / f"{label}-{pid}-{k}.png"
                )
    params = write_params(tmp_path, ingest={"source": str(src)})
    assert ingest.main(["--params", str(params)]) == 0
    assert preprocess.main(["--params", str(params)]) == 0
    paths = load_params(params).paths
    manifest = pd.read_parquet(paths.manifest)
    assert manifest["subject_id"].nunique() == 12  # the pattern found each patient
    assert all(any(pid in s for s in manifest["source"]) for pid in ids)  # the link to the files
    files = [p for p in Path(paths.processed).rglob("*") if p.is_file()]
    assert len(files) == 7  # 3 arrays, 3 tables, the preprocessing record (read below too)
    texts = [Path(paths.preprocess_report).read_text()]
    for path in files:
        if path.suffix == ".parquet":  # every name and cell, as text (the file is compressed)
            table = pd.read_parquet(path)
            texts += [*table.columns, *(str(v) for v in table.to_numpy().ravel())]
        else:
            texts.append(path.read_bytes().decode("latin-1"))
    for pid in ids:
        assert not any(pid in text for text in texts), pid


def test_a_refused_ingest_writes_every_output_of_that_run(tmp_path, capsys):
    src = tmp_path / "mixed"
    src.mkdir()

    def add(good: int, bad: int) -> None:
        start = len(list(src.iterdir()))
        for k in range(start, start + good):
            Image.fromarray(gradient(seed=k)).save(src / f"g{k}.png")
        for k in range(start, start + bad):
            (src / f"b{k}.jpg").write_bytes(b"not an image")

    add(good=4, bad=2)
    rc, paths = _run(tmp_path, ingest={"source": str(src), "max_quarantine_fraction": 0.5})
    assert rc == 0 and _report(paths)["quarantined"] == 2
    add(good=1, bad=4)  # 6 of 11 refused: over the limit
    rc, _ = _run(tmp_path, ingest={"source": str(src), "max_quarantine_fraction": 0.5})
    assert rc == 1 and "exceeds" in capsys.readouterr().err
    report = _report(paths)  # manifest, quarantine, duplicates and report: all this run's
    assert (report["found"], report["ingested"], report["quarantined"]) == (11, 5, 6)
    assert len(pd.read_parquet(paths.manifest)) == 5
    assert len(pd.read_csv(paths.quarantine)) == 6


def test_npz_multi_label_array_is_refused(tmp_path, capsys):
    npz = tmp_path / "chest.npz"
    rng = np.random.default_rng(0)
    np.savez(
        npz,
        train_images=rng.integers(0, 255, (4, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 2, (4, 14)),  # ChestMNIST-style: 14 findings per image
    )
    rc, paths = _run(tmp_path, ingest={"source": str(npz), "modality": "fundus", "min_size": 28})
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and line.startswith("retina-vae ingest: error: ")
    assert str(npz) in line and "train_labels has shape (4, 14)" in line
    assert not Path(paths.manifest).exists()


def test_npz_flat_labels_and_a_too_small_array(tmp_path):
    npz = tmp_path / "mixed.npz"
    rng = np.random.default_rng(0)
    np.savez(
        npz,
        train_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8),  # below min_size 32
        train_labels=np.array([0, 1]),
        test_images=rng.integers(0, 255, (5, 40, 40), dtype=np.uint8),
        test_labels=np.array([3, 1, 4, 1, 5]),  # (N,), not (N, 1)
    )
    rc, paths = _run(tmp_path, ingest={"source": str(npz), "modality": "fundus"})
    assert rc == 0
    assert pd.read_parquet(paths.manifest)["label"].tolist() == ["3", "1", "4", "1", "5"]
    q = pd.read_csv(paths.quarantine)
    assert q["path"].tolist() == ["train_images[0]", "train_images[1]"]
    assert q["reason"].str.startswith("too small: 28x28").all()
    assert _report(paths)["quarantine_reasons"] == {"too small": 2}  # counted by kind


def test_npz_text_labels_are_kept_as_text(tmp_path):
    npz = tmp_path / "named.npz"
    rng = np.random.default_rng(0)
    np.savez(
        npz,
        train_images=rng.integers(0, 255, (3, 32, 32), dtype=np.uint8),
        train_labels=np.array(["normal", "drusen", "normal"]),
    )
    rc, paths = _run(tmp_path, ingest={"source": str(npz), "modality": "fundus"})
    assert rc == 0
    assert pd.read_parquet(paths.manifest)["label"].tolist() == ["normal", "drusen", "normal"]


def _plain_manifest(path: str) -> bytes:
    """The manifest ingest writes, as the DataFrame of one dict per row writes it."""
    rows = pq.read_table(path).to_pylist()
    df = pd.DataFrame(
        [{k: v for k, v in r.items() if k != "modality"} for r in rows], columns=MANIFEST_COLUMNS
    )
    df["modality"] = rows[0]["modality"]
    df = df.astype({"frame": "int64", "width": "int64", "height": "int64"})
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


@pytest.mark.parametrize("folder_labels", [True, False])
def test_manifest_is_the_dataframe_of_its_rows_byte_for_byte(tmp_path, monkeypatch, folder_labels):
    monkeypatch.setattr(ArrowRows, "CHUNK", 2)  # the rows are held over several chunks
    src = tmp_path / "mixed"
    (src / "CNV").mkdir(parents=True)
    (src / "NORMAL").mkdir()
    for k in range(5):
        Image.fromarray(gradient(seed=k)).save(src / "CNV" / f"CNV-{k}-1.png")
    volume = np.stack([gradient(64, 64, seed=10 + i) for i in range(3)])
    make_dicom(src / "NORMAL" / "IM1", volume, sop_class=OCT_TOMOGRAPHY, laterality="L")
    Image.fromarray(gradient(seed=1)).save(src / "NORMAL" / "z-copy.png")  # of a flushed row
    rc, paths = _run(tmp_path, ingest={"source": str(src), "folder_labels": folder_labels})
    assert rc == 0
    manifest = pd.read_parquet(paths.manifest)
    assert len(manifest) == 8 and manifest["eye"].tolist().count("L") == 3  # eye: L or missing
    assert manifest["label"].isna().all() != folder_labels  # labels: text, or all missing
    assert Path(paths.manifest).read_bytes() == _plain_manifest(paths.manifest)
    d = pd.read_csv(paths.duplicates)
    assert d[["path", "duplicate_of"]].values.tolist() == [["NORMAL/z-copy.png", "CNV/CNV-1-1.png"]]


def test_images_are_checked_hashed_and_sized_upright(tmp_path):
    """The EXIF orientation applies before ingest's check and hash: a photo stored sideways
    (Orientation 6, as handheld fundus cameras write) is an exact duplicate of the same photo
    stored upright, and the manifest has its upright size; each page of a multi-page TIFF
    has its own size."""
    src = tmp_path / "src"
    src.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to view"
    for name, seed in (("b_sideways.png", 1), ("c_only_sideways.png", 2)):
        upright = gradient(40, 70, rgb=True, seed=seed)  # (H, W, 3): 70 wide, 40 tall
        stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # anticlockwise
        stored.save(src / name, exif=exif)
    Image.fromarray(gradient(40, 70, rgb=True, seed=1)).save(src / "a_upright.png")
    pages = [Image.fromarray(gradient(40, 50)), Image.fromarray(gradient(60, 36))]
    pages[0].save(src / "d_volume.tif", save_all=True, append_images=pages[1:])
    rc, paths = _run(tmp_path, ingest={"source": str(src)})
    assert rc == 0
    d = pd.read_csv(paths.duplicates)
    pairs = list(zip(d["path"], d["duplicate_of"], strict=True))
    assert pairs == [("b_sideways.png", "a_upright.png")]
    m = pd.read_parquet(paths.manifest)
    sizes = {(s, f): (w, h) for s, f, w, h in m[["source", "frame", "width", "height"]].values}
    assert sizes == {
        ("a_upright.png", 0): (70, 40),
        ("c_only_sideways.png", 0): (70, 40),
        ("d_volume.tif", 0): (50, 40),
        ("d_volume.tif", 1): (36, 60),
    }


# ----------------------------------------------------------------- no patient in two splits


def _photo(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient(40, 48, seed=seed)).save(path)


def _layout_folder(root: Path, patients: list[int]) -> tuple[dict, dict]:
    """Kermany: CLASS/CLASS-<patient>-<n>.jpeg, the patient from the default pattern."""
    truth = {}
    for k, p in enumerate(patients):
        for n, label in enumerate(("CNV", "NORMAL")):  # a patient's two images in two classes
            truth[f"{label}/{label}-{p}-{n}.jpeg"] = str(p)
            _photo(root / f"{label}/{label}-{p}-{n}.jpeg", 2 * k + n)
    return {}, truth


def _layout_csv_patient(root: Path, patients: list[int]) -> tuple[dict, dict]:
    """Neutral file names; the sheet's patient_id column says whose each image is."""
    truth, rows = {}, ["path,label,patient_id"]
    for k, p in enumerate(patients):
        for n in range(2):
            truth[f"img{2 * k + n}.png"] = str(p)
            _photo(root / f"img{2 * k + n}.png", 2 * k + n)
            rows.append(f"img{2 * k + n}.png,{n},P{p}")
    (root.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"labels": str(root.parent / "labels.csv")}, truth


def _layout_csv_no_patient(root: Path, patients: list[int]) -> tuple[dict, dict]:
    """EyePACS: <patient>_left/right, a sheet of names without suffix and no patient column:
    the patient comes from ingest.patient_pattern (before the fix: every image its own)."""
    truth, rows = {}, ["image,level"]
    for k, p in enumerate(patients):
        for n, side in enumerate(("left", "right")):
            truth[f"{p}_{side}.jpeg"] = str(p)
            _photo(root / f"{p}_{side}.jpeg", 2 * k + n)
            rows.append(f"{p}_{side},{n}")
    (root.parent / "trainLabels.csv").write_text("\n".join(rows) + "\n")
    sheet = {"labels": str(root.parent / "trainLabels.csv"), "path_column": "image"}
    return sheet | {"label_column": "level", "patient_pattern": r"^(\d+)_"}, truth


def _layout_dicom(root: Path, patients: list[int], sheet: bool = False) -> tuple[dict, dict]:
    """DICOM whose header PatientID is the patient, in files whose names match the default
    pattern with another number each (a decoy: the header comes before the name)."""
    truth, rows = {}, ["path,label"]
    for k, p in enumerate(patients):
        for n in range(2):
            name = f"IM-{100 + 2 * k + n}-1"
            truth[name] = str(p)
            make_dicom(
                root / name, gradient(40, 48, seed=2 * k + n)[None], phi={"PatientID": f"P{p}"}
            )
            rows.append(f"{name},{n}")
    if not sheet:
        return {"folder_labels": False}, truth
    (root.parent / "labels.csv").write_text("\n".join(rows) + "\n")
    return {"labels": str(root.parent / "labels.csv")}, truth


def _layout_npz(root: Path, patients: list[int]) -> tuple[dict, dict]:
    """MedMNIST rows: each its own subject, official splits kept."""
    rng = np.random.default_rng(len(patients))
    arrays, truth = {}, {}
    for split, n in (("train", len(patients)), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 32, 32), dtype=np.uint8)
        truth |= {f"{split}_images[{i}]": f"{split}{i}" for i in range(n)}
    np.savez(root.with_suffix(".npz"), **arrays)
    return {"source": str(root.with_suffix(".npz"))}, truth


LAYOUTS = {
    "folder": _layout_folder,
    "csv_with_patient_id": _layout_csv_patient,
    "csv_without_patient_id": _layout_csv_no_patient,
    "dicom": _layout_dicom,
    "dicom_listed_in_csv": lambda root, patients: _layout_dicom(root, patients, sheet=True),
    "npz": _layout_npz,
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_no_patient_is_in_two_splits_in_any_layout(tmp_path, layout, seed):
    """Property over layouts and random patient sets: after the real ingest and preprocess's
    subject split, every patient's images are in one split, and there is one subject per
    patient (CSV patient_id > DICOM PatientID > ingest.patient_pattern > own subject)."""
    rng = np.random.default_rng(seed)
    patients = sorted(rng.choice(np.arange(1, 1000), int(rng.integers(6, 12)), replace=False))
    root = tmp_path / "src"
    root.mkdir()
    groups, truth = LAYOUTS[layout](root, [int(p) for p in patients])
    rc, paths = _run(tmp_path, ingest={"source": str(root), "workers": 1} | groups)
    assert rc == 0
    m = pd.read_parquet(paths.manifest)
    assert sorted(m["source"]) == sorted(truth)
    m["patient"] = m["source"].map(truth)
    assert m["subject_id"].nunique() == m["patient"].nunique()
    m["split"] = preprocess.assign_splits(m, 0.3, 0.3, seed)
    splits_per_patient = m.groupby("patient")["split"].nunique()
    assert (splits_per_patient == 1).all(), splits_per_patient[splits_per_patient > 1].to_dict()


def test_burned_in_annotation_is_quarantined_and_counted_unless_allowed(tmp_path):
    """A DICOM flagged Burned In Annotation YES is quarantined with a reason naming the tag (no
    header value in it); ``ingest.allow_burned_in_annotation`` keeps it through preprocess."""
    src = tmp_path / "clinic"
    src.mkdir()
    for k in range(2):
        Image.fromarray(gradient(64, 64, seed=k)).save(src / f"clean{k}.png")
    make_dicom(
        src / "IM0001.dcm", gradient(64, 64, seed=5)[None], phi={**PHI, "BurnedInAnnotation": "YES"}
    )
    rc, paths = _run(tmp_path, ingest={"source": str(src), "folder_labels": False})
    r = _report(paths)
    assert rc == 0 and (r["found"], r["ingested"], r["quarantined"]) == (3, 2, 1)
    assert r["quarantine_reasons"] == {"burned-in annotation": 1}
    quarantine = Path(paths.quarantine).read_text()
    assert "IM0001.dcm" in quarantine and "(0028,0301)" in quarantine
    assert not any(v in quarantine for v in PHI.values())
    params = write_params(
        tmp_path,
        ingest={"source": str(src), "folder_labels": False, "allow_burned_in_annotation": True},
    )
    assert ingest.main(["--params", str(params)]) == 0
    assert (_report(paths)["ingested"], _report(paths)["quarantined"]) == (3, 0)
    assert preprocess.main(["--params", str(params)]) == 0  # preprocess reads it too


# ------------------------------------------------------ JPEG duplicates confirmed at full size


def _dct_twins() -> tuple[bytes, bytes]:
    """Two 128 px grey JPEGs whose 1/2-scale DCT decodes (ingest's check scale) are identical
    while their full-size pixels differ: the second adds, in one 8x8 block, the horizontal DCT
    basis of frequency 4, which a decode at half scale (frequencies 0-3) drops."""
    y, x = np.mgrid[0:128, 0:128]
    base = (40 + (x // 8) * 6 + (y // 8) * 4).astype(np.uint8)  # flat within each DCT block
    lesion = base.astype(int)
    lesion[40:48, 40:48] += 30 * np.array([1, -1, -1, 1, 1, -1, -1, 1])
    out = []
    for a in (base, lesion.astype(np.uint8)):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out[0], out[1]


def _pillow(data: bytes, draft: bool) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        if draft:
            im.draft(im.mode, ingest.CHECK_SIZE)
        return np.asarray(im)


# files (name -> which twin) -> the duplicate pairs listed (path, duplicate_of)
TWINS = {
    "different_pictures": ({"n.jpg": 0, "l.jpg": 1}, []),
    "byte_copy": ({"n.jpg": 0, "c.jpg": 0}, [("n.jpg", "c.jpg")]),
    "copies_of_both": (
        {"a.jpg": 0, "b.jpg": 1, "c.jpg": 0, "d.jpg": 1},
        [("c.jpg", "a.jpg"), ("d.jpg", "b.jpg")],
    ),
}


@pytest.mark.parametrize("case", sorted(TWINS))
def test_jpeg_duplicates_are_confirmed_on_full_size_pixels(tmp_path, case):
    files, pairs = TWINS[case]
    twins = _dct_twins()
    reduced = [_pillow(t, draft=True) for t in twins]  # Pillow's own decodes: the reference
    full = [_pillow(t, draft=False) for t in twins]
    assert reduced[0].shape == (64, 64) and np.array_equal(reduced[0], reduced[1])
    assert not np.array_equal(full[0], full[1])
    src = tmp_path / "src"
    src.mkdir()
    for name, k in files.items():
        (src / name).write_bytes(twins[k])
    rc, paths = _run(tmp_path, ingest={"source": str(src)})
    assert rc == 0
    d = pd.read_csv(paths.duplicates)
    assert list(zip(d["path"], d["duplicate_of"], strict=True)) == pairs
    m = pd.read_parquet(paths.manifest)
    assert sorted(m["source"]) == sorted(set(files) - {p for p, _ in pairs})
    r = _report(paths)
    assert (r["found"], r["ingested"], r["duplicates"]) == (len(files), len(m), len(pairs))


# ------------------------------------------------------ library tracebacks never reach the log

DAMAGED_STREAMS = {  # transfer syntax of the damaged file -> its garbage codestream
    "jpeg": b"\xff\xd8garbage" * 10,
    "j2k_lossless": b"\xff\x4f\xff\x51garbage" * 10,
}


def test_damaged_dicom_is_one_reason_without_library_traceback(tmp_path, capfd, caplog):
    """pydicom logs each decoder plugin's failure with its traceback (LOGGER.exception): in the
    stage's own process (workers 1) none of it may reach the log; the quarantine reason is the
    message. Reference: the codestreams are garbage, so pydicom's own decode fails too."""
    caplog.set_level(logging.DEBUG)
    src = tmp_path / "src"
    src.mkdir()
    for syntax, garbage in DAMAGED_STREAMS.items():
        path = make_dicom(src / f"{syntax}.dcm", gradient(64, 64)[None], syntax=syntax)
        ds = pydicom.dcmread(path)
        ds.PixelData = encapsulate([garbage])
        ds.save_as(path)
        with pytest.raises(Exception):  # noqa: B017, PT011 -- pydicom's own failure, any kind
            pydicom.pixels.pixel_array(path)
    for k in range(2):
        Image.fromarray(gradient(64, 64, seed=k)).save(src / f"good{k}.png")
    caplog.clear()  # only the stage's own output is judged
    capfd.readouterr()
    rc, paths = _run(tmp_path, ingest={"source": str(src), "max_quarantine_fraction": 1.0})
    log = capfd.readouterr().err + caplog.text
    assert rc == 0 and "Traceback" not in log and "pydicom" not in log
    assert not [r for r in caplog.records if r.name.startswith("pydicom") or r.exc_info]
    q = dict(pd.read_csv(paths.quarantine).values)
    assert {k: v.startswith("undecodable DICOM pixel data") for k, v in q.items()} == {
        f"{s}.dcm": True for s in DAMAGED_STREAMS
    }


# ------------------------------------------------ file names that are not UTF-8 (latin-1 zips)

NAME = b"Schr\xf6dinger_OD.png"  # latin-1 bytes: not UTF-8; 'dinger' stands for a patient name
NOT_UTF8 = {  # case: (relative path as bytes, its label sheet lists the good files)
    "file name": (NAME, False),
    "folder name": (b"Schr\xf6dinger/OD.png", False),
    "file name, label sheet": (NAME, True),
}


@pytest.mark.parametrize("case", NOT_UTF8)
def test_a_file_name_that_is_not_utf8_is_quarantined_without_showing_it(
    tmp_path, case, capfd, caplog
):
    """Such a file (os.fsencode bytes) is quarantined with a one-line reason; its name reaches
    no log line and no reason; quarantine.csv shows its path with the bytes escaped (Python's
    own backslashreplace of the known bytes), so it can be found and renamed."""
    caplog.set_level(logging.DEBUG)
    rel, sheet = NOT_UTF8[case]
    src = tmp_path / "src"
    src.mkdir()
    for k in range(3):
        Image.fromarray(gradient(64, 64, seed=k)).save(src / f"good{k}.png")
    odd = os.path.join(os.fsencode(src), rel)
    os.makedirs(os.path.dirname(odd), exist_ok=True)
    Image.fromarray(gradient(64, 64, seed=9)).save(odd)
    ingest_params = {"source": str(src), "max_quarantine_fraction": 1.0}
    if sheet:
        (tmp_path / "labels.csv").write_text(
            "path,label\n" + "".join(f"good{k}.png,{k}\n" for k in range(3))
        )
        ingest_params["labels"] = str(tmp_path / "labels.csv")
    rc, paths = _run(tmp_path, ingest=ingest_params)
    log = (capfd.readouterr().err + caplog.text).encode("utf-8", "backslashreplace")
    assert rc == 0 and b"Traceback" not in log and b"dinger" not in log
    q = pd.read_csv(paths.quarantine)
    assert list(q["path"]) == [rel.decode("latin-1").replace("\xf6", "\\xf6")]
    assert list(q["reason"]) == ["file or folder name is not valid UTF-8 (rename it)"]
    r = _report(paths)
    assert (r["found"], r["ingested"], r["quarantined"], r["files"]) == (4, 3, 1, 4)
    assert sorted(pd.read_parquet(paths.manifest)["source"]) == [f"good{k}.png" for k in range(3)]


def _two_frame_tiff() -> bytes:
    buf = io.BytesIO()
    frames = [Image.fromarray(gradient(64, 64, seed=s)) for s in (1, 2)]
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _jpeg_with_comment(comment: bytes) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient(64, 64, seed=3)).save(buf, "JPEG", quality=90, comment=comment)
    return buf.getvalue()


# case: (bytes of file a, of file b, frames compared, one image?) -- the reference is the
# bytes (filecmp) for a byte copy, Pillow's own decodes otherwise
BYTE_COPIES = {
    "byte copies, not even decodable": (b"\xff\xd8 damaged" * 9, b"\xff\xd8 damaged" * 9, (0, 0)),
    "byte copies, other frames": (_two_frame_tiff(), _two_frame_tiff(), (0, 1)),
    "same size, other bytes, same pixels": (
        _jpeg_with_comment(b"aa"),
        _jpeg_with_comment(b"bb"),
        (0, 0),
    ),
}


@pytest.mark.parametrize("case", BYTE_COPIES)
def test_full_size_confirmation_takes_byte_copies_without_decoding(tmp_path, case):
    """The same frame of byte-identical files is one image without a decode (a file no
    decoder reads shows none is made); anything else is decided on full-size pixels."""
    data_a, data_b, (fa, fb) = BYTE_COPIES[case]
    (tmp_path / "a").write_bytes(data_a)
    (tmp_path / "b").write_bytes(data_b)
    copies = filecmp.cmp(tmp_path / "a", tmp_path / "b", shallow=False)
    if copies and fa == fb:
        want = True
    else:
        with Image.open(io.BytesIO(data_a)) as im:
            im.seek(fa)
            pixels_a = np.asarray(im.convert("L"))
        with Image.open(io.BytesIO(data_b)) as im:
            im.seek(fb)
            pixels_b = np.asarray(im.convert("L"))
        want = np.array_equal(pixels_a, pixels_b)
        assert len(data_a) == len(data_b) or fa != fb  # the size alone decides nothing here
    assert ingest.FullSize(tmp_path, None)("a", fa, "b", fb) is bool(want)


def test_a_relative_source_and_sheet_are_read_at_the_repository_root_in_a_dvc_temp_copy(
    tmp_path, monkeypatch
):
    """In the temporary copy of `dvc exp run --temp` or a queued run, a relative
    ingest.source and ingest.labels are the workspace's ../data, not the copy's."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    for k in range(3):
        Image.fromarray(gradient(60, 70, seed=k)).save(images / f"im{k}.png")
    (tmp_path / "data" / "grades.csv").write_text("id,grade\nim0,2\nim1,0\nim2,1\n")
    copy = dvc_temp_copy(tmp_path / "repo")
    monkeypatch.chdir(copy)
    ingest_ = {"source": "../data/images", "labels": "../data/grades.csv"}
    rc, paths = _run(copy, ingest=ingest_ | {"path_column": "id", "label_column": "grade"})
    assert rc == 0
    manifest = pd.read_parquet(paths.manifest)
    labels = dict(zip(manifest["source"], manifest["label"], strict=True))
    assert labels == {"im0.png": "2", "im1.png": "0", "im2.png": "1"}
