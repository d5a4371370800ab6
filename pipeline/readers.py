"""Decoding any accepted image file into uint8 frames (Pillow for photos, pydicom for DICOM).

One entry point, :func:`read_image`, used by ingest (validation and hashing), preprocess (both
engines) and ``retina-vae encode``, so every stage sees the same pixels. A bad file raises
:class:`BadImage` with a one-line reason that never quotes a header value (no PHI in reasons).

The decoding itself lives in two modules, one a kind of file: :mod:`pipeline.photo` (Pillow,
tifffile and imagecodecs: pages, orientation, palettes, transparency, full depth) and
:mod:`pipeline.dicom_pixels` (pydicom: Bits Stored, palettes, rescale, VOI, functional groups).
This module holds the entry points and what both share (:class:`BadImage`, :class:`Decoded`,
the size, pixel-count and non-finite checks, the scaling to uint8); the two import those from
here, so :func:`read_image` and :func:`jpeg_draft_size` import them when called, not at import
(no cycle), and modules that only sort eyes (:func:`normalise_eye`) load no decoder library.
Which files of a source are tried at all is :func:`pipeline.manifest.is_candidate`.

Frames come back as (H, W) grayscale or (H, W, 3) RGB uint8 arrays, the right way up, as they
are meant to be seen (README, "Your own data", lists each decision):
- photos: the EXIF/TIFF orientation (all eight, mirrored ones too) is applied first, so sizes,
  hashes and training pixels are of the upright picture; palettes are looked up (a TIFF's
  up to 16-bit indices, its ColorMap's 16-bit entries scaled by their full range); transparent
  pixels (alpha, transparent palette entries, colour keys) are composited onto black; 8-bit
  pixels are kept, 16/32-bit and float pages are scaled from the min..max of the whole file
  (every high-depth page of a multi-page TIFF, so a volume keeps one intensity scale). Pages
  Pillow would cut to 8 bits (16-bit colour PNG and TIFF) are read at full depth, by
  imagecodecs (libpng) and tifffile, as are TIFF pages Pillow cannot open (float64, 16-bit
  grey + alpha), wherever they stand in the file; NaN or infinite values refuse the file.
  A TIFF's reduced-resolution copies (previews, pyramid levels) and masks are skipped: frames
  are numbered over its picture pages. MINISWHITE grey (0 is white) is inverted at every
  depth, as DICOM MONOCHROME1 is.
  Every frame of an animated PNG/WebP and every image of an MPO (stereo pair) is an image, as
  a TIFF page is (an MPO's large thumbnails and an APNG's default image outside the animation
  skipped).
- DICOM: values are cut to Bits Stored (sign-extended when signed) whatever the transfer
  syntax; PALETTE COLOR is looked up to RGB; grey images get rescale slope/intercept (or the
  modality LUT) and the VOI LUT or window (each frame its own from an enhanced image's
  functional groups), MONOCHROME1 is inverted (within the range black..white is taken
  from: a frame's VOI output range, else the whole file's); YBR is converted to RGB;
  non-8-bit results are scaled from the VOI's output range when there is one, else from the
  min..max of the whole file (all frames, also when only some are kept).
- ``draft``: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose upright size
  stays at or above ``draft`` (width, height) -- several times faster than a full decode when
  the target is small. Truncation is still detected: the whole entropy-coded stream is read
  either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import libwarn
from pipeline.errors import UserError

libwarn.route_library_logs()  # the decoders' log records quote file content: counted instead


Range = tuple[float, float]  # (lo, hi): the values shown black..white


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
    ``sizes`` is each of those frames' native upright (width, height) (before any draft
    reduction; pages of a TIFF may differ), ``width``/``height`` the first one's. ``patient_id``
    and ``eye`` come from a DICOM header (raw values: callers pseudonymise, never store them).
    """

    frames: list[tuple[int, np.ndarray]]
    width: int
    height: int
    n_frames: int
    patient_id: str | None = None
    eye: str | None = None
    info: dict = field(default_factory=dict)
    sizes: list[tuple[int, int]] = field(default_factory=list)


def is_dicom(path: Path) -> bool:
    """True for a DICOM Part 10 file (``DICM`` at byte 128), with or without a suffix."""
    if dicom_suffix(path):
        return True
    return _has_preamble(path)


def dicom_suffix(path: Path) -> bool:
    """Whether the file is named as a DICOM file (``.dcm`` / ``.dicom``, any case)."""
    return path.suffix.lower() in (".dcm", ".dicom")


