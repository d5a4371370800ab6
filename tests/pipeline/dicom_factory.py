"""Builders for test inputs: DICOM files of every supported kind, photos, params files.

Everything is made here with pydicom/Pillow (no stored fixtures). pydicom 3 encodes RLE,
JPEG-LS and JPEG 2000 itself; JPEG baseline comes from Pillow, JPEG extended is Pillow's
8-bit stream relabelled SOF1, and JPEG lossless (process 14, SV1) is encoded by the small
reference encoder below (pydicom has no encoder for those three).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[2]
OCT_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
OPHTHALMIC_PHOTO_8 = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OPHTHALMIC_PHOTO_16 = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

# Known identifying header values: none of them may appear in any pipeline output.
PHI = {
    "PatientName": "Zebedee^Quartermaine",
    "PatientID": "PHI-7781234",
    "PatientBirthDate": "19470312",
    "AccessionNumber": "ACC55550123",
    "InstitutionName": "Marchbanks Eye Infirmary",
    "ReferringPhysicianName": "Doctor^Obscura",
}


def gradient(h: int = 48, w: int = 64, rgb: bool = False, seed: int = 0) -> np.ndarray:
    """A smooth test picture with some texture: (H, W) or (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 3 + xx * 2) % 200 + 20 + rng.integers(0, 20, (h, w))
    if not rgb:
        return base.astype(np.uint8)
    return np.stack([base, 255 - base, (base // 2 + 60)], axis=-1).astype(np.uint8)


def malformed_tiff(image: Image.Image) -> bytes:
    """A TIFF whose next-page pointer points past its end: Pillow raises TypeError on it (not
    the OSError of a truncated stream)."""
    buf = io.BytesIO()
    image.save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    ifd = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, ifd)[0]
    struct.pack_into("<I", data, ifd + 2 + 12 * entries, 0x00CB0000)
    return bytes(data)


def _sof_to_extended(data: bytes) -> bytes:
    """Relabel a baseline JPEG's SOF0 marker as SOF1 (8-bit extended sequential)."""
    pos = 2
    while pos < len(data):
        marker, length = data[pos : pos + 2], int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == b"\xff\xc0":
            return data[:pos] + b"\xff\xc1" + data[pos + 2 :]
        pos += 2 + length
    raise ValueError("no SOF0 marker")


def jpeg_lossless(img: np.ndarray, precision: int) -> bytes:
    """Encode (H, W) grayscale as JPEG lossless (process 14, predictor 1, one Huffman table)."""
    h, w = img.shape
    x = img.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]  # first row: left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the pixel above
    pred[1:, 1:] = x[1:, :-1]  # predictor 1: left neighbour
    diff = (x - pred) % 65536
    diff = np.where(diff > 32768, diff - 65536, diff)
    # One DC table: all 17 categories (0..16) with 5-bit codes 0..16 (canonical, no all-ones).
    bits = bytearray()
    acc, nacc = 0, 0
    for d in diff.ravel().tolist():
        ssss = 16 if d == 32768 else abs(d).bit_length()
        code, n = ssss, 5
        if 0 < ssss < 16:
            extra = d if d > 0 else d + (1 << ssss) - 1
            code, n = (code << ssss) | extra, n + ssss
        acc, nacc = (acc << n) | code, nacc + n
        while nacc >= 8:
            nacc -= 8
            byte = (acc >> nacc) & 0xFF
            bits.append(byte)
            if byte == 0xFF:
                bits.append(0)  # byte stuffing
        acc &= (1 << nacc) - 1
    if nacc:
        byte = ((acc << (8 - nacc)) | ((1 << (8 - nacc)) - 1)) & 0xFF  # pad with 1-bits
        bits.append(byte)
        if byte == 0xFF:
            bits.append(0)
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    dht = bytes([0x00, *counts, *range(17)])
    sof = bytes([precision]) + h.to_bytes(2, "big") + w.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # Ns=1, Cs=1, table 0, Ss=predictor 1, Se=0, Ah/Al=0

    def seg(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    return (
        b"\xff\xd8" + seg(0xC4, dht) + seg(0xC3, sof) + seg(0xDA, sos) + bytes(bits) + b"\xff\xd9"
    )


def _jpeg(img: np.ndarray, extended: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95, subsampling=1)
    return _sof_to_extended(buf.getvalue()) if extended else buf.getvalue()


def make_dicom(
    path: Path,
    frames: np.ndarray,
    *,
    syntax: str = "explicit",
    sop_class: str = OPHTHALMIC_PHOTO_8,
    photometric: str | None = None,
    bits_stored: int | None = None,
    phi: dict | None = None,
    laterality: str | None = "R",
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    palette: np.ndarray | None = None,
    label_bits_stored: int | None = None,
    signed: bool = False,
) -> Path:
    """Write (F, H, W[, 3]) uint8/uint16 ``frames`` as a DICOM file in ``syntax``.

    syntax: explicit | implicit | rle | jpeg | jpeg_extended | jpeg_lossless | jpegls | j2k |
    j2k_lossless. ``photometric`` defaults to MONOCHROME2 or RGB.

    ``palette``: (N, 3) uint8/uint16 lookup table: the frames are its indices, written as
    PALETTE COLOR with 8/16-bit Red/Green/Blue Palette Color LUTs. ``label_bits_stored``:
    Bits Stored (and High Bit) written to the header after encoding, the codestream keeping
    the full precision it was encoded at, as some encoders do: values above Bits Stored then
    travel through every syntax. ``signed``: Pixel Representation 1 in the header (the
    frames, uint16, hold the two's-complement bit patterns; encoded as unsigned).
    """
    frames = np.asarray(frames)
    n, h, w = frames.shape[:3]
    rgb = frames.ndim == 4
    bits = 16 if frames.dtype == np.uint16 else 8
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if syntax == "implicit" else ExplicitVRLittleEndian
    )
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for key, value in (phi or {}).items():
        setattr(ds, key, value)
    ds.Modality = "OPT" if sop_class == OCT_TOMOGRAPHY else "OP"
    if laterality:
        ds.ImageLaterality = laterality
    ds.Rows, ds.Columns, ds.SamplesPerPixel = h, w, 3 if rgb else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if rgb else "MONOCHROME2")
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    if n > 1:
        ds.NumberOfFrames = n
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = frames.tobytes()
    if syntax in ("jpeg", "jpeg_extended"):
        ds.PixelData = encapsulate([_jpeg(f, syntax == "jpeg_extended") for f in frames])
        ds.file_meta.TransferSyntaxUID = JPEGExtended12Bit if syntax != "jpeg" else JPEGBaseline8Bit
        if rgb:
            ds.PhotometricInterpretation = "YBR_FULL_422"
    elif syntax == "jpeg_lossless":
        ds.PixelData = encapsulate([jpeg_lossless(f, bits) for f in frames])
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    elif syntax in ("rle", "jpegls", "j2k", "j2k_lossless"):
        uid = {
            "rle": RLELossless,
            "jpegls": JPEGLSLossless,
            "j2k": JPEG2000,
            "j2k_lossless": JPEG2000Lossless,
        }[syntax]
        kwargs = {"j2k_cr": [5]} if syntax == "j2k" else {}
        ds.compress(uid, frames if n > 1 else frames[0], **kwargs)
    if "PixelData" in ds and ds.file_meta.TransferSyntaxUID.is_encapsulated:
        ds["PixelData"].VR = "OB"
    if palette is not None:
        _add_palette(ds, np.asarray(palette))
    if label_bits_stored is not None:
        ds.BitsStored, ds.HighBit = label_bits_stored, label_bits_stored - 1
    if signed:
        ds.PixelRepresentation = 1
    ds.save_as(path, enforce_file_format=True)
    return path


def _add_palette(ds: Dataset, lut: np.ndarray) -> None:
    """PALETTE COLOR with ``lut`` (N, 3) as the Red/Green/Blue Palette Color LUTs."""
    bits = 16 if lut.dtype == np.uint16 else 8
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for k, colour in enumerate(("Red", "Green", "Blue")):
        # (entries, first index mapped, bits per entry); 8-bit entries still fill 16-bit words
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(lut), 0, bits])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut[:, k].astype("<u2").tobytes())


def write_params(tmp_path: Path, **groups: dict) -> Path:
    """A params file in ``tmp_path`` from the repository's params.yaml, paths into ``tmp_path``.

    ``groups`` override keys per group, e.g. ``ingest={"source": "x"}``.
    """
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["paths"] = {k: str(tmp_path / "out" / v) for k, v in raw["paths"].items()}
    raw["demo"].update(
        patients=3,
        images_per_eye=2,
        oct_height=64,
        oct_width=72,
        fundus_size=96,
        dicom_fraction=0.5,
        workers=1,
    )
    raw["ingest"].update(workers=1)
    raw["preprocess"].update(workers=1, image_size=[32, 32])
    for group, values in groups.items():
        raw[group].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path
