"""The demo stage: real files (JPEG/PNG/DICOM), labels.csv, fake PHI, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pydicom
import pytest

from pipeline import demo, synth
from pipeline.params import load_params
from tests.pipeline.dicom_factory import write_params


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_demo_writes_labelled_mixed_collection(tmp_path):
    params = write_params(tmp_path, demo={"patients": 4, "dicom_fraction": 0.5})
    assert demo.main(["--params", str(params)]) == 0
    out = Path(load_params(params).paths.demo)
    labels = pd.read_csv(out / "labels.csv", dtype=str)
    assert list(labels.columns) == ["path", "label", "patient_id", "eye", "severity"]
    assert set(labels["label"]) <= {"NORMAL", "DRUSEN", "CNV", "DME"}
    severity = labels["severity"].astype(float)  # the lesion size each image was drawn with
    assert severity.between(0, 1).all() and (severity[labels["label"] == "NORMAL"] == 0).all()
    assert severity[labels["label"] != "NORMAL"].nunique() > 1
    assert labels["patient_id"].nunique() == 4 and set(labels["eye"]) <= {"R", "L"}
    assert all((out / p).is_file() for p in labels["path"])
    kinds = {Path(p).suffix or "(none)" for p in labels["path"]}
    assert kinds & {".jpeg", ".png"} and kinds & {".dcm", "(none)"}
    dicoms = [out / p for p in labels["path"] if p.startswith("dicom/")]
    ds = pydicom.dcmread(dicoms[0])
    row = labels[labels["path"] == dicoms[0].relative_to(out).as_posix()].iloc[0]
    assert ds.PatientID == row["patient_id"] and str(ds.PatientName) and ds.PatientBirthDate
    assert ds.NumberOfFrames == 2 and ds.Rows == 64 and ds.Columns == 72  # OCT volume per eye


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["fundus", "oct"])
def test_demo_byte_identical_whatever_the_workers(tmp_path, modality):
    a = tmp_path / "a"
    b = tmp_path / "b"
    a.mkdir()
    b.mkdir()
    pa = write_params(a, demo={"workers": 1, "dicom_fraction": 0.7}, ingest={"modality": modality})
    pb = write_params(b, demo={"workers": 2, "dicom_fraction": 0.7}, ingest={"modality": modality})
    assert demo.main(["--params", str(pa)]) == 0
    assert demo.main(["--params", str(pb)]) == 0
    da = _digests(Path(load_params(pa).paths.demo))
    assert da == _digests(Path(load_params(pb).paths.demo)) and len(da) > 5
    labels = pd.read_csv(Path(load_params(pa).paths.demo) / "labels.csv")
    classes = {"fundus": synth.FUNDUS_CLASSES, "oct": synth.OCT_CLASSES}[modality]
    assert set(labels["label"]) <= set(classes)


def test_demo_unused_when_source_is_a_folder(tmp_path):
    params = write_params(tmp_path, ingest={"source": str(tmp_path / "mine")})
    assert demo.main(["--params", str(params)]) == 0
    out = Path(load_params(params).paths.demo)
    assert [p.name for p in out.iterdir()] == ["README.txt"]
    assert "unused" in (out / "README.txt").read_text()
