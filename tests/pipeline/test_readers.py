"""Decoding: every DICOM variant (built here with pydicom) and every photo format."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline.readers import BadImage, is_candidate, is_dicom, read_image
from tests.pipeline.dicom_factory import (
    OCT_TOMOGRAPHY,
    OPHTHALMIC_PHOTO_16,
    SECONDARY_CAPTURE,
    gradient,
    make_dicom,
    malformed_tiff,
)


def smooth(rgb: bool = False) -> np.ndarray:
    """A smooth picture, so lossy codecs stay within a few grey levels of it."""
    yy, xx = np.mgrid[0:48, 0:64]
    base = np.minimum(40 + 2 * yy + 2 * xx, 250).astype(np.uint8)
    return np.stack([base, 255 - base, base // 2 + 60], axis=-1) if rgb else base


LOSSLESS = ["explicit", "implicit", "rle", "jpeg_lossless", "jpegls", "j2k_lossless"]
LOSSY = ["jpeg", "jpeg_extended", "j2k"]


@pytest.mark.parametrize("syntax", LOSSLESS + LOSSY)
def test_dicom_grayscale_transfer_syntaxes(tmp_path, syntax):
    img = smooth()
    path = make_dicom(tmp_path / "x.dcm", img[None], syntax=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID.name  # a real, readable file
    d = read_image(path)
    ((frame, px),) = d.frames
    assert frame == 0 and px.dtype == np.uint8 and px.shape == img.shape
    err = np.abs(px.astype(int) - img).max()
    assert err == 0 if syntax in LOSSLESS else err <= 12
    assert (d.width, d.height, d.n_frames, d.eye) == (64, 48, 1, "R")


@pytest.mark.parametrize("syntax", ["explicit", "rle", "jpegls", "j2k_lossless", "jpeg"])
def test_dicom_colour_is_rgb(tmp_path, syntax):
    img = smooth(rgb=True)
    path = make_dicom(tmp_path / "c.dcm", img[None], syntax=syntax)
    ((_, px),) = read_image(path).frames
    assert px.shape == (48, 64, 3)
    # JPEG is stored as YBR_FULL_422: decoded back to RGB, not left in YCbCr
    assert np.abs(px.astype(int) - img).mean() < (4 if syntax == "jpeg" else 1e-9)


def test_dicom_ybr_full_uncompressed_converted_to_rgb(tmp_path):
    rgb = smooth(rgb=True)
    ybr = pydicom.pixels.convert_color_space(rgb, "RGB", "YBR_FULL")
    path = make_dicom(tmp_path / "y.dcm", ybr[None], photometric="YBR_FULL")
    ((_, px),) = read_image(path).frames
    assert np.abs(px.astype(int) - rgb).max() <= 2


def test_dicom_16bit_scaled_to_uint8(tmp_path):
    img = gradient().astype(np.uint16) * 16  # 12-bit data in 16-bit words
    for syntax in ("explicit", "jpeg_lossless", "jpegls"):
        path = make_dicom(
            tmp_path / f"{syntax}.dcm",
            img[None],
            syntax=syntax,
            bits_stored=12,
            sop_class=OPHTHALMIC_PHOTO_16,
        )
        ((_, px),) = read_image(path).frames
        lo, hi = int(img.min()), int(img.max())
        expected = np.round((img.astype(float) - lo) * 255 / (hi - lo))
        assert px.dtype == np.uint8 and np.abs(px - expected).max() <= 0.5, syntax


@pytest.mark.parametrize("bits", [8, 12])
def test_monochrome1_inverted(tmp_path, bits):
    """0 is white in MONOCHROME1: an 8-bit image is 255 - x (inverted over its Bits Stored
    range, not mirrored within its own min..max); a 12-bit one is inverted, then scaled."""
    img = smooth() if bits == 8 else smooth().astype(np.uint16) * 16
    path = make_dicom(tmp_path / "m1.dcm", img[None], photometric="MONOCHROME1", bits_stored=bits)
    ((_, px),) = read_image(path).frames
    inverted = (2**bits - 1) - img.astype(float)
    lo, hi = inverted.min(), inverted.max()
    expected = inverted if bits == 8 else np.round((inverted - lo) * 255 / (hi - lo))
    assert np.array_equal(px, expected.astype(np.uint8))


def test_rescale_and_window_applied(tmp_path):
    img = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (40, 1))  # (40, 100) ramp 0..990
    path = make_dicom(tmp_path / "w.dcm", img[None], rescale=(2.0, -100.0), window=(900, 400))
    ((_, px),) = read_image(path).frames
    hu = img[0] * 2.0 - 100.0  # (100,) rescaled values; the window keeps 700..1100
    assert (px[:, hu <= 699] == 0).all() and (px[:, hu >= 1100] == 255).all()
    inside = px[0, (hu > 720) & (hu < 1080)]
    assert (np.diff(inside.astype(int)) > 0).all()  # strictly rising inside the window


@pytest.mark.parametrize("syntax", ["explicit", "jpeg", "rle"])
def test_multiframe_oct_all_or_central(tmp_path, syntax):
    vol = np.stack([np.full((40, 50), 30 * (i + 1), np.uint8) for i in range(5)])  # (5, 40, 50)
    path = make_dicom(tmp_path / "IM0001", vol, syntax=syntax, sop_class=OCT_TOMOGRAPHY)
    assert is_dicom(path)  # no suffix: recognised by the DICM preamble
    d = read_image(path)
    assert [i for i, _ in d.frames] == [0, 1, 2, 3, 4] and d.n_frames == 5
    assert [int(np.median(px)) for _, px in d.frames] == [30, 60, 90, 120, 150]
    central = read_image(path, oct_central=True)
    assert [i for i, _ in central.frames] == [2] and int(np.median(central.frames[0][1])) == 90
    picked = read_image(path, frames=[4, 1])
    assert [i for i, _ in picked.frames] == [4, 1]


def test_secondary_capture_and_patient_fields(tmp_path):
    path = make_dicom(
        tmp_path / "sc.dcm",
        smooth()[None],
        sop_class=SECONDARY_CAPTURE,
        phi={"PatientID": "P-1"},
        laterality="L",
    )
    d = read_image(path)
    assert d.patient_id == "P-1" and d.eye == "L" and d.frames[0][1].shape == (48, 64)


def test_bad_dicoms(tmp_path):
    good = make_dicom(tmp_path / "g.dcm", smooth()[None], syntax="rle")
    truncated = tmp_path / "t.dcm"
    truncated.write_bytes(good.read_bytes()[:-200])
    no_pixels = tmp_path / "report.dcm"
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(no_pixels)
    bomb = make_dicom(tmp_path / "big.dcm", np.zeros((3, 40, 40), np.uint8))
    with pytest.raises(BadImage, match="truncated DICOM"):
        read_image(truncated)
    cut = tmp_path / "cut.dcm"  # uncompressed pixel data cut short
    cut.write_bytes(make_dicom(tmp_path / "u.dcm", smooth()[None]).read_bytes()[:-500])
    with pytest.raises(BadImage, match="truncated DICOM|undecodable DICOM"):
        read_image(cut)
    with pytest.raises(BadImage, match="without pixel data"):
        read_image(no_pixels)
    with pytest.raises(BadImage, match="decompression bomb"):
        read_image(bomb, max_pixels=40 * 40 * 2)  # rows*cols*frames checked before decoding
    garbage = tmp_path / "x.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00" * 5)
    with pytest.raises(BadImage):
        read_image(garbage)


def test_candidates_skip_dicomdir_and_sidecars(tmp_path):
    assert not is_candidate(tmp_path / "DICOMDIR")
    assert not is_candidate(tmp_path / "labels.csv")
    assert not is_candidate(tmp_path / ".DS_Store")
    assert is_candidate(tmp_path / "IM0001") and is_candidate(tmp_path / "a.jpeg")


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("TIFF", "tif"), ("BMP", "bmp")])
def test_lossless_photos(tmp_path, fmt, ext):
    for img in (gradient(), gradient(rgb=True)):
        path = tmp_path / f"x.{ext}"
        Image.fromarray(img).save(path, fmt)
        ((_, px),) = read_image(path).frames
        assert np.array_equal(px, img)


def test_png_16bit(tmp_path):
    img = gradient().astype(np.uint16) * 200
    path = tmp_path / "x16.png"
    Image.fromarray(img).save(path)
    ((_, px),) = read_image(path).frames
    expected = np.round((img - img.min()) * (255 / (img.max() - img.min())))
    assert px.dtype == np.uint8 and np.abs(px - expected).max() <= 0.5


def test_jpeg_draft_decodes_smaller_and_keeps_native_size(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(gradient(800, 1000, rgb=True)).save(path, quality=90)
    d = read_image(path, draft=(100, 100))
    assert (d.width, d.height) == (1000, 800)
    assert d.frames[0][1].shape == (100, 125, 3)  # 1/8 DCT scale: still >= 100 per side
    assert read_image(path, draft=(200, 200)).frames[0][1].shape == (200, 250, 3)


def test_multipage_tiff_is_a_volume(tmp_path):
    pages = [Image.fromarray(np.full((40, 40), v, np.uint8)) for v in (10, 20, 30)]
    path = tmp_path / "vol.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert [int(px[0, 0]) for _, px in read_image(path).frames] == [10, 20, 30]
    assert [i for i, _ in read_image(path, oct_central=True).frames] == [1]


def test_bad_photos(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(gradient(200, 200)).save(buf, "JPEG")
    cases = {
        "trunc.jpg": (buf.getvalue()[: len(buf.getvalue()) // 2], "undecodable image"),
        "empty.png": (b"", "empty file"),
        "notes.docx": (b"PK\x03\x04 definitely not an image", "not an image"),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(BadImage, match=reason) as caught:
            read_image(tmp_path / name, draft=(64, 64))
        assert caught.value.kind == reason  # the class of reason, without its detail
    # a decoder that fails otherwise than by OSError, and a file that cannot be read at all
    (tmp_path / "pages.tif").write_bytes(malformed_tiff(Image.fromarray(gradient())))
    (tmp_path / "folder.png").mkdir()
    for name, reason, kind in (
        ("pages.tif", "undecodable image (TypeError)", "undecodable image"),
        ("folder.png", "unreadable file (Is a directory)", "unreadable file"),
        ("gone.png", "unreadable file (No such file or directory)", "unreadable file"),
    ):
        with pytest.raises(BadImage) as caught:
            read_image(tmp_path / name)
        assert (str(caught.value), caught.value.kind) == (reason, kind)
    small = tmp_path / "small.png"
    Image.fromarray(gradient(20, 30)).save(small)
    with pytest.raises(BadImage, match="too small: 30x20") as caught:
        read_image(small, min_size=32)
    assert caught.value.kind == "too small"
    with pytest.raises(BadImage, match="decompression bomb") as caught:
        read_image(small, max_pixels=500)
    assert caught.value.kind == "decompression bomb"
    again = pickle.loads(pickle.dumps(caught.value))  # as it crosses a worker process
    assert (str(again), again.kind) == (str(caught.value), "decompression bomb")
    gif = tmp_path / "anim.gif"
    Image.fromarray(gradient()).save(gif)
    with pytest.raises(BadImage, match="unsupported image format GIF"):
        read_image(gif)
    for case in cases:  # every reason is one line
        try:
            read_image(tmp_path / case)
        except BadImage as exc:
            assert "\n" not in str(exc)
