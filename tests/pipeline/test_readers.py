"""Decoding: every DICOM variant (built here with pydicom) and every photo format."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pydicom
import pytest
import tifffile
from PIL import Image, ImageOps
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from pipeline.manifest import is_candidate
from pipeline.readers import BadImage, is_dicom, read_image
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


@pytest.mark.parametrize("rescale", [None, (2.0, -100.0)])
@pytest.mark.parametrize("window", [(1500, 1000), (2048, 4096), (1800, 300)])
def test_window_output_range_is_black_to_white(tmp_path, window, rescale):
    """A VOI window maps its output range (Bits Stored range through the rescale, as pydicom's
    apply_windowing documents) to 0..255, not the data's own min..max: a window wider than
    the data does not stretch it. Reference: pydicom's modality + VOI transforms."""
    img = np.tile(np.linspace(1000, 2000, 100).astype(np.uint16), (40, 1))  # 12-bit ramp
    path = make_dicom(
        tmp_path / "w.dcm",
        img[None],
        bits_stored=12,
        sop_class=OPHTHALMIC_PHOTO_16,
        window=window,
        rescale=rescale,
    )
    ds = pydicom.dcmread(path)
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    slope, intercept = rescale or (1.0, 0.0)
    lo, hi = sorted((0 * slope + intercept, 4095 * slope + intercept))
    ((_, px),) = read_image(path).frames
    assert np.abs(px.astype(int) - np.round((shown - lo) * 255 / (hi - lo))).max() == 0


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


# Enhanced / multi-frame DICOM (OCT volumes) carry rescale and window in functional groups
# (Shared, Per-frame: Pixel Value Transformation, Frame VOI LUT), a frame's own item first.
def _rescale(slope: float, intercept: float) -> dict:
    return {"RescaleSlope": slope, "RescaleIntercept": intercept, "RescaleType": "US"}


def _window(center: float, width: float) -> dict:
    return {"WindowCenter": center, "WindowWidth": width}


def _group(values: dict) -> pydicom.Dataset:
    """A functional groups item holding ``values`` in the macro each belongs to."""
    item = pydicom.Dataset()
    for seq, keys in (
        ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
        ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth")),
    ):
        mine = {k: v for k, v in values.items() if k in keys}
        if mine:
            inner = pydicom.Dataset()
            for k, v in mine.items():
                setattr(inner, k, v)
            setattr(item, seq, pydicom.Sequence([inner]))
    return item


# case: (top-level, shared, per-frame, what each frame means: its flat attributes)
FUNCTIONAL_GROUPS = {
    "shared window": ({}, _window(1000, 800), [{}, {}], [_window(1000, 800)] * 2),
    "per-frame rescale": (
        {},
        {},
        [_rescale(1.0, 0.0), _rescale(2.0, 0.0)],
        [_rescale(1.0, 0.0), _rescale(2.0, 0.0)],
    ),
    "per-frame window over shared": (
        {},
        _window(1000, 800),
        [{}, _window(1500, 2000)],
        [_window(1000, 800), _window(1500, 2000)],
    ),
    "per-frame rescale and window": (
        {},
        _rescale(2.0, -100.0),
        [_window(900, 400), {**_rescale(0.5, 10.0), **_window(700, 600)}],
        [
            {**_rescale(2.0, -100.0), **_window(900, 400)},
            {**_rescale(0.5, 10.0), **_window(700, 600)},
        ],
    ),
    "shared rescale over top level": (
        _rescale(3.0, 0.0),
        _rescale(-1.0, 5000.0),
        [{}, {}],
        [_rescale(-1.0, 5000.0)] * 2,
    ),
    "shared window over top level": (
        _window(3000, 500),
        _window(1000, 800),
        [{}, {}],
        [_window(1000, 800)] * 2,
    ),
    "no rescale, no window": ({}, {}, [{}, {}], [{}, {}]),
}


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("case", FUNCTIONAL_GROUPS)
def test_functional_groups_rescale_and_window_each_frame(tmp_path, case, photometric):
    """Reference: pydicom's modality and VOI transforms on each frame with its known values
    at the top level; a window's output range (Bits Stored through the rescale) is
    black..white, without one the volume is scaled over its min..max. MONOCHROME1 is
    inverted (numpy) within that same range: the window's output range, else the whole
    file's min..max, so one picture stored at two scales looks the same in both frames."""
    top, shared, per_frame, meant = FUNCTIONAL_GROUPS[case]
    v = (np.arange(40 * 48).reshape(40, 48) % 3000 + 500).astype(np.uint16)
    vol = np.stack([v, v // 2 + 100])
    path = make_dicom(
        tmp_path / "fg.dcm", vol, bits_stored=12, sop_class=OCT_TOMOGRAPHY, photometric=photometric
    )
    ds = pydicom.dcmread(path)
    for k, value in top.items():
        setattr(ds, k, value)
    ds.SharedFunctionalGroupsSequence = pydicom.Sequence([_group(shared)])
    ds.PerFrameFunctionalGroupsSequence = pydicom.Sequence([_group(f) for f in per_frame])
    ds.save_as(path)
    shown, ranges = [], []
    for i, values in enumerate(meant):
        flat = pydicom.dcmread(path)
        del flat.SharedFunctionalGroupsSequence, flat.PerFrameFunctionalGroupsSequence
        for k in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            flat.pop(k, None)
        for k, value in values.items():
            setattr(flat, k, value)
        shown.append(apply_voi_lut(apply_modality_lut(vol[i], flat), flat))
        slope, intercept = values.get("RescaleSlope", 1.0), values.get("RescaleIntercept", 0.0)
        window = sorted((intercept, 4095 * slope + intercept)) if "WindowWidth" in values else None
        ranges.append(window)
    whole = (min(s.min() for s in shown), max(s.max() for s in shown))
    if photometric == "MONOCHROME1":  # the lowest value is white
        shown = [(r or whole)[0] + (r or whole)[1] - s for s, r in zip(shown, ranges, strict=True)]
    expected = [_scaled(s, *(r or whole)) for s, r in zip(shown, ranges, strict=True)]
    d = read_image(path)
    for (_, px), want in zip(d.frames, expected, strict=True):
        assert np.abs(px.astype(int) - want).max() == 0
    ((_, second),) = read_image(path, frames=[1]).frames  # one scale whichever frames are kept
    assert np.array_equal(second, expected[1])


# Burned In Annotation (0028,0301): YES means text (possibly the patient's) is in the pixels.
BURNED_IN = {
    # case: (header value or None for absent, allow_burned_in, refused)
    "YES": ("YES", False, True),
    "YES, padded lower case": ("yes ", False, True),
    "NO": ("NO", False, False),
    "absent": (None, False, False),
    "YES, allowed": ("YES", True, False),
}


@pytest.mark.parametrize("case", BURNED_IN)
def test_burned_in_annotation_is_refused_unless_allowed(tmp_path, case):
    value, allow, refused = BURNED_IN[case]
    phi = {"PatientName": "Smith^Jane"} | ({"BurnedInAnnotation": value} if value else {})
    for rgb in (False, True):
        img = smooth(rgb)
        path = make_dicom(tmp_path / f"b{rgb}.dcm", img[None], phi=phi)
        if refused:
            with pytest.raises(BadImage) as err:
                read_image(path, allow_burned_in=allow)
            assert err.value.kind == "burned-in annotation" and "(0028,0301)" in str(err.value)
            assert "Smith" not in str(err.value) and "\n" not in str(err.value)
        else:
            ((_, px),) = read_image(path, allow_burned_in=allow).frames
            assert np.array_equal(px, img)  # the stored pixels, untouched


# A VOI that cannot be applied is ignored (PS3.3 C.11.2.1.2: Window Width >= 1 for LINEAR,
# > 0 otherwise; VOI LUT Function absent or unknown: LINEAR); empty elements are absent.
def _lut(bits: int) -> dict:
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, bits]
    item.LUTData = np.arange(0, 4096 * 8, 8, dtype="<u2").tobytes()
    return {"VOILUTSequence": pydicom.Sequence([item])}


DEGENERATE_VOI = {
    # case: (header elements, what is applied: "none", or the elements pydicom applies)
    "width 0": ({"WindowCenter": 1500, "WindowWidth": 0}, "none"),
    "negative width": ({"WindowCenter": 1500, "WindowWidth": -10}, "none"),
    "LINEAR width 0.5": ({"WindowCenter": 1500, "WindowWidth": 0.5}, "none"),
    "SIGMOID width 0": (
        {"WindowCenter": 1500, "WindowWidth": 0, "VOILUTFunction": "SIGMOID"},
        "none",
    ),
    "empty centre and width": ({"WindowCenter": None, "WindowWidth": None}, "none"),
    "empty width": ({"WindowCenter": 1500, "WindowWidth": None}, "none"),
    "bad first of two windows": ({"WindowCenter": [1500, 1500], "WindowWidth": [0, 800]}, "none"),
    "VOI LUT of 9-bit entries": (_lut(9), "none"),
    "unknown function": (
        {"WindowCenter": 1500, "WindowWidth": 1000, "VOILUTFunction": "FOO"},
        {"WindowCenter": 1500, "WindowWidth": 1000},
    ),
    "LINEAR_EXACT width 0.5": (
        {"WindowCenter": 1500, "WindowWidth": 0.5, "VOILUTFunction": "LINEAR_EXACT"},
        {"WindowCenter": 1500, "WindowWidth": 0.5, "VOILUTFunction": "LINEAR_EXACT"},
    ),
    "bad VOI LUT, good window": (
        {**_lut(9), "WindowCenter": 1500, "WindowWidth": 1000},
        {"WindowCenter": 1500, "WindowWidth": 1000},
    ),
}


@pytest.mark.parametrize("case", DEGENERATE_VOI)
def test_unusable_voi_is_ignored(tmp_path, case):
    """Reference: without a VOI, numpy min..max scaling of the stored values; where a usable
    window remains, pydicom's apply_voi_lut with exactly those elements, its output range
    (Bits Stored) black..white."""
    header, applied = DEGENERATE_VOI[case]
    v = (np.arange(40 * 48).reshape(40, 48) % 3000 + 500).astype(np.uint16)
    path = make_dicom(tmp_path / "w.dcm", v[None], bits_stored=12, sop_class=OPHTHALMIC_PHOTO_16)
    ds = pydicom.dcmread(path)
    for k, value in header.items():
        setattr(ds, k, value)
    ds.save_as(path)
    ((_, px),) = read_image(path).frames
    if applied == "none":
        expected = _scaled(v, v.min(), v.max())
    else:
        flat = pydicom.dcmread(path)
        for k in header:
            delattr(flat, k)
        for k, value in applied.items():
            setattr(flat, k, value)
        expected = _scaled(apply_voi_lut(v, flat), 0, 4095)
    assert np.abs(px.astype(int) - expected).max() == 0


# Bits Stored below 8: the stored range 0..2**bits-1 is black..white for every photometric
# interpretation, as 0..255 is for 8-bit pixels (never the image's own min..max).
LOW_BITS = {
    # case: (Bits Stored, photometric, samples, highest value written)
    "6-bit MONOCHROME2": (6, "MONOCHROME2", 1, 63),
    "6-bit MONOCHROME1, dim data": (6, "MONOCHROME1", 1, 40),
    "7-bit MONOCHROME2, dim data": (7, "MONOCHROME2", 1, 50),
    "1-bit MONOCHROME2": (1, "MONOCHROME2", 1, 1),
    "1-bit MONOCHROME1, all 0 (white)": (1, "MONOCHROME1", 1, 0),
    "4-bit RGB": (4, "RGB", 3, 15),
}


@pytest.mark.parametrize("case", LOW_BITS)
def test_fewer_than_8_bits_stored_span_black_to_white(tmp_path, case):
    """Reference: numpy round(x * 255 / (2**bits - 1)) on the stored values, 255 minus that for
    MONOCHROME1."""
    bits, photometric, samples, top = LOW_BITS[case]
    shape = (40, 48, 3) if samples == 3 else (40, 48)
    img = (np.arange(np.prod(shape)).reshape(shape) % (top + 1)).astype(np.uint8)
    if bits == 1:  # 1 bit allocated: packed bits, written by hand (make_dicom packs bytes)
        path = make_dicom(tmp_path / "b.dcm", np.zeros((1, 40, 48), np.uint8))
        ds = pydicom.dcmread(path)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
        ds.PhotometricInterpretation, ds.PixelData = photometric, pydicom.pixels.pack_bits(img)
        ds.save_as(path)
    else:
        path = make_dicom(tmp_path / "b.dcm", img[None], photometric=photometric, bits_stored=bits)
    expected = np.round(img * 255.0 / (2**bits - 1)).astype(np.uint8)
    expected = 255 - expected if photometric == "MONOCHROME1" else expected
    ((_, px),) = read_image(path).frames
    assert px.dtype == np.uint8 and np.array_equal(px, expected)


# 8 bits stored or fewer keep their stored range as black..white in any container: 8 or 6
# bits in 16 allocated, or through a rescale that pydicom returns as floats (slope 1,
# intercept 0 changes nothing). Dim data (20..199), so a stretch to min..max would show.
NARROW_CONTAINERS = {
    # case: (dtype, Bits Stored, photometric, rescale)
    "8-bit, identity rescale": (np.uint8, 8, "MONOCHROME2", (1.0, 0.0)),
    "8-bit MONOCHROME1, identity rescale": (np.uint8, 8, "MONOCHROME1", (1.0, 0.0)),
    "8-bit, rescale slope 2 intercept 10": (np.uint8, 8, "MONOCHROME2", (2.0, 10.0)),
    "8 bits in 16 allocated": (np.uint16, 8, "MONOCHROME2", None),
    "8 bits in 16 allocated, MONOCHROME1": (np.uint16, 8, "MONOCHROME1", None),
    "8 bits in 16 allocated, RGB": (np.uint16, 8, "RGB", None),
    "6 bits in 16 allocated": (np.uint16, 6, "MONOCHROME2", None),
}


@pytest.mark.parametrize("case", NARROW_CONTAINERS)
def test_narrow_values_keep_their_stored_range_in_any_container(tmp_path, case):
    """Reference: pydicom's stored values (``pixel_array``) over 0..2**bits-1, 255 minus that
    for MONOCHROME1; never the image's own min..max."""
    dtype, bits, photometric, rescale = NARROW_CONTAINERS[case]
    shape = (40, 48, 3) if photometric == "RGB" else (40, 48)
    top = 2**bits - 1
    img = (20 + np.arange(np.prod(shape)).reshape(shape) % 180) * top // 255
    path = make_dicom(tmp_path / "n.dcm", img.astype(dtype)[None], photometric=photometric,
                      bits_stored=bits, rescale=rescale)  # fmt: skip
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    expected = np.round(stored * 255.0 / top).astype(np.uint8)
    expected = 255 - expected if photometric == "MONOCHROME1" else expected
    ((_, px),) = read_image(path).frames
    assert px.dtype == np.uint8 and np.array_equal(px, expected)


@pytest.mark.parametrize("syntax", ["j2k_lossless", "rle", "jpeg"])
def test_compressed_volume_missing_frames_is_refused_whichever_frames_are_kept(tmp_path, syntax):
    """A compressed volume whose last frames were lost (a cut export) is refused also when
    only its central frame is kept (reference: pydicom cannot decode the whole file)."""
    vol = np.stack([np.full((40, 50), 30 * (i + 1), np.uint8) for i in range(5)])
    path = make_dicom(tmp_path / "v.dcm", vol, syntax=syntax, sop_class=OCT_TOMOGRAPHY)
    ds = pydicom.dcmread(path)
    kept = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=5))[:3]
    ds.PixelData = pydicom.encaps.encapsulate(kept)
    ds.save_as(path)
    with pytest.raises(Exception):  # noqa: B017 - the reference: any decoder failure
        _ = pydicom.dcmread(path).pixel_array
    for kwargs in ({}, {"oct_central": True}, {"frames": [1]}):
        with pytest.raises(BadImage, match="holds 3 of the 5 frames|undecodable"):
            read_image(path, **kwargs)
    assert [i for i, _ in read_image(make_dicom(tmp_path / "w.dcm", vol, syntax=syntax,
            sop_class=OCT_TOMOGRAPHY), oct_central=True).frames] == [2]  # fmt: skip


