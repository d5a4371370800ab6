"""Builders for test inputs: DICOM files of every supported kind, photos, params files.

Everything is made here with pydicom/Pillow (no stored fixtures). pydicom 3 encodes RLE,
JPEG-LS and JPEG 2000 itself; JPEG baseline comes from Pillow, JPEG extended is Pillow's
8-bit stream relabelled SOF1, and JPEG lossless (process 14, SV1) is encoded by the small
reference encoder below (pydicom has no encoder for those three).
"""

from __future__ import annotations

import io
import struct
import tempfile
from pathlib import Path

import imagecodecs
import numpy as np
import yaml
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
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


def jpeg_lossless(img: np.ndarray, precision: int, predictor: int = 1) -> bytes:
    """Encode (H, W) grey or (H, W, 3) RGB as JPEG lossless (process 14; predictor 1 is the
    first-order prediction of DICOM's SV1 syntax) at ``precision`` bits, by libjpeg-turbo
    through imagecodecs (an encoder independent of pydicom's decoders); RGB is coded as is,
    without a colour transform, as PhotometricInterpretation RGB says."""
    rgb = {"colorspace": "RGB", "outcolorspace": "RGB"} if img.ndim == 3 else {}
    return imagecodecs.jpeg8_encode(
        img, bitspersample=precision, lossless=True, predictor=predictor, **rgb
    )


def _jpeg(img: np.ndarray, extended: bool = False) -> bytes:
    """Baseline JPEG (Pillow), relabelled SOF1 for the 8-bit extended process; a uint16 frame
    as 12-bit extended sequential JPEG (process 4, libjpeg-turbo through imagecodecs), the
    values above 12 bits cleared (a 12-bit codestream cannot carry them)."""
    if img.dtype == np.uint16:
        return imagecodecs.jpeg8_encode(img & 0x0FFF, level=95, bitspersample=12)
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

    syntax: explicit | implicit | big_endian | deflated | rle | jpeg | jpeg_extended (12-bit
    for uint16 frames) | jpeg_lossless (SV1) | jpeg_lossless_p7 | jpegls | jpegls_near (error
    2) | j2k | j2k_lossless | htj2k_lossless. ``photometric`` defaults to MONOCHROME2 or RGB.

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
    elif syntax in ("jpeg_lossless", "jpeg_lossless_p7"):  # predictor 1 (SV1) or 7
        predictor = 1 if syntax == "jpeg_lossless" else 7
        ds.PixelData = encapsulate([jpeg_lossless(f, bits, predictor) for f in frames])
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1 if predictor == 1 else JPEGLossless
    elif syntax == "htj2k_lossless":  # no pydicom encoder: OpenJPH through imagecodecs
        ds.PixelData = encapsulate([imagecodecs.htj2k_encode(f, reversible=True) for f in frames])
        ds.file_meta.TransferSyntaxUID = HTJ2KLossless
    elif syntax == "deflated":  # the whole dataset zlib-deflated on writing
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif syntax in ("rle", "jpegls", "jpegls_near", "j2k", "j2k_lossless"):
        uid = {
            "rle": RLELossless,
            "jpegls": JPEGLSLossless,
            "jpegls_near": JPEGLSNearLossless,
            "j2k": JPEG2000,
            "j2k_lossless": JPEG2000Lossless,
        }[syntax]
        kwargs = {"j2k": {"j2k_cr": [5]}, "jpegls_near": {"jls_error": 2}}.get(syntax, {})
        ds.compress(uid, frames if n > 1 else frames[0], **kwargs)
    if "PixelData" in ds and ds.file_meta.TransferSyntaxUID.is_encapsulated:
        ds["PixelData"].VR = "OB"
    if palette is not None:
        _add_palette(ds, np.asarray(palette))
    if label_bits_stored is not None:
        ds.BitsStored, ds.HighBit = label_bits_stored, label_bits_stored - 1
    if signed:
        ds.PixelRepresentation = 1
    if syntax == "big_endian":  # retired (PS3.5 A.3) but in old archives: values byte-swapped
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        ds.PixelData = frames.astype(frames.dtype.newbyteorder(">")).tobytes()
        dcmwrite(path, ds, little_endian=False, implicit_vr=False, enforce_file_format=True)
        return path
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


def dvc_temp_copy(repo: Path) -> Path:
    """An empty ``<repo>/.dvc/tmp/exps/tmpXXXXXXXX``, made as DVC 3 makes the temporary copy
    in which ``dvc exp run --temp`` and a queued experiment run their stages
    (``mkdtemp(dir=<repo>/.dvc/tmp/exps)``, dvc/repo/experiments/executor/local.py)."""
    parent = repo / ".dvc" / "tmp" / "exps"
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=parent))