def _has_preamble(path: Path) -> bool:
    """Whether the file has DICOM Part 10's ``DICM`` marker at byte 128."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def normalise_eye(value: object) -> str | None:
    """'R' / 'L' from DICOM laterality or a CSV cell (R, L, OD, OS, right, left); else None."""
    text = str(value or "").strip().upper()
    if text in ("R", "OD", "RIGHT", "RE"):
        return "R"
    if text in ("L", "OS", "LEFT", "LE"):
        return "L"
    return None


def to_uint8(arr: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """uint8 as is; anything else linearly scaled from ``lo..hi`` (default: its own min..max)
    to 0..255. A volume passes the range of the whole file, so every page keeps one scale."""
    if arr.dtype == np.uint8:
        return arr
    _refuse_non_finite([arr])
    arr = arr.astype(np.float64)
    lo = float(np.nanmin(arr)) if lo is None else lo
    hi = float(np.nanmax(arr)) if hi is None else hi
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise BadImage("pixel values are not finite")
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.round((arr - lo) * scale).astype(np.uint8)


def value_range(arrays: Iterable[np.ndarray]) -> Range:
    """(min, max) over several arrays: the one intensity scale of a multi-page file."""
    arrays = list(arrays)
    _refuse_non_finite(arrays)
    lows, highs = zip(*((float(np.nanmin(a)), float(np.nanmax(a))) for a in arrays), strict=True)
    return min(lows), max(highs)


def _refuse_non_finite(arrays: Iterable[np.ndarray]) -> None:
    """Refuse a float image with NaN or infinite values (no grey level means them), counting
    them over all the arrays given (a whole file's pages or frames)."""
    bad = sum(a.size - int(np.count_nonzero(np.isfinite(a))) for a in arrays if a.dtype.kind == "f")
    if bad:
        kind = "non-finite pixel values"
        raise BadImage(f"{bad} {kind} (NaN or infinite)", kind)


def check_size(width: int, height: int, min_size: int, page: int | None = None) -> None:
    """BadImage ("too small") where the image (``page`` of a volume) is below ``min_size``."""
    if min(width, height) < min_size:
        where = "" if page is None else f" (page {page})"
        raise BadImage(
            f"too small: {width}x{height}{where} is below ingest.min_size ({min_size})",
            "too small",
        )


def check_pixels(total: int, detail: str, max_pixels: int | None) -> None:
    """BadImage ("decompression bomb") where a file's ``total`` pixels exceed ``max_pixels``."""
    if max_pixels is not None and total > max_pixels:
        raise BadImage(
            f"decompression bomb: {detail} pixels exceeds ingest.max_pixels ({max_pixels})",
            "decompression bomb",
        )


def jpeg_draft_size(path: str | Path, draft: tuple[int, int]) -> tuple[int, int] | None:
    """The stored (width, height) at which :func:`read_image` with ``draft`` decodes the JPEG
    at ``path`` (the DCT scale it picks); None for any other format (Pillow, header only)."""
    from pipeline import photo  # when called: photo imports this module's shared helpers

    return photo.jpeg_draft_size(path, draft)


def read_image(
    path: str | Path,
    *,
    min_size: int = 1,
    max_pixels: int | None = None,
    draft: tuple[int, int] | None = None,
    oct_central: bool = False,
    frames: list[int] | None = None,
    allow_burned_in: bool = False,
) -> Decoded:
    """Decode ``path`` (photo or DICOM) into uint8 frames; raise :class:`BadImage` if unusable.

    Args:
        min_size: smallest accepted width/height (native pixels).
        max_pixels: largest accepted width*height*frames (decompression-bomb guard).
        draft: (width, height) lower bound for JPEG DCT-scaled decoding; None = full size.
        oct_central: keep only the central frame of a multi-frame file.
        frames: decode exactly these frame indices (overrides ``oct_central``).
        allow_burned_in: keep a DICOM whose header flags burned-in annotation (Burned In
            Annotation YES); by default it is refused ("burned-in annotation: ...").

    A file with DICOM's ``DICM`` preamble is read by pydicom, any other by Pillow, and one that
    Pillow does not recognise as a DICOM dataset without file meta (whatever its suffix).

    Whatever goes wrong with the file is a :class:`BadImage`: the file cannot be read (missing,
    a folder, no permission: "unreadable file (<why>)", no path in it), or its decoder fails
    in any way ("undecodable image (...)": Pillow raises OSError on a truncated stream and
    ValueError, SyntaxError, TypeError ... on some malformed headers).
    """
    # when called, not at import: both decoders import this module's shared helpers
    from pipeline import dicom_pixels, photo

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        dicom = (min_size, max_pixels, oct_central, frames, allow_burned_in)
        if _has_preamble(path):
            return dicom_pixels.read_dicom(dicom_pixels.open_dicom(path), *dicom)
        try:
            return photo.read_photo(path, min_size, max_pixels, draft, oct_central, frames)
        except BadImage as exc:
            if str(exc) != photo.NOT_RECOGNISED:  # a text page is no DICOM either
                raise
            return dicom_pixels.read_dicom(dicom_pixels.open_unmarked(path, exc), *dicom)
    except BadImage:
        raise
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not the decoder's
            raise BadImage(f"unreadable file ({exc.strerror})", "unreadable file") from None
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImage(f"undecodable image ({msg})", "undecodable image") from None
    except Exception as exc:  # noqa: BLE001 -- any other decoder failure on a malformed file
        raise BadImage(f"undecodable image ({type(exc).__name__})", "undecodable image") from None