# A DICOM dataset without file meta (no preamble, no Transfer Syntax UID) is read in the
# encoding pydicom finds it in; a photo named .dcm is read as the photo it is.
def _bare(arr: np.ndarray, implicit: bool = True, little: bool = True, jpeg: bool = False) -> bytes:
    """(H, W) uint8/uint16 grey pixels as a bare dataset (no preamble, no file meta)."""
    ds = pydicom.Dataset()
    ds.PatientID, ds.Rows, ds.Columns = "P1", *arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = arr.dtype.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if jpeg:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG")
        ds.PixelData = pydicom.encaps.encapsulate([buf.getvalue()])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    else:
        ds.PixelData = arr.astype(arr.dtype.newbyteorder("<" if little else ">")).tobytes()
        ds["PixelData"].VR = "OB" if arr.dtype == np.uint8 else "OW"
    out = pydicom.filebase.DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = little, implicit
    pydicom.filewriter.write_dataset(out, ds)
    return out.getvalue()


def _photo_bytes(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


EIGHT = gradient(40, 48)
SIXTEEN = gradient(40, 48).astype(np.uint16) * 100
UNMARKED = {
    # case: (file name, bytes, the pixels meant (None: refused), the reason's start)
    "implicit LE, .dcm": ("a.dcm", _bare(EIGHT), EIGHT, None),
    "implicit LE, no suffix": ("IM0001", _bare(EIGHT), EIGHT, None),
    "explicit LE 16-bit, no suffix": ("IM0002", _bare(SIXTEEN, False), SIXTEEN, None),
    "explicit BE 16-bit, .dicom": ("b.dicom", _bare(SIXTEEN, False, False), SIXTEEN, None),
    "compressed, no transfer syntax": (
        "c.dcm",
        _bare(EIGHT, False, jpeg=True),
        None,
        "DICOM without a transfer syntax",
    ),
    "JPEG named .dcm": ("photo.dcm", _photo_bytes(EIGHT, "JPEG"), "pillow", None),
    "PNG named .dicom": ("photo.dicom", _photo_bytes(EIGHT, "PNG"), EIGHT, None),
    "neither, .dcm": ("junk.dcm", b"\x07" * 300, None, "unreadable DICOM|DICOM without pixel data"),
    "neither, no suffix": ("junk", b"\x07" * 300, None, "not an image"),
}


@pytest.mark.parametrize("case", UNMARKED)
def test_dicom_without_file_meta_and_photos_named_dcm(tmp_path, case):
    """Reference: the stored values (numpy; 16-bit scaled over min..max), Pillow's decode of
    the JPEG."""
    name, data, meant, reason = UNMARKED[case]
    path = tmp_path / name
    path.write_bytes(data)
    if meant is None:
        with pytest.raises(BadImage, match=reason):
            read_image(path)
        return
    if isinstance(meant, str):
        meant = np.asarray(Image.open(path))
    elif meant.dtype != np.uint8:
        meant = _scaled(meant, meant.min(), meant.max())
    ((_, px),) = read_image(path).frames
    assert np.array_equal(px, meant)


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


# ------------------------------------------------- every image the right way up (issue 17)


def _save(path, pixels: np.ndarray | Image.Image, fmt: str, orientation: int = 1, **kw):
    """Save with an EXIF Orientation (JPEG/WEBP APP1/chunk, PNG eXIf, TIFF IFD tag 274)."""
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    image.save(path, fmt, exif=exif, **extra, **kw)
    return path


def _exif_transposed(path) -> np.ndarray:
    """The independent reference: Pillow's ImageOps.exif_transpose of the stored picture."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF", "WEBP"])
def test_exif_orientation_gives_the_upright_picture(tmp_path, fmt, orientation):
    """All eight orientations (2, 4, 5, 7 mirrored), in every format that carries one: the
    pixels and the recorded size are those of the upright picture, before anything else."""
    stored = gradient(48, 64, rgb=True)  # not square: a transposed picture changes shape
    path = _save(tmp_path / f"x.{fmt.lower()}", stored, fmt, orientation)
    d = read_image(path)
    ((_, px),) = d.frames
    expected = _exif_transposed(path)
    assert np.array_equal(px, expected)
    assert (d.width, d.height) == (expected.shape[1], expected.shape[0])
    assert d.sizes == [(expected.shape[1], expected.shape[0])]


def test_xmp_orientation_counts_when_there_is_no_exif(tmp_path):
    """Some writers give the orientation only in XMP (tiff:Orientation), as Pillow reads it."""
    xmp = (
        b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
        b'22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
        b'tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>'
    )
    path = tmp_path / "xmp.jpg"
    Image.fromarray(gradient(48, 64, rgb=True)).save(path, quality=95, xmp=xmp)
    ((_, px),) = read_image(path).frames
    assert px.shape == (64, 48, 3) and np.array_equal(px, _exif_transposed(path))


def test_jpeg_draft_scale_is_chosen_on_the_upright_size(tmp_path):
    """A wide-stored JPEG with Orientation 6 stands tall: the DCT scale must keep the UPRIGHT
    picture at or above the draft bound (width >= 200), and no larger than needed."""
    path = _save(tmp_path / "side.jpg", gradient(400, 1600, rgb=True), "JPEG", 6)
    d = read_image(path, draft=(200, 100))
    ((_, px),) = d.frames
    assert (d.width, d.height) == (400, 1600)
    assert px.shape == (800, 200, 3)  # 1/2 scale upright; 1/4 would be 100 wide
    with Image.open(path) as im:  # the full-size upright reference, halved
        ref = np.asarray(ImageOps.exif_transpose(im).reduce(2)).astype(int)
    assert np.abs(px.astype(int) - ref).mean() < 3


def _alpha(h: int = 48, w: int = 64) -> np.ndarray:
    """(H, W) uint8: opaque disc, transparent corners, a half-transparent ring between."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot(yy - h / 2, xx - w / 2) / (h / 2)
    return np.where(r < 0.8, 255, np.where(r < 0.95, 128, 0)).astype(np.uint8)


def _white_outside(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Stored colour white where transparent: what shows if the alpha is dropped."""
    return np.where((alpha == 0)[..., None] if rgb.ndim == 3 else alpha == 0, 255, rgb)


def _rgba(path):
    rgb = _white_outside(gradient(rgb=True), _alpha())
    return Image.fromarray(np.dstack([rgb, _alpha()]), "RGBA")


def _la(path):
    return Image.fromarray(np.dstack([_white_outside(gradient(), _alpha()), _alpha()]), "LA")


def _palette(transparent: str):
    def make(path):
        p = Image.fromarray(gradient(rgb=True)).quantize(64)
        idx = np.asarray(p).copy()
        idx[_alpha() == 0] = 63  # the corners use entry 63
        q = Image.fromarray(idx, "P")
        q.putpalette([*p.getpalette()[: 63 * 3], 255, 255, 255])  # entry 63 is white
        if transparent == "one entry":
            q.info["transparency"] = 63
        else:  # an alpha per entry (PNG tRNS with several values)
            q.info["transparency"] = bytes([255] * 40 + [128] * 23 + [0])
        return q

    return make


def _keyed(rgb: bool):
    def make(path):
        img = _white_outside(gradient(rgb=rgb), _alpha())
        image = Image.fromarray(img)
        image.info["transparency"] = (255, 255, 255) if rgb else 255
        return image

    return make


TRANSPARENT = {
    "RGBA PNG": (_rgba, "PNG"),
    "LA PNG": (_la, "PNG"),
    "palette PNG, one transparent entry": (_palette("one entry"), "PNG"),
    "palette PNG, alpha per entry": (_palette("per entry"), "PNG"),
    "grey PNG, colour key": (_keyed(False), "PNG"),
    "RGB PNG, colour key": (_keyed(True), "PNG"),
    "RGBA TIFF": (_rgba, "TIFF"),
    "LA TIFF": (_la, "TIFF"),
    "RGBA WEBP": (_rgba, "WEBP"),
}


@pytest.mark.parametrize("case", TRANSPARENT)
def test_transparency_is_composited_onto_black(tmp_path, case):
    make, fmt = TRANSPARENT[case]
    path = tmp_path / f"x.{fmt.lower()}"
    image = make(path)
    extra = {"transparency": image.info["transparency"]} if "transparency" in image.info else {}
    image.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}), **extra)
    ((_, px),) = read_image(path).frames
    with Image.open(path) as im:  # reference: Pillow's alpha compositing over opaque black
        black = Image.new("RGBA", im.size, (0, 0, 0, 255))
        ref = np.asarray(Image.alpha_composite(black, im.convert("RGBA")).convert("RGB"))
    got = px if px.ndim == 3 else np.repeat(px[..., None], 3, axis=2)
    assert np.abs(got.astype(int) - ref).max() <= 1
    assert got[0, 0].max() == 0  # a transparent corner is black, not its stored white


def _fundus(h: int = 96, w: int = 128) -> np.ndarray:
    """(H, W, 3): a bright textured disc (the field of view) on black."""
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.hypot(yy - h / 2, xx - w / 2) < 0.4 * h
    return np.where(inside[..., None], gradient(h, w, rgb=True) // 2 + 100, 0).astype(np.uint8)


def test_transparent_corners_are_cropped_like_black_ones(tmp_path):
    """A fundus whose corners are masked by alpha (stored white) gives the training pixels of
    the same fundus with black corners: the field-of-view crop works on it."""
    from pipeline.pixels import prepare_file

    fundus = _fundus()
    opaque = (fundus.max(axis=2) > 0).astype(np.uint8) * 255
    Image.fromarray(fundus).save(tmp_path / "black.png")
    masked = np.dstack([_white_outside(fundus, opaque), opaque])
    Image.fromarray(masked, "RGBA").save(tmp_path / "masked.png")
    args = ("fundus", (32, 32), "pad", "all")
    (want,) = prepare_file(tmp_path / "black.png", *args)
    (got,) = prepare_file(tmp_path / "masked.png", *args)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("syntax", ["explicit", "implicit", "rle", "jpegls", "j2k_lossless"])
def test_palette_color_dicom_is_looked_up(tmp_path, syntax, depth):
    """PALETTE COLOR: the stored values are indices into the Red/Green/Blue LUTs, never grey
    values. Reference: pydicom's apply_color_lut on the stored indices; 16-bit entries
    scaled by their full range (65535 -> 255)."""
    rng = np.random.default_rng(depth)
    lut = rng.integers(0, 2**depth, (256, 3)).astype(np.uint8 if depth == 8 else np.uint16)
    idx = (gradient() + np.arange(64, dtype=np.uint8)).astype(np.uint8)  # (48, 64) indices
    path = make_dicom(tmp_path / "p.dcm", idx[None], syntax=syntax, palette=lut)
    ds = pydicom.dcmread(path)
    ref = apply_color_lut(ds.pixel_array, ds).astype(float)  # (48, 64, 3)
    expected = np.round(ref * 255 / (2**depth - 1)).astype(np.uint8)
    assert np.array_equal(expected, np.round(lut[idx] * 255.0 / (2**depth - 1)))  # sanity
    ((_, px),) = read_image(path).frames
    assert px.shape == (48, 64, 3) and np.array_equal(px, expected)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "BMP"])
def test_palette_photos_are_looked_up(tmp_path, fmt):
    p = Image.fromarray(gradient(rgb=True)).quantize(64)
    path = tmp_path / f"p.{fmt.lower()}"
    p.save(path, fmt)
    lut = np.array(p.getpalette(), np.uint8).reshape(-1, 3)
    ((_, px),) = read_image(path).frames
    assert np.array_equal(px, lut[np.asarray(p)])


def _scaled(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.round((arr.astype(float) - lo) * 255 / (hi - lo)).astype(np.uint8)


def test_multipage_tiff_volume_has_one_scale_for_the_file(tmp_path):
    """A 16-bit OCT volume: a dim B-scan stays dim (scaled over the file, as a DICOM volume
    is), whichever pages are kept."""
    bright = gradient().astype(np.uint16) * 250  # up to ~60000
    dim = gradient().astype(np.uint16) * 25  # up to ~6000
    pages = [bright, dim, bright // 2]
    path = tmp_path / "vol.tif"
    Image.fromarray(pages[0]).save(
        path, save_all=True, append_images=map(Image.fromarray, pages[1:])
    )
    lo, hi = min(p.min() for p in pages), max(p.max() for p in pages)
    d = read_image(path)
    for (_, px), page in zip(d.frames, pages, strict=True):
        assert np.array_equal(px, _scaled(page, lo, hi))
    assert d.frames[1][1].max() < 30  # the dim page is not brightened to 255
    for only in (read_image(path, oct_central=True), read_image(path, frames=[1])):
        ((frame, px),) = only.frames
        assert frame == 1 and np.array_equal(px, _scaled(dim, lo, hi))


def test_dicom_volume_is_scaled_over_the_file_whichever_frames_are_kept(tmp_path):
    vol = np.stack([gradient().astype(np.uint16) * k for k in (250, 25, 120)])  # (3, 48, 64)
    path = make_dicom(tmp_path / "v.dcm", vol, sop_class=OCT_TOMOGRAPHY)
    lo, hi = vol.min(), vol.max()
    for only in (read_image(path, oct_central=True), read_image(path, frames=[1])):
        ((frame, px),) = only.frames
        assert frame == 1 and np.array_equal(px, _scaled(vol[1], lo, hi))


def test_multipage_tiff_pages_keep_their_own_size_and_mode(tmp_path):
    grey = gradient(40, 50)
    colour = gradient(60, 36, rgb=True)
    deep = gradient(44, 70).astype(np.uint16) * 100
    path = tmp_path / "mixed.tif"
    Image.fromarray(grey).save(
        path, save_all=True, append_images=[Image.fromarray(colour), Image.fromarray(deep)]
    )
    d = read_image(path)
    assert d.sizes == [(50, 40), (36, 60), (70, 44)]
    assert np.array_equal(d.frames[0][1], grey) and np.array_equal(d.frames[1][1], colour)
    assert np.array_equal(d.frames[2][1], _scaled(deep, deep.min(), deep.max()))
    assert read_image(path, frames=[2]).sizes == [(70, 44)]


def test_min_size_applies_to_every_page(tmp_path):
    path = tmp_path / "vol.tif"
    pages = [Image.fromarray(gradient(40, 40)), Image.fromarray(gradient(20, 40))]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    with pytest.raises(BadImage, match=r"too small: 40x20 \(page 1\) is below") as caught:
        read_image(path, min_size=32, oct_central=True)  # whichever page is kept
    assert caught.value.kind == "too small"
    assert len(read_image(path, min_size=20).frames) == 2


def _one_bit(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img > 128).convert("1")


PHOTO_KINDS = {
    # kind: (make the stored image, format, expected (H, W[, 3]) uint8 from the source pixels)
    "1-bit PNG": (lambda: _one_bit(gradient()), "PNG", lambda: np.where(gradient() > 128, 255, 0)),
    "1-bit TIFF": (
        lambda: _one_bit(gradient()),
        "TIFF",
        lambda: np.where(gradient() > 128, 255, 0),
    ),
    "1-bit BMP": (lambda: _one_bit(gradient()), "BMP", lambda: np.where(gradient() > 128, 255, 0)),
    "16-bit TIFF": (
        lambda: Image.fromarray(gradient().astype(np.uint16) * 200),
        "TIFF",
        lambda: _scaled(gradient() * 200.0, gradient().min() * 200.0, gradient().max() * 200.0),
    ),
    "32-bit TIFF": (
        lambda: Image.fromarray(gradient().astype(np.int32) * 1000 - 50000),
        "TIFF",
        lambda: _scaled(gradient(), gradient().min(), gradient().max()),
    ),
    "float TIFF": (
        lambda: Image.fromarray(gradient().astype(np.float32) / 7),
        "TIFF",
        lambda: _scaled(gradient(), gradient().min(), gradient().max()),
    ),
}


@pytest.mark.parametrize("kind", PHOTO_KINDS)
def test_photo_modes(tmp_path, kind):
    make, fmt, expected = PHOTO_KINDS[kind]
    path = tmp_path / f"x.{fmt.lower()}"
    make().save(path, fmt)
    ((_, px),) = read_image(path).frames
    assert px.dtype == np.uint8 and np.array_equal(px, expected().astype(np.uint8))


def test_cmyk_jpeg_is_rgb(tmp_path):
    rgb = smooth(rgb=True)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    ((_, px),) = read_image(tmp_path / "c.jpg").frames
    assert px.shape == rgb.shape and np.abs(px.astype(int) - rgb).mean() < 3


# Point 6: one frame stored uncompressed and in every accepted compressed syntax gives the same
# training pixels (within codec loss). 12-bit kinds carry junk in the bits above Bits Stored:
# pydicom clears them for native, RLE and JPEG data, not for JPEG-LS and JPEG 2000.
def _junk(clean: np.ndarray) -> np.ndarray:
    noise = np.random.default_rng(7).integers(0, 16, clean.shape, dtype=np.uint16)
    return clean | (noise << 12)


TWELVE = gradient().astype(np.uint16) * 16  # (48, 64) 12-bit values
SIGNED = (gradient().astype(np.int16) * 16 - 2048).view(np.uint16) & 0x0FFF  # 12-bit signed
SYNTAX_KINDS = {
    # kind: (frames, make_dicom kwargs, modality, the clean values the file means)
    "grey 8-bit": (smooth()[None], {}, "oct", smooth()[None]),
    "RGB 8-bit": (smooth(rgb=True)[None], {}, "fundus", smooth(rgb=True)[None]),
    "MONOCHROME1 8-bit": (
        smooth()[None],
        {"photometric": "MONOCHROME1"},
        "oct",
        255 - smooth()[None],
    ),
    "grey 12-bit, junk above Bits Stored": (
        _junk(TWELVE)[None],
        {"label_bits_stored": 12, "sop_class": OPHTHALMIC_PHOTO_16},
        "oct",
        TWELVE[None],
    ),
    "signed 12-bit, junk above Bits Stored": (
        _junk(SIGNED)[None],
        {"label_bits_stored": 12, "signed": True, "sop_class": OPHTHALMIC_PHOTO_16},
        "oct",
        (gradient().astype(np.int16) * 16 - 2048)[None],
    ),
    "grey 8-bit volume": (
        np.stack([smooth(), smooth() // 2, 255 - smooth()]),
        {"sop_class": OCT_TOMOGRAPHY},
        "oct",
        np.stack([smooth(), smooth() // 2, 255 - smooth()]),
    ),
}
SYNTAX_LOSSLESS = [
    *("implicit", "big_endian", "deflated", "rle", "jpeg_lossless", "jpeg_lossless_p7"),
    *("jpegls", "j2k_lossless", "htj2k_lossless"),
]
SYNTAX_CASES = [
    (kind, syntax)
    for kind in SYNTAX_KINDS
    for syntax in [*SYNTAX_LOSSLESS, *LOSSY, "jpegls_near"]
    # baseline JPEG and the lossy JPEG 2000 here are 8-bit, and near-lossless JPEG-LS would
    # carry its error into the junk above Bits Stored; 12-bit extended JPEG takes 12-bit values
    # (the junk cleared: a 12-bit codestream cannot carry it)
    if not (syntax in ("jpeg", "j2k", "jpegls_near") and "12-bit" in kind)
]


@pytest.mark.parametrize("kind,syntax", SYNTAX_CASES)
def test_every_transfer_syntax_gives_the_native_pixels(tmp_path, kind, syntax):
    from pipeline.pixels import prepare_file

    frames, kwargs, modality, clean = SYNTAX_KINDS[kind]
    native = make_dicom(tmp_path / "native.dcm", frames, **kwargs)
    coded = make_dicom(tmp_path / f"{syntax}.dcm", frames, syntax=syntax, **kwargs)
    # the uncompressed file decodes to what it means (pydicom clears unused bits natively)
    want = [px for _, px in read_image(native).frames]
    lo, hi = clean.min(), clean.max()
    means = [c if c.dtype == np.uint8 else _scaled(c, lo, hi) for c in clean]
    assert all(np.array_equal(w, m) for w, m in zip(want, means, strict=True))
    got = [px for _, px in read_image(coded).frames]
    args = (modality, (32, 32), "pad", "all")
    train_want, train_got = prepare_file(native, *args), prepare_file(coded, *args)
    for a, b, ta, tb in zip(want, got, train_want, train_got, strict=True):
        if syntax in [*LOSSY, "jpegls_near"]:
            assert np.abs(a.astype(int) - b).mean() < 4 and np.abs(ta.astype(int) - tb).mean() < 4
        else:
            assert np.array_equal(a, b) and np.array_equal(ta, tb)


# ------------------------------------------ 16-bit colour photos read at full depth (fault r01)


def _png16(path, arr: np.ndarray, *chunks: tuple[bytes, bytes]):
    """Write (H, W[, C]) uint16 as a 16-bit PNG by hand (zlib + struct, no image library):
    colour type from C (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA); ``chunks`` go before IDAT."""
    h, w = arr.shape[:2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[1 if arr.ndim == 2 else arr.shape[2]]
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
    body = b"".join(chunk(k, d) for k, d in chunks) + chunk(b"IDAT", zlib.compress(raw))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + head + body + chunk(b"IEND", b""))
    return path


def _twelve(rgb: bool = True) -> np.ndarray:
    """(48, 64[, 3]) uint16: 12-bit values (16..4000) in 16-bit samples, as cameras store."""
    return gradient(rgb=rgb).astype(np.uint16) * 16


def _on_black16(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Reference compositing: unassociated 16-bit alpha over black, float values."""
    return colour * (alpha.astype(float) / 65535)[..., None]


def _exif_orientation(value: int) -> tuple[bytes, bytes]:
    return b"eXIf", _exif_bytes(value)


def _exif_bytes(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()[6:]  # without the "Exif\0\0" of a JPEG APP1 block


_ALPHA16 = _alpha().astype(np.uint16) * 257  # 0, 128*257, 65535
_KEY = _alpha() == 0  # the pixels the colour key hides
DEEP_KINDS = {
    # kind: (write the file, the picture it means before scaling: float or integer values)
    "RGB PNG": (lambda p: _png16(p, _twelve()), lambda: _twelve()),
    "RGBA PNG": (
        lambda p: _png16(p, np.dstack([_twelve(), _ALPHA16])),
        lambda: _on_black16(_twelve(), _ALPHA16),
    ),
    "grey+alpha PNG": (
        lambda p: _png16(p, np.dstack([_twelve(False), _ALPHA16])),
        lambda: _on_black16(_twelve(False)[..., None], _ALPHA16)[..., 0],
    ),
    "RGB PNG, colour key": (
        lambda p: _png16(
            p,
            np.where(_KEY[..., None], np.uint16(4095), _twelve()),
            (b"tRNS", struct.pack(">HHH", 4095, 4095, 4095)),
        ),
        lambda: np.where(_KEY[..., None], 0, _twelve()),
    ),
    "grey PNG, colour key": (
        lambda p: _png16(
            p, np.where(_KEY, np.uint16(4095), _twelve(False)), (b"tRNS", struct.pack(">H", 4095))
        ),
        lambda: np.where(_KEY, 0, _twelve(False)),
    ),
    "RGB TIFF": (lambda p: tifffile.imwrite(p, _twelve(), photometric="rgb"), lambda: _twelve()),
    "RGB TIFF, planar, LZW": (
        lambda p: tifffile.imwrite(
            p,
            np.moveaxis(_twelve(), -1, 0),
            photometric="rgb",
            planarconfig="separate",
            compression="lzw",
        ),
        lambda: _twelve(),
    ),
    "RGBA TIFF, unassociated alpha": (
        lambda p: tifffile.imwrite(
            p, np.dstack([_twelve(), _ALPHA16]), photometric="rgb", extrasamples=[2]
        ),
        lambda: _on_black16(_twelve(), _ALPHA16),
    ),
    "RGBA TIFF, associated alpha": (
        lambda p: tifffile.imwrite(
            p,
            np.dstack([np.round(_on_black16(_twelve(), _ALPHA16)).astype(np.uint16), _ALPHA16]),
            photometric="rgb",
            extrasamples=[1],
        ),
        lambda: np.round(_on_black16(_twelve(), _ALPHA16)),
    ),
}


@pytest.mark.parametrize("kind", DEEP_KINDS)
def test_16bit_colour_is_read_at_full_depth(tmp_path, kind):
    """16 bits per sample (12-bit data) are scaled from the file's min..max like 16-bit grey,
    never cut to the high byte (Pillow's 8-bit RGB: 0..15). Reference: numpy arithmetic on
    the stored values."""
    write, means = DEEP_KINDS[kind]
    path = tmp_path / ("x.png" if "PNG" in kind else "x.tif")
    write(path)
    ((_, px),) = read_image(path).frames
    want = means().astype(float)
    assert (
        px.dtype == np.uint8
        and np.abs(px.astype(int) - _scaled(want, want.min(), want.max())).max() <= 1
    )
    assert px.max() == 255  # the whole 0..255 range, not 0..15


@pytest.mark.parametrize("orientation", [3, 6, 7])
@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_colour_keeps_its_exif_orientation(tmp_path, fmt, orientation):
    """Reference: numpy scaling of the stored values, turned upright by Pillow's
    ImageOps.exif_transpose."""
    stored = _twelve()
    path = tmp_path / f"x.{fmt.lower()}"
    if fmt == "PNG":
        _png16(path, stored, _exif_orientation(orientation))
    else:
        tifffile.imwrite(
            path, stored, photometric="rgb", extratags=[(274, "H", 1, orientation, True)]
        )
    picture = Image.fromarray(_scaled(stored, stored.min(), stored.max()))
    picture.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(picture))
    d = read_image(path)
    ((_, px),) = d.frames
    assert np.array_equal(px, expected)
    assert d.sizes == [(expected.shape[1], expected.shape[0])]


def test_16bit_colour_tiff_page_shares_the_volume_scale(tmp_path):
    """A 16-bit RGB page and a dim 16-bit grey page of one TIFF: one min..max for the file."""
    colour, dim = _twelve(), _twelve(False) // 8
    path = tmp_path / "vol.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(colour, photometric="rgb")
        tif.write(dim, photometric="minisblack")
    lo, hi = min(colour.min(), dim.min()), max(colour.max(), dim.max())
    for d in (read_image(path), read_image(path, frames=[1])):
        got = dict(d.frames)
        if 0 in got:
            assert np.array_equal(got[0], _scaled(colour, lo, hi))
        assert np.array_equal(got[1], _scaled(dim, lo, hi))


# ---------------------------------- reduced-resolution TIFF pages are no image (fault r07)


def _big(seed: int) -> np.ndarray:
    return gradient(64, 48, rgb=True, seed=seed)


def _small(seed: int) -> np.ndarray:
    return np.asarray(Image.fromarray(_big(seed)).reduce(4))  # 12x16: below min_size 32


PREVIEW = {"subfiletype": 1}  # NewSubfileType bit 0: a reduced-resolution copy
REDUCED_KINDS = {
    # kind: [(pixels, tifffile write kwargs) per page in file order], the full pages' seeds
    "preview after the picture": ([(_big(0), {}), (_small(0), PREVIEW)], [0]),
    "thumbnail first": ([(_small(0), PREVIEW), (_big(0), {})], [0]),
    "pyramid": ([(_big(0), {}), (_small(0), PREVIEW), (_small(0)[::2, ::2], PREVIEW)], [0]),
    "old SubfileType 2": (
        [(_big(0), {}), (_small(0), {"extratags": [(255, "H", 1, 2, True)]})],
        [0],
    ),
    "transparency mask page": (
        [
            (_big(0), {}),
            (np.full((64, 48), 255, np.uint8), {"extratags": [(254, "I", 1, 4, True)]}),
        ],
        [0],
    ),
    "volume, a preview per page": (
        [(_big(0), {}), (_small(0), PREVIEW), (_big(1), {}), (_small(1), PREVIEW)],
        [0, 1],
    ),
}


@pytest.mark.parametrize("kind", REDUCED_KINDS)
def test_reduced_resolution_tiff_pages_are_skipped(tmp_path, kind):
    """Previews, thumbnails, pyramid levels and masks are no picture of the eye: neither an
    extra image nor a page that makes the file too small. Reference: the pixels written."""
    pages, full = REDUCED_KINDS[kind]
    path = tmp_path / "x.tif"
    with tifffile.TiffWriter(path) as tif:
        for px, kwargs in pages:
            tif.write(px, photometric="rgb" if px.ndim == 3 else "minisblack", **kwargs)
    d = read_image(path, min_size=32)
    assert [k for k, _ in d.frames] == list(range(len(full))) and d.n_frames == len(full)
    for (_, px), seed in zip(d.frames, full, strict=True):
        assert np.array_equal(px, _big(seed))
    assert d.sizes == [(48, 64)] * len(full)
    ((k, px),) = read_image(path, oct_central=True).frames
    assert np.array_equal(px, _big(full[len(full) // 2]))


def test_tiff_of_previews_only_is_refused(tmp_path):
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, _big(0), photometric="rgb", subfiletype=1)
    with pytest.raises(BadImage, match="no full-resolution image") as caught:
        read_image(path)
    assert caught.value.kind == "no full-resolution image"


# ------------------------ float TIFF: non-finite values refused, float64 read (fault r11)


def _floats(dtype=np.float32, rgb: bool = False) -> np.ndarray:
    return gradient(rgb=rgb).astype(dtype) / 7 - 3  # (48, 64[, 3]), negative values too


def _with(*cells, dtype=np.float32) -> np.ndarray:
    """_floats() with the given ((row, cols), value) pixels."""
    arr = _floats(dtype)
    for where, value in cells:
        arr[where] = value
    return arr


NON_FINITE = {
    # kind: (pages written, the number of non-finite values in the file)
    "NaN float32": ([_with(((0, slice(0, 10)), np.nan))], 10),
    "+inf and -inf float32": ([_with(((1, 1), np.inf), ((2, 2), -np.inf))], 2),
    "NaN float64": ([_with(((5, slice(0, 3)), np.nan), dtype=np.float64)], 3),
    "NaN in a page not kept": ([_floats(), _floats(), _with(((0, 0), np.nan))], 1),
}


@pytest.mark.parametrize("kind", NON_FINITE)
def test_non_finite_float_tiff_is_refused(tmp_path, kind):
    """NaN/inf mean no grey level: the file is refused with the count (whichever pages are
    kept), not cast to 0 undefinedly."""
    pages, bad = NON_FINITE[kind]
    path = tmp_path / "x.tif"
    with tifffile.TiffWriter(path) as tif:
        for page in pages:
            tif.write(page, photometric="minisblack")
    for kwargs in ({}, {"oct_central": True}):
        with pytest.raises(BadImage) as caught:
            read_image(path, **kwargs)
        assert str(caught.value) == f"{bad} non-finite pixel values (NaN or infinite)"
        assert caught.value.kind == "non-finite pixel values"


_A16 = np.where(_alpha() == 0, 0, 65535).astype(np.uint16)
TIFFFILE_ONLY = {
    # kind: (write the file, the picture it means before scaling); Pillow cannot open these
    "float64 grey": (lambda p: tifffile.imwrite(p, _floats(np.float64)), lambda: _floats()),
    "float64 RGB": (
        lambda p: tifffile.imwrite(p, _floats(np.float64, True), photometric="rgb"),
        lambda: _floats(np.float64, True),
    ),
    "16-bit grey+alpha": (
        lambda p: tifffile.imwrite(
            p, np.dstack([_twelve(False), _A16]), photometric="minisblack", extrasamples=[2]
        ),
        lambda: np.where(_A16 == 0, 0, _twelve(False)),
    ),
    "float64, orientation 6": (
        lambda p: tifffile.imwrite(p, _floats(np.float64), extratags=[(274, "H", 1, 6, True)]),
        lambda: _pillow_upright(_floats(), 6),
    ),
    "float64 with a preview page": (
        lambda p: _write_pages(p, [(_floats(np.float64), {}), (_floats()[::4, ::4], PREVIEW)]),
        lambda: _floats(np.float64),
    ),
}


def _pillow_upright(values: np.ndarray, orientation: int) -> np.ndarray:
    """Reference: Pillow's ImageOps.exif_transpose of a float ("F") picture."""
    picture = Image.fromarray(values.astype(np.float32))
    picture.getexif()[0x0112] = orientation
    return np.asarray(ImageOps.exif_transpose(picture))


def _write_pages(path, pages):
    with tifffile.TiffWriter(path) as tif:
        for px, kwargs in pages:
            tif.write(px, **kwargs)


@pytest.mark.parametrize("kind", TIFFFILE_ONLY)
def test_tiffs_pillow_cannot_open_are_read_by_tifffile(tmp_path, kind):
    """A valid TIFF Pillow does not recognise (float64, 16-bit grey+alpha) is read, not
    refused as 'not an image'. Reference: numpy scaling of the values written."""
    write, means = TIFFFILE_ONLY[kind]
    path = tmp_path / "x.tif"
    write(path)
    with pytest.raises(Exception):  # noqa: B017, PT011 -- the premise: Pillow cannot
        Image.open(path)
    d = read_image(path, min_size=32)
    ((_, px),) = d.frames
    want = means().astype(float)
    assert np.abs(px.astype(int) - _scaled(want, want.min(), want.max())).max() <= 1
    assert d.sizes == [(want.shape[1], want.shape[0])] and d.info["format"] == "TIFF"


# --------------- animated PNG/WebP and MPO: every frame is an image, as a TIFF page (r12)


def _views(n: int = 3) -> list[np.ndarray]:
    """n different smooth (48, 64, 3) pictures (JPEG keeps them within a few levels)."""
    return [smooth(rgb=True) // (s + 1) + 20 * s for s in range(n)]


def _mpo(path, views: list[np.ndarray], thumbnail: int | None = None):
    """An MPO of ``views`` (Pillow's writer); image ``thumbnail`` relabelled MP Type 'Large
    Thumbnail (VGA Equivalent)' (0x010001) in its MP Entry (little-endian, 16 bytes each)."""
    first, *rest = map(Image.fromarray, views)
    first.save(path, "MPO", save_all=True, append_images=rest, quality=95)
    if thumbnail is not None:
        with Image.open(path) as im:
            size0 = im.mpinfo[0xB002][0]["Size"]
        data = bytearray(path.read_bytes())
        entry0 = data.index(struct.pack("<LL", 0x030000, size0))  # the primary image's entry
        struct.pack_into("<L", data, entry0 + 16 * thumbnail, 0x010001)
        path.write_bytes(bytes(data))
    return path


def _animated(fmt: str):
    def write(path, views):
        first, *rest = map(Image.fromarray, views)
        lossless = {"lossless": True} if fmt == "WEBP" else {}
        first.save(path, fmt, save_all=True, append_images=rest, **lossless)

    return write


MULTI_FRAME = {
    # kind: (write the file, suffix, indices of the views that are images, max codec error)
    "APNG": (_animated("PNG"), "png", [0, 1, 2], 0),
    "animated WebP": (_animated("WEBP"), "webp", [0, 1, 2], 0),
    "MPO stereo pair": (lambda p, v: _mpo(p, v[:2]), "mpo", [0, 1], 3),
    "MPO with a large thumbnail": (lambda p, v: _mpo(p, v, thumbnail=2), "mpo", [0, 1], 3),
}


@pytest.mark.parametrize("kind", MULTI_FRAME)
def test_multi_frame_photos_keep_every_frame(tmp_path, kind):
    """No frame is dropped silently: each is an image (n_frames, sizes, pixels), the central
    one is kept with oct_central, any one can be asked for; an MPO's large thumbnail is a
    reduced-resolution copy and skipped. Reference: the pictures written."""
    write, suffix, images, err = MULTI_FRAME[kind]
    views = _views()
    path = tmp_path / f"x.{suffix}"
    write(path, views)
    if kind.startswith("MPO"):
        with Image.open(path) as im:  # the premise: Pillow sees every image and its MP Type
            assert im.n_frames == len(views) - (kind == "MPO stereo pair")
            types = [e["Attribute"]["MPType"] for e in im.mpinfo[0xB002]]
            assert types[-1].startswith("Large Thumbnail") == (kind != "MPO stereo pair")
    d = read_image(path, min_size=32)
    assert [k for k, _ in d.frames] == list(range(len(images))) and d.n_frames == len(images)
    assert d.sizes == [(64, 48)] * len(images)
    for (_, px), view in zip(d.frames, (views[i] for i in images), strict=True):
        assert np.abs(px.astype(int) - view).mean() <= err
    ((k, px),) = read_image(path, oct_central=True).frames
    assert k == len(images) // 2 and np.abs(px.astype(int) - views[k]).mean() <= err
    ((k, px),) = read_image(path, frames=[1]).frames
    assert k == 1 and np.abs(px.astype(int) - views[1]).mean() <= err
    # every frame of a JPEG-coded file at a DCT-reduced size (1/2 here), frame after frame
    halved = read_image(path, draft=(32, 24)).frames
    for (_, px), i in zip(halved, images, strict=True):
        want = np.asarray(Image.fromarray(views[i]).reduce(2)) if err else views[i]
        assert np.abs(px.astype(int) - want).mean() <= 2 * err


def test_animated_16bit_png_is_refused(tmp_path):
    """libpng reads only an APNG's default image and Pillow cuts the frames to 8 bits."""
    frames = [Image.fromarray(_twelve(False) * k) for k in (1, 2)]
    path = tmp_path / "a.png"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as im:
        assert im.n_frames == 2 and im.mode.startswith("I")  # the premise: 16-bit, 2 frames
    with pytest.raises(BadImage, match=r"animated 16-bit PNG \(2 frames\)") as caught:
        read_image(path)
    assert caught.value.kind == "animated 16-bit PNG"


# ------------- TIFF pages: every layout and mode upright, whatever Pillow does inside (r13)

_YX = np.mgrid[0:32, 0:48]  # stored (H, W): not square, tiles of 16 fit
# EXIF orientation -> numpy's turn of the stored (H, W[, C]) pixels to the upright picture
NUMPY_UPRIGHT = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: np.swapaxes(a, 0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(np.fliplr(a), -1),
    8: lambda a: np.rot90(a, 1),
}
_ALPHA8 = ((_YX[1] * 7 + _YX[0] * 11) % 256).astype(np.uint8)  # every level, 0 and 255 too


def _composited(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """numpy reference: unassociated alpha onto black, rounded."""
    mixed = colour.astype(float) * (alpha[..., None] if colour.ndim == 3 else alpha) / 255
    return np.round(mixed).astype(np.uint8)


_CMAP = np.stack([np.arange(256), 255 - np.arange(256), np.arange(256) // 3 + 40]) * 257
TIFF_MODES = {
    # mode: (stored samples, tifffile.imwrite keywords, stored -> shown uint8 (numpy)); 16-bit
    # values are scaled from their min..max (within 1 level of rounding)
    "grey 8": (((_YX[1] * 5 + _YX[0] * 3) % 256).astype(np.uint8), {}, lambda a: a),
    "grey 16 little-endian": (
        ((_YX[1] * 977 + _YX[0] * 131) % 60000 + 100).astype(np.uint16),
        {},
        lambda a: _scaled(a, a.min(), a.max()),
    ),
    "grey 16 big-endian": (
        ((_YX[1] * 977 + _YX[0] * 131) % 60000 + 100).astype(np.uint16),
        {"byteorder": ">"},
        lambda a: _scaled(a, a.min(), a.max()),
    ),
    "palette": (
        ((_YX[1] * 5 + _YX[0] * 3) % 256).astype(np.uint8),
        {"photometric": "palette", "colormap": _CMAP.astype(np.uint16)},
        lambda a: np.moveaxis(_CMAP[:, a] // 257, 0, -1).astype(np.uint8),
    ),
    "RGB": (gradient(32, 48, rgb=True), {"photometric": "rgb"}, lambda a: a),
    "RGBA": (
        np.dstack([gradient(32, 48, rgb=True), _ALPHA8]),
        {"photometric": "rgb", "extrasamples": [2]},
        lambda a: _composited(a[..., :3], a[..., 3]),
    ),
    "LA": (
        np.dstack([gradient(32, 48), _ALPHA8]),
        {"photometric": "minisblack", "extrasamples": [2]},
        lambda a: _composited(a[..., 0], a[..., 1]),
    ),
    "1-bit": (gradient(32, 48) > 120, {"photometric": "minisblack"}, lambda a: a * np.uint8(255)),
    "1-bit, 0 is white": (
        gradient(32, 48) > 120,
        {"photometric": "miniswhite"},
        lambda a: ~a * np.uint8(255),
    ),
}
TIFF_LAYOUTS = {  # tifffile.imwrite keywords
    "one strip": {"rowsperstrip": 32},
    "several strips": {"rowsperstrip": 8},
    "LZW": {"compression": "lzw", "rowsperstrip": 8},
    "tiled": {"tile": (16, 16)},
}


@pytest.mark.parametrize("mode", TIFF_MODES)
def test_tiff_pages_are_upright_in_every_layout_and_orientation(tmp_path, mode):
    """All eight orientations of every TIFF layout (one uncompressed strip: the one Pillow
    memory-maps; several strips; LZW; tiles) in every mode Pillow reads: the upright picture
    and size. Reference: tifffile's stored page, shown and turned with numpy."""
    stored, kwargs, shown = TIFF_MODES[mode]
    for layout, orientation in ((lay, o) for lay in TIFF_LAYOUTS for o in NUMPY_UPRIGHT):
        path = tmp_path / f"{layout}-{orientation}.tif"
        tag = [(274, "H", 1, orientation, True)]
        tifffile.imwrite(path, stored, **kwargs, **TIFF_LAYOUTS[layout], extratags=tag)
        with tifffile.TiffFile(path) as tif:  # the premise: one page of this layout
            page = tif.pages[0]
            assert page.is_tiled == (layout == "tiled") and page.tags[274].value == orientation
            raw = page.asarray()
        want = NUMPY_UPRIGHT[orientation](shown(raw))
        d = read_image(path)
        ((_, px),) = d.frames
        assert px.shape == want.shape, (layout, orientation)
        assert np.abs(px.astype(int) - want).max() <= (want.dtype != raw.dtype), (
            layout,
            orientation,
        )
        assert d.sizes == [(want.shape[1], want.shape[0])]


_WHITE16 = (_YX[1] * 1300 + _YX[0] * 7 + 500).astype(np.uint16)  # (32, 48), 500..61827
MINISWHITE = {
    # kind: (stored samples, tifffile.imwrite keywords)
    "uint8": ((_WHITE16 >> 8).astype(np.uint8), {}),
    "uint16 little-endian": (_WHITE16, {}),
    "uint16 big-endian": (_WHITE16, {"byteorder": ">"}),
    "int16": ((_WHITE16 // 2).astype(np.int16) - 8000, {}),
    "uint32": (_WHITE16.astype(np.uint32) * 1000, {}),
    "float32 little-endian": (_WHITE16.astype(np.float32) / 3, {}),
    "float32 big-endian": (_WHITE16.astype(np.float32) / 3, {"byteorder": ">"}),
    "float64": (_WHITE16.astype(np.float64) - 7000.5, {}),
    "uint16, orientation 6": (_WHITE16, {"extratags": [(274, "H", 1, 6, True)]}),
}


@pytest.mark.parametrize("kind", MINISWHITE)
def test_tiff_min_is_white_is_inverted_at_every_depth(tmp_path, kind):
    """PhotometricInterpretation 0 (MINISWHITE, TIFF 6.0: the lowest value is white) at any
    depth and dtype is the picture, not its negative nor refused. Reference: tifffile's stored
    values, numpy: 8-bit 255 - v, deeper ones scaled from max..min to 0..255."""
    stored, kwargs = MINISWHITE[kind]
    path = tmp_path / "w.tif"
    tifffile.imwrite(path, stored, photometric="miniswhite", **kwargs)
    with tifffile.TiffFile(path) as tif:
        raw, turn = tif.pages[0].asarray(), tif.pages[0].tags.valueof(274, 1)
    hi, lo = float(raw.max()), float(raw.min())
    want = 255 - raw if raw.dtype == np.uint8 else _scaled(hi - raw.astype(float), 0, hi - lo)
    want = NUMPY_UPRIGHT[turn](want)
    d = read_image(path)
    ((_, px),) = d.frames
    assert px.shape == want.shape and np.abs(px.astype(int) - want).max() <= 1
    assert px[0, 0] > 200 and px[-1, -1] < 50  # the lowest stored values are white


_G16 = (_YX[1] * 900 + _YX[0] * 13 + 100).astype(np.uint16)
_F64 = _YX[0] * 1234.5 - _YX[1] * 10.0
_KEEP = _ALPHA8 > 100  # where a 16-bit alpha is opaque
_GA16 = np.dstack([_G16 // 2, np.where(_KEEP, 65535, 0).astype(np.uint16)])
_RGB8 = gradient(32, 48, rgb=True)
MIXED_PAGES = {
    # kind: pages as (stored, tifffile keywords, the picture it means or None if skipped)
    "uint16 then float64": [(_G16, {}, _G16), (_F64, {}, _F64)],
    "float64 then uint16": [(_F64, {}, _F64), (_G16, {}, _G16)],
    "uint16 then 16-bit grey+alpha": [
        (_G16, {}, _G16),
        (_GA16, {"extrasamples": [2]}, np.where(_KEEP, _G16 // 2, 0)),
    ],
    "uint16 then a float64 preview": [(_G16, {}, _G16), (_F64[::2, ::2], PREVIEW, None)],
    "uint16 then LERC-compressed uint16": [
        (_G16, {}, _G16),
        (_G16 // 3, {"compression": "lerc"}, _G16 // 3),
    ],
    "8-bit RGB, float64, 16-bit grey": [
        (_RGB8, {"photometric": "rgb"}, _RGB8),
        (_F64, {}, _F64),
        (_G16, {}, _G16),
    ],
}


@pytest.mark.parametrize("kind", MIXED_PAGES)
def test_tiff_pages_only_tifffile_reads_are_read_at_any_position(tmp_path, kind):
    """A page Pillow cannot read (float64, 16-bit grey+alpha, LERC) is read by tifffile wherever it
    stands in the file, not only first; a preview of that kind is skipped. Reference: the
    pictures written; high-depth pages scaled with numpy over the file's min..max, 8-bit kept."""
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as tif:
        for stored, kwargs, _ in MIXED_PAGES[kind]:
            tif.write(stored, **{"photometric": "minisblack", **kwargs})
    means = [m for _, _, m in MIXED_PAGES[kind] if m is not None]
    deep = [m for m in means if m.dtype != np.uint8]
    lo, hi = min(m.min() for m in deep), max(m.max() for m in deep)
    want = [m if m.dtype == np.uint8 else _scaled(m, lo, hi) for m in means]
    d = read_image(path)
    assert [k for k, _ in d.frames] == list(range(len(means))) and d.n_frames == len(means)
    for (_, px), w in zip(d.frames, want, strict=True):
        assert px.shape == w.shape and np.abs(px.astype(int) - w).max() <= 1
    ((k, px),) = read_image(path, frames=[len(means) - 1]).frames  # the last page alone
    assert k == len(means) - 1 and np.abs(px.astype(int) - want[-1]).max() <= 1


def test_apng_default_image_outside_the_animation_is_not_a_frame(tmp_path):
    """An APNG whose default image (IDAT) comes before the first frame control is a still for
    viewers without APNG (APNG spec: not part of the animation): skipped, frames numbered over
    the animation. Reference: the pictures written."""
    poster, *frames = _views(3)
    path = tmp_path / "a.png"
    Image.fromarray(poster).save(
        path, save_all=True, append_images=[Image.fromarray(f) for f in frames], default_image=True
    )
    with Image.open(path) as im:  # the premise: Pillow sees the poster as its frame 0
        assert im.info["default_image"] and im.n_frames == 3
    d = read_image(path)
    assert [k for k, _ in d.frames] == [0, 1] and d.n_frames == 2
    assert all(np.array_equal(px, f) for (_, px), f in zip(d.frames, frames, strict=True))
    ((k, px),) = read_image(path, oct_central=True).frames
    assert k == 1 and np.array_equal(px, frames[1])
    ((k, px),) = read_image(path, frames=[0]).frames
    assert k == 0 and np.array_equal(px, frames[0])


_IDX16 = (_YX[1] * 1300 + _YX[0] * 5).astype(np.uint16)  # (32, 48) indices up to 61255
_RAMP = np.linspace(0, 65535, 65536)
_CMAP16 = np.stack([_RAMP, _RAMP[::-1], (_RAMP * 7) % 65536]).astype(np.uint16)
_PAL16 = {"photometric": "palette", "colormap": _CMAP16}
_PAL8 = {"photometric": "palette", "colormap": _CMAP[::-1].astype(np.uint16)}
PALETTE_TIFFS = {
    # kind: (pages as (stored, tifffile keywords), the page looked at)
    "16-bit": ([(_IDX16, _PAL16)], 0),
    "16-bit, orientation 8": ([(_IDX16, {**_PAL16, "extratags": [(274, "H", 1, 8, True)]})], 0),
    "16-bit after an 8-bit grey page": ([(_RGB8[..., 0], {}), (_IDX16, _PAL16)], 1),
    "8-bit after a float64 page": ([(_F64, {}), (_IDX16.astype(np.uint8), _PAL8)], 1),
}


@pytest.mark.parametrize("kind", PALETTE_TIFFS)
def test_tiff_palettes_are_looked_up_at_every_depth(tmp_path, kind):
    """A palette TIFF page of 16-bit indices (a 65536-entry ColorMap), and any palette page
    tifffile reads, is looked up to RGB, its 16-bit entries scaled by their full range (never
    stretched to the page's min..max). Reference: tifffile's ColorMap indexed with numpy."""
    pages, k = PALETTE_TIFFS[kind]
    path = tmp_path / "p.tif"
    with tifffile.TiffWriter(path) as tif:
        for stored, kwargs in pages:
            tif.write(stored, **{"photometric": "minisblack", **kwargs})
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[k]
        cmap, raw, turn = page.colormap, page.asarray(), page.tags.valueof(274, 1)
    looked_up = np.moveaxis(cmap[:, raw], 0, -1).astype(float)
    want = NUMPY_UPRIGHT[turn](np.round(looked_up * 255 / 65535))
    ((frame, px),) = read_image(path, frames=[k]).frames
    assert frame == k and px.shape == want.shape and np.array_equal(px, want)


def _apng_declaring(path, declared: int) -> None:
    """A two-frame 64x48 APNG whose acTL chunk declares ``declared`` frames."""
    frames = [Image.fromarray(v) for v in _views(2)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    png = buf.getvalue()
    at = png.index(b"acTL") - 4
    body = struct.pack(">II", declared, 0)
    chunk = struct.pack(">I", 8) + b"acTL" + body + struct.pack(">I", zlib.crc32(b"acTL" + body))
    path.write_bytes(png[:at] + chunk + png[at + 20 :])


@pytest.mark.parametrize(
    ("declared", "max_pixels", "kind"),
    [
        (2**31 - 1, None, "frame count beyond the file"),
        (2**31 - 1, 10**12, "frame count beyond the file"),
        (10**6, None, "frame count beyond the file"),
        (10**6, 10**12, "frame count beyond the file"),
    ],
)
def test_apng_declaring_more_frames_than_it_holds_is_refused_at_once(
    tmp_path, declared, max_pixels, kind
):
    """An APNG whose acTL declares far more frames than it holds (damaged or crafted) is
    refused from its header, before any frame is looked at (it hung ingest: one record per
    declared frame). Reference: Pillow's n_frames, the declared count."""
    path = tmp_path / "a.png"
    _apng_declaring(path, declared)
    with Image.open(path) as im:
        assert im.n_frames == declared  # the premise
    with pytest.raises(BadImage) as err:
        read_image(path, max_pixels=max_pixels)
    assert err.value.kind == kind and str(declared) in str(err.value) and "\n" not in str(err.value)


_WIDE = (_YX[1] * 89_000_000 + _YX[0] * 1000).astype(np.float64)  # 0 .. 4.18e9, (32, 48)
GREY_TIFF_TYPES = {
    "uint32, over 2^31": _WIDE.astype(np.uint32),
    "uint32, below 2^31": (_WIDE // 3).astype(np.uint32),
    "int32, negative": (_WIDE - 2**31).astype(np.int32),
    "uint16": (_WIDE // 2**16).astype(np.uint16),
    "int16": (_WIDE // 2**16 - 2**15).astype(np.int16),
    "int8": (_WIDE // 2**24 - 2**7).astype(np.int8),  # Pillow took -1 as 255 (white)
    "int8, negative only": (_WIDE // 2**25 - 2**7).astype(np.int8),
}


@pytest.mark.parametrize("kind", GREY_TIFF_TYPES)
def test_grey_tiff_samples_keep_their_stored_type(tmp_path, kind):
    """A 16/32-bit grey TIFF page is read with its own sample type: an unsigned 32-bit one
    (Pillow opens it as int32, values >= 2^31 wrapping to negatives) by tifffile, then scaled
    over its min..max. Reference: tifffile's raw page scaled with numpy."""
    path = tmp_path / "g.tif"
    tifffile.imwrite(path, GREY_TIFF_TYPES[kind], photometric="minisblack")
    raw = tifffile.imread(path).astype(np.float64)
    want = np.round((raw - raw.min()) * (255 / (raw.max() - raw.min())))
    ((_, px),) = read_image(path).frames
    assert px.dtype == np.uint8 and np.abs(px - want).max() <= 1


def _jpeg_bytes(view: np.ndarray, orientation: int | None) -> bytes:
    """``view`` as a JPEG (quality 95, as the MPO's frames), EXIF orientation if given."""
    buf = io.BytesIO()
    exif = _exif_bytes(orientation) if orientation else b""
    Image.fromarray(view).save(buf, "JPEG", quality=95, exif=b"Exif\0\0" + exif if exif else b"")
    return buf.getvalue()


@pytest.mark.parametrize(
    "orientations", [(6, None), (None, 8), (None, 8, None), (3, None, 6), (6, 1)]
)
def test_mpo_frames_are_turned_by_their_own_exif_only(tmp_path, orientations):
    """Each MPO frame is turned by its own EXIF orientation, none (no APP1) being 1: Pillow
    keeps the previous frame's EXIF after seeking to a frame without one. Full and drafted
    decodes alike. Reference: each frame's JPEG decoded on its own by Pillow, turned by numpy."""
    views = _views(len(orientations))
    first, *rest = map(Image.fromarray, views)
    for im, o in zip(rest, orientations[1:], strict=True):
        im.encoderinfo = {"exif": b"Exif\0\0" + _exif_bytes(o) if o else b""}
    path = tmp_path / "x.mpo"
    exif0 = b"Exif\0\0" + _exif_bytes(orientations[0]) if orientations[0] else b""
    first.save(path, "MPO", save_all=True, append_images=rest, quality=95, exif=exif0)
    refs = []
    for view, o in zip(views, orientations, strict=True):
        with Image.open(io.BytesIO(_jpeg_bytes(view, o))) as im:
            refs.append(NUMPY_UPRIGHT[o or 1](np.asarray(im)))
    d = read_image(path)
    assert d.sizes == [r.shape[1::-1] for r in refs]
    assert all(np.array_equal(px, r) for (_, px), r in zip(d.frames, refs, strict=True))
    drafted = read_image(path, draft=(32, 24)).frames
    assert [px.shape[0] > px.shape[1] for _, px in drafted] == [
        r.shape[0] > r.shape[1] for r in refs
    ]


def _grey_png(path, values: np.ndarray, bits: int, key: int) -> None:
    """A grey PNG of ``bits``-bit ``values`` (H, W) with a tRNS colour key, written by hand."""
    h, w = values.shape
    packed = np.packbits(
        ((values[..., None] >> np.arange(bits - 1, -1, -1)) & 1).astype(np.uint8).reshape(h, -1),
        axis=1,
    )
    raw = b"".join(b"\0" + row.tobytes() for row in packed)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", w, h, bits, 0, 0, 0, 0)
    parts = [chunk(b"IHDR", ihdr), chunk(b"tRNS", struct.pack(">H", key))]
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + b"".join(parts)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(("bits", "key"), [(1, 1), (2, 3), (2, 1), (4, 15), (4, 6), (8, 50)])
def test_grey_png_colour_key_is_black_at_every_bit_depth(tmp_path, bits, key):
    """A grey PNG's tRNS colour key is composited onto black at every bit depth (Pillow keeps
    a 2- or 4-bit key in the file's units while scaling the samples to 0..255). Reference:
    numpy on the samples written: key -> 0, others v * 255 / (2^bits - 1)."""
    values = ((_YX[1] + _YX[0]) % 2**bits).astype(np.uint8)
    path = tmp_path / "g.png"
    _grey_png(path, values, bits, key)
    want = np.where(values == key, 0, np.round(values.astype(float) * 255 / (2**bits - 1)))
    ((_, px),) = read_image(path).frames
    assert px.dtype == np.uint8 and np.array_equal(px, want)


@pytest.mark.parametrize("bits", [2, 4, 6])
@pytest.mark.parametrize("photometric", ["minisblack", "miniswhite"])
def test_low_bit_tiff_page_read_by_tifffile_is_scaled_like_pillows(tmp_path, bits, photometric):
    """A 2..7-bit grey TIFF page tifffile reads (after a float64 page Pillow cannot open) is
    shown over its BitsPerSample range, 0..2^bits-1 as 0..255, as Pillow shows the same page
    (it came 0..15 of 255 before: far too dark). Reference: tifffile's raw page with numpy."""
    values = ((_YX[1] + _YX[0]) % 2**bits).astype(np.uint8)
    path = tmp_path / "t.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(_F64)
        tif.write(values, bitspersample=bits, photometric=photometric)
    raw = tifffile.imread(path, key=1).astype(float)
    full = 2**bits - 1
    want = np.round((full - raw if photometric == "miniswhite" else raw) * 255 / full)
    ((_, px),) = read_image(path, frames=[1]).frames
    assert px.dtype == np.uint8 and np.array_equal(px, want)


@pytest.mark.parametrize(("photometric", "channels"), [("rgb", 3), ("minisblack", 1)])
def test_8bit_tiff_associated_alpha_is_the_stored_picture(tmp_path, photometric, channels):
    """An 8-bit TIFF page with associated (premultiplied) alpha is the picture on black as
    stored (Pillow un-premultiplies it; multiplying again was off by one). Reference: the
    colour samples tifffile reads."""
    rng = np.random.default_rng(7)
    stored = rng.integers(0, 256, (32, 48, channels + 1), dtype=np.uint8)
    stored[..., :channels] = np.minimum(stored[..., :channels], stored[..., channels:])
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, stored, photometric=photometric, extrasamples=[1])
    raw = tifffile.imread(path)[..., :channels]
    ((_, px),) = read_image(path).frames
    assert px.dtype == np.uint8 and np.array_equal(px, raw[..., 0] if channels == 1 else raw)


# ------------- broken downloads and files Pillow cannot open get their own reason (fix-img)


def _png_bytes(pixels: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", **kw)
    return buf.getvalue()


def _adam7_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 as an interlaced (Adam7) PNG, written by hand (Pillow writes none)."""
    h, w = rgb.shape[:2]
    passes = [(0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2)]
    rows = [rgb[y0::dy, x0::dx] for y0, x0, dy, dx in [*passes, (1, 0, 2, 1)]]
    raw = b"".join(b"\0" + row.tobytes() for sub in rows if sub.size for row in sub)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    head = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 1))
    body = chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + head + body


def _bad_crc_png() -> bytes:
    """A PNG whose gAMA chunk's CRC does not match its data (one byte flipped in transit)."""
    data = bytearray(_png_bytes(gradient(rgb=True)))
    gama = struct.pack(">I", 45455)
    chunk = struct.pack(">I", 4) + b"gAMA" + gama + struct.pack(">I", zlib.crc32(b"gAMA" + gama))
    data[33:33] = chunk  # after the IHDR chunk (8 + 25 bytes)
    data[33 + 8] ^= 0x01  # the first data byte of gAMA
    return bytes(data)


def _imagecodecs():
    import imagecodecs

    return imagecodecs


def _pillow_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _jpeg12() -> bytes:
    """A valid 12-bit JPEG (libjpeg-turbo through imagecodecs), as some cameras store."""
    import imagecodecs

    return imagecodecs.jpeg8_encode(gradient().astype(np.uint16) * 16, level=95, bitspersample=12)


BROKEN = {
    # kind: (file bytes, suffix, the reason read_image gives: exact; None: read, not broken)
    "12-bit JPEG": (_jpeg12, "jpg", "undecodable image (JPEG: cannot handle 12-bit layers)"),
    "PNG with a bad chunk CRC": (
        _bad_crc_png,
        "png",
        "undecodable image (PNG: broken PNG file (bad header checksum in '...'))",
    ),
    "PNG signature only": (
        lambda: b"\x89PNG\r\n\x1a\n",
        "png",
        "undecodable image (PNG: header cut short or malformed)",
    ),
    "PNG cut within IHDR": (  # Pillow's own OSError
        lambda: _png_bytes(gradient())[:20],
        "png",
        "undecodable image (Truncated File Read)",
    ),
    "JPEG start of image only": (
        lambda: b"\xff\xd8\xff\xe0",
        "jpg",
        "undecodable image (JPEG: header cut short or malformed)",
    ),
    "WebP header only": (  # Pillow's own OSError
        lambda: b"RIFF\x24\0\0\0WEBPVP8 ",
        "webp",
        "undecodable image (could not create decoder object)",
    ),
    "PNG cut in its image data": (
        lambda: _png_bytes(gradient(200, 200, rgb=True))[:3000],
        "png",
        "undecodable image (image file is truncated)",
    ),
    "interlaced PNG": (lambda: _adam7_png(gradient(rgb=True)), "png", None),
    "interlaced PNG cut in its image data": (
        lambda: _adam7_png(gradient(rgb=True))[:2500],
        "png",
        "undecodable image (image file is truncated)",
    ),
    "TIFF header alone": (
        lambda: b"II*\0\x08\0\0\0",
        "tif",
        "undecodable image (TIFF without any readable page)",
    ),
    "TIFF first page past its end": (
        lambda: b"MM\0*\0\0\x10\0" + b"\0" * 8,
        "tif",
        "undecodable image (TIFF without any readable page)",
    ),
    "HEIC (an iPhone's photo)": (
        lambda: b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(100),
        "jpg",
        "unsupported image format HEIF",
    ),
    "JPEG XL codestream": (
        lambda: _imagecodecs().jpegxl_encode(gradient(rgb=True)),
        "jxl",
        "unsupported image format JPEG XL",
    ),
    "AVIF": (  # Pillow's plugin names it
        lambda: _pillow_bytes(gradient(rgb=True), "AVIF"),
        "avif",
        "unsupported image format AVIF",
    ),
    "HTML error page": (
        lambda: b"<!DOCTYPE html><html><title>404 Not Found</title></html>\n",
        "jpg",
        "not an image (text: an HTML page, as a failed download saves)",
    ),
    "HTML error page named .dcm": (  # was 'DICOM without pixel data': pydicom parses anything
        lambda: b"\n  <html><head><title>403 Forbidden</title></head></html>",
        "dcm",
        "not an image (text: an HTML page, as a failed download saves)",
    ),
    "S3 XML error, no suffix": (
        lambda: b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>',
        "",
        "not an image (text: an XML document, as a failed download saves)",
    ),
    "JSON error named .tif": (
        lambda: b'{"error": "not found", "patient": "DOE^JOHN"}',
        "tif",
        "not an image (text: JSON, as a failed download saves)",
    ),
    "Git LFS pointer": (
        lambda: b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\n",
        "png",
        "not an image (text: a Git LFS pointer, not the file it stands for)",
    ),
    "binary junk": (lambda: bytes(range(256)) * 4, "jpg", "not an image (format not recognised)"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_files_get_the_reason_of_what_is_wrong(tmp_path, kind):
    """A file whose signature names a photo format that Pillow refuses (a 12-bit JPEG, a
    PNG chunk whose CRC fails, a header cut short) is an undecodable image of that format, not
    'not an image'; an interlaced PNG cut in its image data is truncated (it failed with
    an unrelated TypeError: the decode error was swallowed while its EXIF was looked for);
    a TIFF without any page is no 'file of previews only'; a text file (an HTML, XML or JSON
    error page, a Git LFS pointer) says so, whatever its suffix (a '.dcm' one was 'DICOM
    without pixel data', the reason quoting nothing of it). Reference: the bytes written,
    and for the 12-bit JPEG an independent decoder (libjpeg-turbo, imagecodecs) reading it."""
    make, suffix, reason = BROKEN[kind]
    path = tmp_path / (f"x.{suffix}" if suffix else "IM0001")
    path.write_bytes(make())
    if kind == "12-bit JPEG":  # the premise: a valid JPEG, only Pillow cannot read it
        import imagecodecs

        assert imagecodecs.jpeg8_decode(path.read_bytes()).dtype == np.uint16
    if reason is None:  # the premise of the cut one: whole, it is the picture written
        ((_, px),) = read_image(path).frames
        assert np.array_equal(px, gradient(rgb=True))
        return
    with pytest.raises(BadImage) as caught:
        read_image(path)
    assert str(caught.value) == reason
    unsupported = reason.startswith("unsupported")  # its kind is the reason, format and all
    assert caught.value.kind == (reason if unsupported else reason.split(" (")[0])


TIFF_CODECS = {
    # kind: tifffile.imwrite keywords (imagecodecs encodes)
    "WebP": {"compression": "webp"},
    "WebP, orientation 6": {"compression": "webp", "extratags": [(274, "H", 1, 6, True)]},
    "ZSTD + predictor": {"compression": "zstd", "predictor": True},
    "LZMA": {"compression": "lzma"},
    "Deflate + predictor": {"compression": "zlib", "predictor": True},
    "JPEG": {"compression": "jpeg"},
    "JPEG XL": {"compression": "jpegxl"},
    "JPEG 2000": {"compression": "jpeg2000"},
    "PNG": {"compression": "png"},
    "PackBits": {"compression": "packbits"},
}


@pytest.mark.parametrize("kind", TIFF_CODECS)
def test_tiff_compressions_give_the_stored_picture(tmp_path, kind):
    """An 8-bit RGB TIFF in every compression tifffile writes gives the picture it stores,
    including those Pillow knows by name but its libtiff cannot decode (WebP: 'decoder error
    -2' before). Reference: tifffile's decode of the same page, turned upright by numpy."""
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, gradient(32, 48, rgb=True), photometric="rgb", **TIFF_CODECS[kind])
    with tifffile.TiffFile(path) as tif:
        raw, turn = tif.pages[0].asarray(), tif.pages[0].tags.valueof(274, 1)
    want = NUMPY_UPRIGHT[turn](raw)
    d = read_image(path)
    ((_, px),) = d.frames
    assert px.shape == want.shape and np.array_equal(px, want)
    assert d.sizes == [(want.shape[1], want.shape[0])]


def _save_16bit_rgb_tiff(path, rgb: np.ndarray) -> None:
    tifffile.imwrite(path, rgb.astype(np.uint16) * 257, photometric="rgb")


PIXEL_LIMIT_FORMATS = {  # suffix -> writer of an (H, W, 3) uint8 picture
    "png": lambda path, rgb: Image.fromarray(rgb).save(path),
    "jpeg": lambda path, rgb: Image.fromarray(rgb).save(path, quality=95),
    "tif": lambda path, rgb: Image.fromarray(rgb).save(path),
    "bmp": lambda path, rgb: Image.fromarray(rgb).save(path),
    "webp": lambda path, rgb: Image.fromarray(rgb).save(path, lossless=True),
    "16-bit.tif": _save_16bit_rgb_tiff,  # read by tifffile: the header check is the TIFF's own
}


@pytest.mark.parametrize("suffix", list(PIXEL_LIMIT_FORMATS))
def test_ingest_max_pixels_not_pillows_default_is_the_pixel_limit(tmp_path, monkeypatch, suffix):
    """ingest.max_pixels decides which photos are too large, not Pillow's fixed default (a
    9500 x 9500 PNG was refused with the default 178,956,970 allowed). Pillow's limit is
    lowered here so that a 60 x 40 picture crosses it; reference: the same file decoded by
    Pillow (tifffile for 16-bit) with no limit."""
    path = tmp_path / f"a.{suffix}"
    picture = gradient(40, 60, rgb=True)
    picture[0, 0], picture[-1, -1] = 0, 255  # the full range: 16-bit is scaled over the file's
    PIXEL_LIMIT_FORMATS[suffix](path, picture)
    if suffix.startswith("16-bit"):
        reference = (tifffile.imread(path) // 257).astype(np.uint8)
    else:
        with Image.open(path) as im:
            reference = np.asarray(im.convert("RGB"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)

    (frame,) = read_image(path, max_pixels=60 * 40).frames  # within the user's limit: read
    np.testing.assert_array_equal(frame[1], reference)
    with pytest.raises(BadImage) as err:  # one pixel more than the user's limit: refused
        read_image(path, max_pixels=60 * 40 - 1)
    assert str(err.value) == "decompression bomb: 60x40x1 pixels exceeds ingest.max_pixels (2399)"
    with pytest.raises(BadImage, match="decompression bomb: exceeds Pillow's pixel limit"):
        read_image(path)  # no limit given: Pillow's stands
    assert Image.MAX_IMAGE_PIXELS == 1000  # and is left as it was


def test_a_photo_above_pillows_default_pixel_limit_is_read(tmp_path):
    """A real 9500 x 9500 PNG (90.25 M pixels > Pillow's 89,478,485) within ingest.max_pixels's
    default is read whole; its rows are the values written (row index mod 251)."""
    path = tmp_path / "big.png"
    rows = (np.arange(9500) % 251).astype(np.uint8)
    Image.fromarray(np.broadcast_to(rows[:, None], (9500, 9500)).copy()).save(
        path, compress_level=1
    )
    (frame,) = read_image(path, max_pixels=178_956_970).frames
    assert frame[1].shape == (9500, 9500)
    np.testing.assert_array_equal(frame[1][:, 7], rows)
    np.testing.assert_array_equal(frame[1][4321], np.full(9500, rows[4321]))
