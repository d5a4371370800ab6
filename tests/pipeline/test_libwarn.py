"""Library warnings raised while decoding: one counted line per kind, no path or header value."""

from __future__ import annotations

import io
import json
import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import ImageCms

from pipeline import ingest, libwarn, preprocess
from pipeline.params import load_params
from tests.pipeline.dicom_factory import PHI, gradient, make_dicom, write_params
from tests.pipeline.test_readers import _png16

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
            "given (0028,0008) 'Number of Frames' value of 2. The returned data will include "
            "these extra frames and if it's correct then you should update 'Number of Frames' "
            "accordingly, otherwise pass 'allow_excess_frames=False' to return only the first "
            "2 frames.",
            PYDICOM_FILE,
            "pydicom: N frames have been found in the encapsulated pixel data, which is larger "
            "than the given (0028,0008) 'Number of Frames' value of N.",
        ),
        # a header value in the text (here a patient name) never reaches the line
        ("Invalid value for VR PN: 'Quartermaine^Zebedee'", "/data/PHI-7781234.dcm", "warning: "),
        ('bad "PHI-7781234" in /data/x', "", "warning: bad '...'"),
        # bytes, and a repr cut short before its closing quote (tifffile's {exc!r:.128})
        ("tag b'Zebedee PHI-7781234' invalid", "", "warning: tag '...'"),
        (
            "raised ValueError('Quartermaine^Zebedee PHI-77812",
            "",
            "warning: raised ValueError( '...'",
        ),
        ("profile 'Zebedee's PHI-7781234': bad", "", "warning: profile '...'"),
    ],
)
def test_kind_hides_values_and_counts_but_keeps_dicom_terms(message, filename, expected):
    got = libwarn.kind(message, filename)
    assert got.startswith(expected)
    assert "Quartermaine" not in got and "7781234" not in got


# Library messages quoting file content (Q: a fake patient) in ways no rule over quotes can
# bound: what follows a quote that opens, a name after "profile", a path, never shows
@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "iCCP: profile 'Jones' Q': 'xxxx': invalid signature",
            "iCCP: profile '...': invalid signature",
        ),
        ("iCCP: profile 'Q's x': 'xxxx': too short", "iCCP: profile '...': too short"),
        ("iCCP: profile Q: invalid signature", "iCCP: profile '...': invalid signature"),
        ("iCCP: profile 'a': Q", "iCCP: profile '...'"),
        ("Invalid value for VR LO: 'a\\' Q\"x'", "Invalid value for VR LO: '...'"),
        ("Invalid value for VR LO: 'a\\' Q", "Invalid value for VR LO: '...'"),
        ('value "a\\" Q"', "value '...'"),
        ("value b'a\\' Q' bad", "value '...'"),
        ("value rb's Q' bad", "value '...'"),
        ("value `a` Q` bad", "value '...'"),
        ("value \u2018a\u2019 Q\u2019 bad", "value '...'"),
        ("value \u201ca\u201d Q\u201d bad", "value '...'"),
        ("value \u00aba\u00bb Q\u00bb bad", "value '...'"),
        ("value 'unbalanced Q", "value '...'"),
        ("value a' Q 'b' c", "value a '...'"),
        (
            "The (0028,0004) 'Photometric Interpretation' value is 'RGB' Q' however",
            "The (0028,0004) '...'",
        ),
        (
            "The (0028,0004) 'Photometric Interpretation' value is 'RGB' however the encoded "
            "image's codestream contains a JFIF APP marker which indicates it should be 'RGB' Q",
            "The (0028,0004) '...'",
        ),
        ("cannot read /data/Q/scan.tif now", "cannot read '...'"),
        ("TiffFile: file name Q", "TiffFile: file '...'"),
    ],
)
def test_kind_never_keeps_text_after_a_quote_opens(message, expected):
    got = libwarn.kind(message.replace("Q", "Zebedee Quartermaine MRN7781234"), library="x")
    assert got == f"x: {expected}"


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


NAME = "Zebedee Quartermaine MRN7781234"  # a fake patient in free header text


@contextmanager
def _root_log() -> Iterator[io.StringIO]:
    """Every line that reaches the root logger's handlers (a stage's stderr), all levels.
    Not caplog: pytest taps non-propagating loggers directly, which a run does not."""
    buf, root = io.StringIO(), logging.getLogger()
    handler, level = logging.StreamHandler(buf), root.level
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _png16_with_profile_name(path: Path, seed: int) -> None:
    """A 16-bit RGB PNG (decoded by libpng through imagecodecs) whose iCCP chunk names its
    profile after a patient and holds a profile with a bad signature: libpng warns, quoting
    the name."""
    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[36:40] = b"xxxx"  # not 'acsp'
    iccp = (b"iCCP", NAME.encode() + b"\0\0" + zlib.compress(bytes(profile)))
    _png16(path, gradient(48, 64, rgb=True, seed=seed).astype(np.uint16) * 200, iccp)


@pytest.mark.parametrize("workers", [1, 2])
def test_decoder_log_records_never_quote_header_text(tmp_path, capfd, workers):
    """libpng's warning (imagecodecs' logger) quotes the iCCP profile name: ingest counts it
    as a kind with the name hidden, in its own process and in worker processes alike; the
    name is in no log line, stdout, stderr or output."""
    src = tmp_path / "src"
    src.mkdir()
    for k in range(2):
        _png16_with_profile_name(src / f"scan{k}.png", seed=k)
    params = write_params(tmp_path, ingest={"source": str(src), "workers": workers})
    with _root_log() as logged:
        assert ingest.main(["--params", str(params)]) == 0
    out, err = capfd.readouterr()
    written = "".join(p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*.*"))
    for text in (out, err, logged.getvalue(), written):
        assert "Zebedee" not in text and "7781234" not in text
    report = json.loads(Path(load_params(params).paths.ingest_report).read_text())
    kind = "imagecodecs: PNG warning: iCCP: profile '...': invalid signature"
    assert report["decode_warnings"] == {kind: 2}
    assert f"retina_vae.ingest: 2 files: {kind}" in logged.getvalue()


@pytest.mark.parametrize("library", libwarn.LIBRARY_LOGGERS)
def test_library_log_records_are_kinds_inside_and_outside_a_file(library):
    """A decode library's record (here one logged on its logger, as it would) is a kind of the
    file being decoded, and outside any file one line with its quoted values hidden."""
    libwarn.route_library_logs()
    logger = logging.getLogger(f"{library}.decoder")
    with _root_log() as logged, libwarn.caught() as kinds:
        logger.warning("tag 'Quartermaine^Zebedee' ignored")
        logger.debug("value 'Quartermaine^Zebedee'")  # debug lines are dropped
    assert kinds == [f"{library}: tag '...'"] and logged.getvalue() == ""
    with _root_log() as logged:
        logger.error("file 'PHI-7781234.tif' raised ValueError('Zebedee")
    want = f"retina_vae.libwarn: {library}: file '...'\n"
    assert logged.getvalue() == want
