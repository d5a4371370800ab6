"""Library warnings raised while decoding: one counted line per kind, no path or header value."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from pipeline import ingest, libwarn, preprocess
from pipeline.params import load_params
from tests.pipeline.dicom_factory import PHI, gradient, make_dicom, write_params

PYDICOM_FILE = "/x/lib/python3.11/site-packages/pydicom/pixels/decoders/base.py"


@pytest.mark.parametrize(
    ("message", "filename", "expected"),
    [
        (
            "The (0028,0004) 'Photometric Interpretation' value is 'RGB' however the encoded "
            "image's codestream contains a JFIF APP marker which indicates it should be "
            "'YBR_FULL_422'",
            PYDICOM_FILE,
            "pydicom: The (0028,0004) 'Photometric Interpretation' value is 'RGB' however the "
            "encoded image's codestream contains a JFIF APP marker which indicates it should "
            "be 'YBR_FULL_422'",
        ),
        (
            "3 frames have been found in the encapsulated pixel data, which is larger than the "
            "given (0028,0008) 'Number of Frames' value of 2.",
            PYDICOM_FILE,
            "pydicom: N frames have been found in the encapsulated pixel data, which is larger "
            "than the given (0028,0008) 'Number of Frames' value of N.",
        ),
        # a header value in the text (here a patient name) never reaches the line
        ("Invalid value for VR PN: 'Quartermaine^Zebedee'", "/data/PHI-7781234.dcm", "warning: "),
        ('bad "PHI-7781234" in /data/x', "", "warning: bad '...' in /data/x"),
    ],
)
def test_kind_hides_values_and_counts_but_keeps_dicom_terms(message, filename, expected):
    got = libwarn.kind(message, filename)
    assert got.startswith(expected)
    assert "Quartermaine" not in got and "7781234" not in got


def _mismatched_colour_dicom(path: Path, seed: int) -> None:
    """A JPEG-baseline DICOM whose header says RGB while its JFIF codestream is YCbCr: pydicom
    warns (and decodes it as YBR)."""
    make_dicom(path, gradient(64, 64, rgb=True, seed=seed)[None], syntax="jpeg", phi=PHI)
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(path)


def test_pydicom_colour_warnings_are_one_counted_line_without_paths(tmp_path, capfd, caplog):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):  # file names that carry the patient ID, as exports often do
        _mismatched_colour_dicom(src / f"PHI-7781234-{k}.dcm", seed=k)
    params = write_params(tmp_path, ingest={"source": str(src), "modality": "fundus"})
    assert ingest.main(["--params", str(params)]) == 0
    err = capfd.readouterr().err + "\n".join(caplog.messages)
    lines = [line for line in err.splitlines() if "Photometric" in line]
    assert lines == [
        "2 files: pydicom: The (0028,0004) 'Photometric Interpretation' "
        "value is 'RGB' however the encoded image's codestream contains a JFIF APP marker "
        "which indicates it should be 'YBR_FULL_422'"
    ]
    assert "UserWarning" not in err and "warn_and_log" not in err
    assert not any(value in err for value in PHI.values()) and "7781234" not in err
    report = json.loads(Path(load_params(params).paths.ingest_report).read_text())
    assert list(report["decode_warnings"].values()) == [2]
    # preprocess decoding the files itself (another image size than ingest prepared) too
    params = write_params(
        tmp_path,
        ingest={"source": str(src), "modality": "fundus"},
        preprocess={"image_size": [40, 40]},
    )
    caplog.clear()
    assert preprocess.main(["--params", str(params)]) == 0
    err = capfd.readouterr().err
    assert "UserWarning" not in err
    assert [r.name for r in caplog.records if "Photometric" in r.message] == [
        "retina_vae.preprocess"
    ]


@pytest.mark.slow
def test_ray_engine_counts_decode_warnings_like_the_local_engine(ray_session, tmp_path, caplog):
    """Preprocess's Ray Data tasks catch their decode warnings and the driver reports them as
    one counted line (they were printed raw by the workers before)."""
    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):
        _mismatched_colour_dicom(src / f"PHI-7781234-{k}.dcm", seed=k)
    groups = {"ingest": {"source": str(src), "modality": "fundus"}, "data": {"engine": "ray"}}
    params = write_params(tmp_path, **groups)
    assert ingest.main(["--params", str(params)]) == 0
    # another image size than ingest prepared: preprocess's Ray tasks decode the files again
    params = write_params(tmp_path, **groups, preprocess={"image_size": [40, 40]})
    caplog.clear()
    assert preprocess.main(["--params", str(params)]) == 0
    counted = [r for r in caplog.records if "Photometric" in r.getMessage()]
    assert [(r.name, r.getMessage()[:8]) for r in counted] == [("retina_vae.ray_data", "2 files:")]
    assert "7781234" not in counted[0].getMessage()
