"""Decoding any accepted image file into uint8 frames (Pillow for photos, pydicom for DICOM).

One entry point, :func:`read_image`, used by ingest (validation and hashing), preprocess and
``retina-vae encode``, so every stage sees the same pixels. A bad file raises :class:`BadImage`
with a one-line reason that never quotes a header value (no PHI in reasons).

Frames come back as (H, W) grayscale or (H, W, 3) RGB uint8 arrays:
- 8-bit photos keep their pixels; 16-bit and float images are scaled from their own min..max.
- DICOM: rescale slope/intercept and the VOI LUT or window are applied, MONOCHROME1 is
  inverted, YBR is converted to RGB; non-8-bit results are scaled from the file's min..max
  (over all frames, so a volume keeps one intensity scale).
- ``draft``: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose size stays at or
  above ``draft`` (width, height) -- several times faster than a full decode when the target is
  small. Truncation is still detected: the whole entropy-coded stream is read either way.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale, apply_voi_lut

from pipeline.errors import UserError

PHOTO_FORMATS = {"JPEG", "MPO", "PNG", "TIFF", "BMP", "WEBP"}
# Files that are never images and are skipped (not quarantined) when walking a source folder.
SIDECAR_SUFFIXES = {".csv", ".tsv", ".txt", ".md", ".json", ".yaml", ".yml", ".xml", ".ini"}
DICOMDIR = "DICOMDIR"


class BadImage(UserError):
    """A file that cannot be used as an image; ``str()`` is a one-line reason, ``kind`` the
    class of reason that ingest's report counts (``"too small"`` for ``"too small: 20x20 is
    below ..."``; the reason itself when it holds no detail)."""

    def __init__(self, reason: str, kind: str | None = None) -> None:
        super().__init__(reason)
        self.kind = reason if kind is None else kind

    def __reduce__(self) -> tuple:
        return type(self), (str(self), self.kind)  # survives a worker process's pickling


@dataclass
class Decoded:
    """Frames of one file plus what ingest needs from its header.

    ``frames`` maps the frame index in the file to (H, W) or (H, W, 3) uint8 pixels;
    ``width``/``height`` are the native size (before any draft reduction). ``patient_id`` and
    ``eye`` come from a DICOM header (raw values: callers pseudonymise, never store them).
    """

    frames: list[tuple[int, np.ndarray]]
    width: int
    height: int
    n_frames: int
    patient_id: str | None = None
    eye: str | None = None
    info: dict = field(default_factory=dict)


def is_dicom(path: Path) -> bool:
    """True for a DICOM Part 10 file (``DICM`` at byte 128), with or without a suffix."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def is_candidate(path: str | Path) -> bool:
    """Whether a file found in a source folder should be tried as an image at all."""
    name = os.path.basename(path)  # os.path, not pathlib: no interned string per file name
    return not (
        name.startswith(".")
        or name.upper() == DICOMDIR
        or name.lower() in ("thumbs.db", "desktop.ini")
        or os.path.splitext(name)[1].lower() in SIDECAR_SUFFIXES
    )


def normalise_eye(value: object) -> str | None:
    """'R' / 'L' from DICOM laterality or a CSV cell (R, L, OD, OS, right, left); else None."""
    text = str(value or "").strip().upper()
    if text in ("R", "OD", "RIGHT", "RE"):
        return "R"
    if text in ("L", "OS", "LEFT", "LE"):
        return "L"
    return None


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """uint8 as is; anything else linearly scaled from its min..max to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise BadImage("pixel values are not finite")
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.round((arr - lo) * scale).astype(np.uint8)


def _check_size(width: int, height: int, frames: int, min_size: int, max_pixels: int | None):
    if max_pixels is not None and width * height * frames > max_pixels:
        raise BadImage(
            f"decompression bomb: {width}x{height}x{frames} pixels exceeds ingest.max_pixels "
            f"({max_pixels})",
            "decompression bomb",
        )
    if min(width, height) < min_size:
        raise BadImage(
            f"too small: {width}x{height} is below ingest.min_size ({min_size})", "too small"
        )


def _photo_array(im: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> (H, W) or (H, W, 3) uint8."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return to_uint8(np.asarray(im))
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode in ("1", "LA", "La"):
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))  # P, RGBA, CMYK, YCbCr, ...


def _read_photo(path: Path, min_size: int, max_pixels: int | None, draft, oct_central, frames):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except UnidentifiedImageError:
            raise BadImage("not an image (format not recognised)", "not an image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(
                "decompression bomb: exceeds Pillow's pixel limit", "decompression bomb"
            ) from None
    with im:
        if im.format not in PHOTO_FORMATS:
            raise BadImage(f"unsupported image format {im.format}")
        width, height = im.size
        n = getattr(im, "n_frames", 1) if im.format == "TIFF" else 1
        _check_size(width, height, n, min_size, max_pixels)
        if draft is not None and im.format in ("JPEG", "MPO"):
            im.draft(im.mode, draft)  # smallest DCT scale still >= draft (width, height)
        if frames is None:  # a multi-page TIFF is a volume, like a multi-frame DICOM
            frames = [n // 2] if (oct_central and n > 1) else list(range(n))
        out = []
        for i in frames:
            if i >= n:
                raise BadImage(f"frame {i} not in file ({n} frames)", "frame not in file")
            im.seek(i)
            out.append((i, _photo_array(im)))
    # decoded_size: the size after any draft reduction (the DCT scale actually decoded)
    return Decoded(out, width, height, n, info={"format": im.format, "decoded_size": im.size})


def _read_dicom(path: Path, min_size: int, max_pixels: int | None, oct_central, frames) -> Decoded:
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings become our reasons
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError):
        raise BadImage(
            "unreadable DICOM (header could not be parsed)", "unreadable DICOM"
        ) from None
    if any("End of file" in str(w.message) for w in caught):
        raise BadImage("truncated DICOM (file ends inside an element)", "truncated DICOM")
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise BadImage("DICOM without pixel data (not an image object)", "DICOM without pixel data")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise BadImage("DICOM image without valid Rows/Columns/NumberOfFrames") from None
    _check_size(cols, rows, n, min_size, max_pixels)
    if frames is None:
        frames = [n // 2] if (oct_central and n > 1) else list(range(n))
    if any(i >= n for i in frames):
        raise BadImage(f"frame index not in file ({n} frames)", "frame index not in file")
    try:
        if frames == list(range(n)):
            arr = ds.pixel_array  # (F, H, W[, 3]) when F > 1, YBR -> RGB
            arr = arr[None] if n == 1 else arr
        else:
            arr = np.stack([pydicom.pixels.pixel_array(ds, index=i) for i in frames])
        mono = ds.get("SamplesPerPixel", 1) == 1
        raw8 = arr.dtype == np.uint8
        if mono:
            arr = apply_rescale(arr, ds)  # modality LUT / rescale slope and intercept
            arr = apply_voi_lut(arr, ds)  # VOI LUT or window centre/width
            if ds.get("PhotometricInterpretation") == "MONOCHROME1":
                # 0 means white in MONOCHROME1; mirroring within min..max keeps uint8 exact
                wide = arr.astype(np.float64)
                arr = wide.max() + wide.min() - wide
                arr = (
                    arr.astype(np.uint8)
                    if raw8 and arr.dtype != np.uint8 and (arr.min() >= 0 and arr.max() <= 255)
                    else arr
                )
        unchanged = raw8 and arr.dtype == np.uint8
        arr = arr if unchanged else to_uint8(np.asarray(arr))
    except BadImage:
        raise
    except Exception as exc:  # any decoder failure: corrupt stream, missing plugin, ...
        raise BadImage(
            f"undecodable DICOM pixel data ({type(exc).__name__})", "undecodable DICOM pixel data"
        ) from None
    if arr.shape[0] != len(frames) or arr.shape[1:3] != (rows, cols):
        raise BadImage(
            f"DICOM pixel data does not match its header ({rows}x{cols}x{n})",
            "DICOM pixel data does not match its header",
        )
    eye = normalise_eye(ds.get("ImageLaterality") or ds.get("Laterality"))
    pid = str(ds.get("PatientID", "") or "").strip() or None
    info = {"format": "DICOM", "sop_class": str(ds.get("SOPClassUID", "")), "mono": mono}
    return Decoded(
        [(i, a) for i, a in zip(frames, arr, strict=True)], cols, rows, n, pid, eye, info
    )


def read_image(
    path: str | Path,
    *,
    min_size: int = 1,
    max_pixels: int | None = None,
    draft: tuple[int, int] | None = None,
    oct_central: bool = False,
    frames: list[int] | None = None,
) -> Decoded:
    """Decode ``path`` (photo or DICOM) into uint8 frames; raise :class:`BadImage` if unusable.

    Args:
        min_size: smallest accepted width/height (native pixels).
        max_pixels: largest accepted width*height*frames (decompression-bomb guard).
        draft: (width, height) lower bound for JPEG DCT-scaled decoding; None = full size.
        oct_central: keep only the central frame of a multi-frame file.
        frames: decode exactly these frame indices (overrides ``oct_central``).

    Whatever goes wrong with the file is a :class:`BadImage`: the file cannot be read (missing,
    a folder, no permission: "unreadable file (<why>)", no path in it), or its decoder fails
    in any way ("undecodable image (...)": Pillow raises OSError on a truncated stream and
    ValueError, SyntaxError, TypeError ... on some malformed headers).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        if is_dicom(path):
            return _read_dicom(path, min_size, max_pixels, oct_central, frames)
        return _read_photo(path, min_size, max_pixels, draft, oct_central, frames)
    except BadImage:
        raise
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not the decoder's
            raise BadImage(f"unreadable file ({exc.strerror})", "unreadable file") from None
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImage(f"undecodable image ({msg})", "undecodable image") from None
    except Exception as exc:  # noqa: BLE001 -- any other decoder failure on a malformed file
        raise BadImage(f"undecodable image ({type(exc).__name__})", "undecodable image") from None
