"""Decoding any accepted image file into uint8 frames (Pillow for photos, pydicom for DICOM).

One entry point, :func:`read_image`, used by ingest (validation and hashing), preprocess (both
engines) and ``retina-vae encode``, so every stage sees the same pixels. A bad file raises
:class:`BadImage` with a one-line reason that never quotes a header value (no PHI in reasons).

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

import contextlib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

import imagecodecs
import numpy as np
import pydicom
import tifffile
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_rescale, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline import libwarn
from pipeline.errors import UserError

PHOTO_FORMATS = {"JPEG", "MPO", "PNG", "TIFF", "BMP", "WEBP"}
# Files that are never images and are skipped (not quarantined) when walking a source folder.
SIDECAR_SUFFIXES = {".csv", ".tsv", ".txt", ".md", ".json", ".yaml", ".yml", ".xml", ".ini"}
DICOMDIR = "DICOMDIR"
libwarn.route_library_logs()  # the decoders' log records quote file content: counted instead


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
    if _dicom_suffix(path):
        return True
    return _has_preamble(path)


def _dicom_suffix(path: Path) -> bool:
    return path.suffix.lower() in (".dcm", ".dicom")


def _has_preamble(path: Path) -> bool:
    """Whether the file has DICOM Part 10's ``DICM`` marker at byte 128."""
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


def _value_range(arrays: Iterable[np.ndarray]) -> tuple[float, float]:
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


def _check_size(width: int, height: int, min_size: int, page: int | None = None) -> None:
    if min(width, height) < min_size:
        where = "" if page is None else f" (page {page})"
        raise BadImage(
            f"too small: {width}x{height}{where} is below ingest.min_size ({min_size})",
            "too small",
        )


def _check_pixels(total: int, detail: str, max_pixels: int | None) -> None:
    if max_pixels is not None and total > max_pixels:
        raise BadImage(
            f"decompression bomb: {detail} pixels exceeds ingest.max_pixels ({max_pixels})",
            "decompression bomb",
        )


# ----------------------------------------------------------------------------- photos

HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}  # scaled over the file to uint8
# Pages Pillow would cut to their high byte (it has no 16-bit colour modes) are read at full
# depth instead: a 16-bit PNG by imagecodecs (libpng), such a TIFF page by tifffile.
DEEP = "deep"  # the _Page.mode of such a page; its values are scaled over the file too
# TIFF PhotometricInterpretation read at full depth: grey (0 is white, 0 is black), RGB
MINISWHITE, MINISBLACK, RGB, PALETTE = 0, 1, 2, 3
DEEP_PHOTOMETRIC = (MINISWHITE, MINISBLACK, RGB)
# ... and those tifffile's pages may have: a palette too (16-bit indices: Pillow cannot open them)
TIFFFILE_PHOTOMETRIC = (*DEEP_PHOTOMETRIC, PALETTE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIFF_SIGNATURES = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF
# TIFF pages that are no picture of the eye: NewSubfileType (tag 254) bit 0 marks a reduced-
# resolution copy of another page (preview, thumbnail, pyramid level), bit 2 a transparency
# mask; the old SubfileType (tag 255) 2 a reduced-resolution copy. They are skipped.
NOT_A_PICTURE = 0b101
# What Pillow raises setting up a TIFF page whose format it does not know: SyntaxError for
# its sample layout (float64, 16-bit grey+alpha, 16-bit palette), KeyError for its compression
UNKNOWN_TO_PILLOW = (SyntaxError, KeyError)
ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
ORIENTATION = 0x0112  # EXIF/TIFF tag: how the stored pixels must be turned to stand upright
# EXIF orientation -> the numpy transform that undoes it on (H, W[, C]) pixels (EXIF 2.32,
# 4.6.4 A): 2 mirrored, 3 upside down, 4 flipped, 5-8 stored transposed (width and height swap)
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),  # stored turned 90 degrees anticlockwise: turn it clockwise
    7: lambda a: a.swapaxes(0, 1)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}


def _orientation(im: Image.Image) -> int:
    """The page's EXIF (or TIFF, XMP) orientation, 1..8; 1 when absent or unreadable (a
    broken EXIF block says nothing reliable about the pixels, which may still be fine)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Corrupt EXIF data": the page's decode may still work
            value = int(_exif(im).get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 -- Pillow raises many kinds on malformed EXIF
        return 1
    return value if value in _UPRIGHT else 1


def _exif(im: Image.Image) -> Image.Exif:
    """The current page's EXIF. An MPO frame's from its own APP1 only, empty without one:
    Pillow keeps the previous frame's entries after seeking to a frame that has none."""
    if im.format != "MPO":
        return im.getexif()
    exif = Image.Exif()
    if im.info.get("exif"):
        exif.load(im.info["exif"])
    return exif


def _upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W[, C]) stored pixels -> the picture as it should be seen (EXIF orientation)."""
    turn = _UPRIGHT.get(orientation)
    return arr if turn is None else np.ascontiguousarray(turn(arr))


def _on_black(im: Image.Image, bits: int = 8) -> np.ndarray:
    """A page with transparency (alpha channel, transparent palette entries or colour key)
    composited onto black, the background of a fundus photo: (H, W) or (H, W, 3) uint8.
    ``bits``: a PNG's bit depth (a 2- or 4-bit grey colour key is in the file's units)."""
    key = _low_bit_grey_key(im, bits)
    if key is not None:
        px = np.asarray(im)
        return np.where(px == key, 0, px).astype(np.uint8)
    grey = im.mode in ("1", "L", "LA", "La")
    rgba = np.asarray(im.convert("LA" if grey else "RGBA"), dtype=np.uint16)
    colour, alpha = rgba[..., :-1], rgba[..., -1:]
    out = ((colour * alpha + 127) // 255).astype(np.uint8)  # colour * alpha/255, rounded
    return out[..., 0] if grey else out


def _low_bit_grey_key(im: Image.Image, bits: int) -> int | None:
    """A 2- or 4-bit (``bits``) grey PNG's tRNS colour key on Pillow's 0..255 scale of its
    samples (it scales the samples, x85 or x17, but keeps the key in the file's units); None
    for any other page."""
    key = im.info.get("transparency")
    if im.format != "PNG" or im.mode != "L" or not isinstance(key, int) or bits not in (2, 4):
        return None
    return key * 255 // (2**bits - 1)


def _photo_array(im: Image.Image, bits: int = 8) -> np.ndarray:
    """A Pillow page -> (H, W) or (H, W, 3): uint8, or the page's own 16/32-bit or float values
    for a high-depth grey page (the caller scales those over the whole file). Not for a
    :data:`DEEP` page (16-bit colour), which Pillow would cut to its high byte."""
    if im.mode in HIGH_DEPTH:
        return np.asarray(im)
    if im.mode in ALPHA_MODES or "transparency" in im.info:
        return _on_black(im, bits)
    if im.mode in ("L", "RGB"):
        return np.asarray(im)
    if im.mode == "1":
        return np.asarray(im.convert("L"))
    return np.asarray(im.convert("RGB"))  # P (palette), CMYK, YCbCr, LAB, HSV


@contextlib.contextmanager
def _open_photo(path: Path) -> Iterator[Image.Image | None]:
    """The file opened by Pillow, closed on leaving; None for a TIFF Pillow does not recognise
    (a float64 or a 16-bit grey+alpha page, ...): tifffile reads all of that one.

    Pillow is given an open file, not the path: from a path it memory-maps an uncompressed
    single-strip page, and recent versions then read a page stored transposed (orientation
    5-8) with its upright width and height, a scrambled picture; from a file it decodes the
    page at its stored size (then turns it upright itself, see :func:`_page_pixels`)."""
    with open(path, "rb") as fp:
        im = _pillow_open(fp, path)
        with im if im is not None else contextlib.nullcontext():
            yield im


def _pillow_open(fp: BinaryIO, path: Path) -> Image.Image | None:
    """Pillow's ``Image.open`` of the open file ``fp`` (:func:`_open_photo`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(fp)
        except UnidentifiedImageError:
            if _is_tiff(path):
                return None
            raise BadImage("not an image (format not recognised)", "not an image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(
                "decompression bomb: exceeds Pillow's pixel limit", "decompression bomb"
            ) from None
    if im.format not in PHOTO_FORMATS:
        im.close()
        raise BadImage(f"unsupported image format {im.format}")
    return im


def _is_tiff(path: Path) -> bool:
    """Whether the file starts as a TIFF does (classic or BigTIFF, either byte order)."""
    with open(path, "rb") as f:
        return f.read(4) in TIFF_SIGNATURES


class _Page(NamedTuple):
    """One image of a photo file: its upright (width, height), EXIF orientation, Pillow mode
    (:data:`DEEP`: read at full depth outside Pillow) and the index of its page in the file."""

    width: int
    height: int
    orientation: int
    mode: str
    index: int

    @classmethod
    def stored(cls, width: int, height: int, orientation: int, mode: str, index: int) -> _Page:
        """The page whose pixels are stored ``width`` x ``height``: orientations 5-8 are stored
        transposed (TIFF 6.0 tag 274, EXIF 4.6.4 A), so upright its width and height swap."""
        w, h = (height, width) if orientation >= 5 else (width, height)
        return cls(w, h, orientation, mode, index)


def _pages(im: Image.Image, path: Path, deep: _FullDepth, max_pixels: int | None) -> list[_Page]:
    """Every image of the file, upright sizes (headers only): each page of a TIFF, each frame
    of an animated PNG or WebP, each image of an MPO (stereo pairs). Reduced-resolution
    copies (TIFF previews and pyramid levels, MPO large thumbnails) and TIFF masks are
    skipped: no picture of the eye. A TIFF page whose format Pillow does not know (float64,
    16-bit grey+alpha, ...), wherever it stands, is tifffile's (``deep``). BadImage before
    any frame is looked at where the frame count the header declares (an APNG's acTL, an MPO's
    index) cannot be held by the file or exceeds ``max_pixels`` (:func:`_check_declared_frames`)."""
    if im.format == "TIFF":
        return _tiff_pages(im, deep)
    n = getattr(im, "n_frames", 1)
    _check_declared_frames(n, im.size, path, max_pixels)
    png16 = im.format == "PNG" and _png_bit_depth(path) > 8
    if png16 and n > 1:  # libpng reads the default image only, Pillow cuts to 8 bits
        kind = "animated 16-bit PNG"
        raise BadImage(f"{kind} ({n} frames): its frames cannot be read at full depth", kind)
    if im.format in ("PNG", "WEBP"):  # animation frames share the canvas, mode and EXIF; not
        # seeking decodes them. An APNG's default image before its first frame control (Pillow:
        # info "default_image") is a still for other viewers, not a frame (APNG spec)
        first = 1 if im.format == "PNG" and im.info.get("default_image") else 0
        return [_page(im, png16)._replace(index=i) for i in range(first, n)]
    pages = []
    for i in range(n):
        im.seek(i)
        if not _is_copy(im, i):
            pages.append(_page(im, False)._replace(index=i))
    return pages


def _check_declared_frames(
    n: int, size: tuple[int, int], path: Path, max_pixels: int | None
) -> None:
    """Refuse a file whose header declares ``n`` frames of ``size`` (width, height) that it
    cannot hold (every frame takes a chunk of 8 bytes at least: its count is then damaged or
    crafted) or whose declared pixels exceed ``max_pixels``, before any frame is read."""
    if n > max(path.stat().st_size // 8, 1):
        kind = "frame count beyond the file"
        raise BadImage(f"{kind}: {n} frames declared, more than the file can hold", kind)
    _check_pixels(n * size[0] * size[1], f"{size[0]}x{size[1]}x{n}", max_pixels)


def _tiff_pages(im: Image.Image, deep: _FullDepth) -> list[_Page]:
    """The picture pages of a TIFF Pillow opens, each decided on its own: read by Pillow, or
    by tifffile where Pillow would cut it to 8 bits (:func:`_deep_tiff`) or does not know its
    format (:data:`UNKNOWN_TO_PILLOW` when it sets the page up); previews and masks skipped."""
    try:
        n = im.n_frames  # sets every page up
    except UNKNOWN_TO_PILLOW:  # a page Pillow does not know: tifffile counts them
        n = len(deep.tiff().pages)
    pages = []
    for i in range(n):
        try:
            im.seek(i)
        except UNKNOWN_TO_PILLOW:
            page = deep.page(i)
            pages += [page] if page is not None else []
            continue
        if not _is_copy(im, i):
            pages.append(_page(im, _deep_tiff(im))._replace(index=i))
    return pages


def _page(im: Image.Image, deep: bool) -> _Page:
    """The current page of ``im`` (its index left 0)."""
    return _Page.stored(*_stored_size(im), _orientation(im), DEEP if deep else im.mode, 0)


def _is_copy(im: Image.Image, i: int) -> bool:
    """Whether page ``i`` (the current one) is a reduced-resolution copy or a mask: a TIFF's
    by its (New)SubfileType, an MPO's by its MP Type (CIPA DC-007 'Large Thumbnail')."""
    if im.format == "TIFF":
        return _not_a_picture(im.tag_v2.get(254, 0), im.tag_v2.get(255, 1))
    if im.format == "MPO":
        entries = getattr(im, "mpinfo", {}).get(0xB002) or []
        kind = entries[i].get("Attribute", {}).get("MPType", "") if i < len(entries) else ""
        return str(kind).startswith("Large Thumbnail")
    return False


def _not_a_picture(new_subfile_type: int, subfile_type: int) -> bool:
    """Whether a TIFF page is a reduced-resolution copy or a mask, from its NewSubfileType
    (tag 254) and old SubfileType (tag 255) values."""
    return bool(int(new_subfile_type) & NOT_A_PICTURE) or int(subfile_type) == 2


def _png_bit_depth(path: Path) -> int:
    """A PNG's bits per sample, from its IHDR chunk (the first one, at byte 8)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise BadImage("undecodable image (PNG without an IHDR header)", "undecodable image")
    return head[24]


def _deep_tiff(im: Image.Image) -> bool:
    """Whether the current TIFF page, which Pillow opens, is read by tifffile instead: more
    than 8 bits per sample (BitsPerSample) in a grey or RGB page Pillow opens in an 8-bit mode
    (RGB48, RGBA64, ...: it would keep only the high byte of each sample), in a MINISWHITE
    page (Pillow inverts only 8 bits or fewer: deeper ones would come out as negatives), or
    in a mode that cannot hold the stored type (:func:`_mode_holds`: unsigned 32-bit in "I");
    or with associated (premultiplied) alpha at any depth, the picture on black as stored
    (Pillow un-premultiplies it, and compositing again is off by one)."""
    if im.format != "TIFF":
        return False
    bits = im.tag_v2.get(258, 1)
    bits = bits if isinstance(bits, tuple) else (bits,)
    photometric = im.tag_v2.get(262)
    extras = im.tag_v2.get(338, ())
    if photometric in DEEP_PHOTOMETRIC and 1 in (
        extras if isinstance(extras, tuple) else (extras,)
    ):
        return True  # associated alpha: Pillow un-premultiplies it, tifffile keeps the picture
    if max(bits) <= 8 or photometric not in DEEP_PHOTOMETRIC:
        return False
    if photometric == MINISWHITE or im.mode not in HIGH_DEPTH:
        return True
    fmt = im.tag_v2.get(339, 1)
    return not _mode_holds(im.mode, max(bits), max(fmt if isinstance(fmt, tuple) else (fmt,)))


def _mode_holds(mode: str, bits: int, sample_format: int) -> bool:
    """Whether Pillow's high-depth ``mode`` holds every value of ``bits``-bit samples of TIFF
    SampleFormat ``sample_format`` (1 unsigned, 2 signed, 3 float): "I" is int32 (an unsigned
    32-bit sample >= 2^31 would wrap), "F" float32, "I;16*" unsigned 16-bit."""
    if mode == "I":
        return (sample_format == 2 and bits <= 32) or (sample_format == 1 and bits <= 31)
    if mode == "F":
        return sample_format == 3 and bits <= 32
    return mode.startswith("I;16") and sample_format == 1 and bits <= 16


class _FullDepth:
    """Full-depth decoding of the pages Pillow would cut to 8 bits: a 16-bit PNG through
    imagecodecs (libpng), a TIFF page through tifffile (the file opened once, on first use).
    Values come as stored, before orientation: (H, W) or (H, W, 3), of the file's own dtype,
    or float64 where transparency was composited onto black."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.format = path, fmt
        self._tif: tifffile.TiffFile | None = None

    def tiff(self) -> tifffile.TiffFile:
        if self._tif is None:  # its log records are counted kinds (libwarn), never shown
            self._tif = tifffile.TiffFile(self.path)
        return self._tif

    def pages(self) -> list[_Page]:
        """Every picture page of a TIFF that Pillow does not open at all (headers only), all
        read at full depth; reduced-resolution copies and masks skipped as in :func:`_pages`."""
        pages = (self.page(i) for i in range(len(self.tiff().pages)))
        return [p for p in pages if p is not None]

    def page(self, index: int) -> _Page | None:
        """TIFF page ``index`` as tifffile reads it (headers only); None for a reduced-
        resolution copy or a mask. BadImage beyond Pillow's pixel limit, as Pillow refuses."""
        page = self.tiff().pages[index]
        tags = page.tags
        if _not_a_picture(tags.valueof(254, 0), tags.valueof(255, 1)):
            return None
        turn = int(tags.valueof(ORIENTATION, 1))
        turn = turn if turn in _UPRIGHT else 1
        w, h = page.imagewidth, page.imagelength
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            raise BadImage("decompression bomb: exceeds Pillow's pixel limit", "decompression bomb")
        return _Page.stored(w, h, turn, DEEP, index)

    def __enter__(self) -> _FullDepth:
        return self

    def __exit__(self, *exc) -> None:
        if self._tif is not None:
            self._tif.close()

    def values(self, index: int) -> np.ndarray:
        if self.format == "PNG":
            return _png_values(self.path.read_bytes())
        return _tiff_values(self.tiff().pages[index])


def _png_values(data: bytes) -> np.ndarray:
    """A 16-bit PNG's samples (libpng, through imagecodecs): grey or RGB, with an alpha channel
    or a tRNS colour key (libpng turns it into alpha) composited onto black."""
    arr = imagecodecs.png_decode(data)  # (H, W) or (H, W, 1..4) uint16
    arr = arr[..., None] if arr.ndim == 2 else arr
    colour = 3 if arr.shape[-1] >= 3 else 1
    alpha = arr[..., colour] if arr.shape[-1] > colour else None
    return _deep_colour(arr[..., :colour], alpha, associated=False)


def _tiff_values(page: tifffile.TiffPage) -> np.ndarray:
    """A grey, RGB or palette TIFF page's samples at full depth (tifffile), 2..7-bit ones
    scaled to 0..255 (:func:`_low_bits_to_8`), MINISWHITE grey inverted (:func:`_min_is_white`),
    a palette looked up (:func:`_tiff_palette`); the first alpha extra sample (ExtraSamples 1
    associated, 2 unassociated) composited onto black, other extras dropped. BadImage for any
    other kind of page."""
    arr = page.asarray()
    if arr.dtype.kind not in "buif":
        kind = "unsupported TIFF page"
        raise BadImage(f"{kind} ({arr.dtype.name} samples)", kind)
    if page.axes.startswith("S"):  # planar configuration 2: one plane per sample
        arr = np.moveaxis(arr, 0, -1)
    arr = arr[..., None] if arr.ndim == 2 else arr
    colour = 3 if page.photometric == 2 else 1
    if page.photometric not in TIFFFILE_PHOTOMETRIC or arr.ndim != 3 or arr.shape[-1] < colour:
        what = getattr(page.photometric, "name", page.photometric)
        kind = "unsupported TIFF page"
        raise BadImage(f"{kind} ({page.bitspersample}-bit {what})", kind)
    extras = list(page.extrasamples)
    alpha = next((i for i, e in enumerate(extras) if e in (1, 2)), None)
    bits = page.bitspersample
    if arr.dtype == np.uint8 and 1 < bits < 8 and page.photometric != PALETTE:
        arr, bits = _low_bits_to_8(arr, bits), 8  # as Pillow shows them (and DICOM's)
    shown = arr[..., :colour]
    if page.photometric == MINISWHITE:
        shown = _min_is_white(shown, bits)
    elif page.photometric == PALETTE:
        shown = _tiff_palette(shown[..., 0], page.colormap)
    if alpha is None:
        return _deep_colour(shown, None, False)
    return _deep_colour(shown, arr[..., colour + alpha], extras[alpha] == 1)


def _low_bits_to_8(values: np.ndarray, bits: int) -> np.ndarray:
    """Samples of 2..7 ``bits`` (uint8, 0..2^bits-1) scaled to 0..255 by their full range,
    as Pillow does (a 4-bit 15 is 255): same shape, uint8."""
    return np.round(values * (255.0 / (2**bits - 1))).astype(np.uint8)


def _tiff_palette(indices: np.ndarray, colormap: np.ndarray | None) -> np.ndarray:
    """(H, W) palette indices (any depth up to 16 bits) -> (H, W, 3) uint8 through the TIFF
    ColorMap (3, 2^BitsPerSample) of 16-bit entries (TIFF 6.0), scaled by their full range
    (65535 -> 255) as a DICOM palette's are: a palette names colours, it is never stretched."""
    if colormap is None or colormap.ndim != 2 or colormap.shape[0] != 3:
        raise BadImage("TIFF palette page without a ColorMap", "TIFF palette without a ColorMap")
    if indices.dtype.kind not in "bu" or int(indices.max(initial=0)) >= colormap.shape[1]:
        kind = "TIFF palette index not in its ColorMap"
        raise BadImage(f"{kind} ({colormap.shape[1]} entries)", kind)
    rgb = np.moveaxis(colormap[:, indices.astype(np.intp)], 0, -1)
    return np.round(rgb * (255.0 / 65535)).astype(np.uint8)


def _min_is_white(values: np.ndarray, bits: int) -> np.ndarray:
    """MINISWHITE grey samples (TIFF 6.0: the lowest value is white) turned to the usual
    black-is-lowest, inverted within their range as a DICOM MONOCHROME1 image is: integers
    within what ``bits`` bits hold (unsigned 0..2^bits-1, signed -2^(bits-1)..2^(bits-1)-1;
    8-bit ones as Pillow inverts them, 255 - v, kept uint8), floats within their own finite
    min..max. Same shape; 1-bit (bool) negated; deeper values come as float64."""
    if values.dtype.kind == "b":
        return ~values
    if values.dtype.kind == "u":
        lo, hi = 0.0, 2.0**bits - 1
    elif values.dtype.kind == "i":
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if values.dtype == np.uint8 and bits == 8:
        return 255 - values
    return lo + hi - values.astype(np.float64)


def _deep_colour(colour: np.ndarray, alpha: np.ndarray | None, associated: bool) -> np.ndarray:
    """(H, W, 1 or 3) samples -> (H, W) or (H, W, 3), composited onto black by ``alpha`` (full
    scale: the dtype's maximum, 1.0 for floats): unassociated alpha multiplies the colour;
    associated (premultiplied) colour already is the picture on black. 8-bit stays uint8
    (rounded, as Pillow's pages are), deeper values come as float64."""
    if alpha is not None and not associated:
        full = np.iinfo(alpha.dtype).max if alpha.dtype.kind in "iu" else 1.0
        mixed = colour * (alpha[..., None].astype(np.float64) / full)
        colour = np.round(mixed).astype(np.uint8) if colour.dtype == np.uint8 else mixed
    return colour[..., 0] if colour.shape[-1] == 1 else colour


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as stored. A TIFF's from its tags: recent Pillow turns a TIFF page
    upright itself while loading it, and reports that size before."""
    if im.format == "TIFF":
        return int(im.tag_v2.get(256, im.size[0])), int(im.tag_v2.get(257, im.size[1]))
    return im.size


def jpeg_draft_size(path: str | Path, draft: tuple[int, int]) -> tuple[int, int] | None:
    """The stored (width, height) at which :func:`read_image` with ``draft`` decodes the JPEG
    at ``path`` (the DCT scale it picks); None for any other format."""
    with Image.open(path) as im:  # header only
        if im.format not in ("JPEG", "MPO"):
            return None
        _draft(im, draft, _orientation(im))
        return im.size


def _draft(im: Image.Image, draft: tuple[int, int], orientation: int) -> None:
    """Smallest DCT scale whose UPRIGHT size stays >= ``draft`` (width, height): the bound is
    turned with the picture, since a sideways-stored photo's width is its upright height."""
    im.draft(im.mode, draft if orientation < 5 else (draft[1], draft[0]))


def _read_photo(path: Path, min_size: int, max_pixels: int | None, draft, oct_central, frames):
    with _open_photo(path) as im, _FullDepth(path, "TIFF" if im is None else im.format) as deep:
        pages = _pages(im, path, deep, max_pixels) if im is not None else deep.pages()
        if not pages:
            kind = "no full-resolution image"
            raise BadImage(f"{kind} (only reduced-resolution or mask pages)", kind)
        n = len(pages)
        _check_pixels(sum(p.width * p.height for p in pages), _pixels_text(pages), max_pixels)
        for k, p in enumerate(pages):  # every page of a volume is an image
            _check_size(p.width, p.height, min_size, k if n > 1 else None)
        if frames is None:  # a multi-page file is a volume, like a multi-frame DICOM
            frames = [n // 2] if (oct_central and n > 1) else list(range(n))
        out = []
        for k in frames:
            if k >= n:
                raise BadImage(f"frame {k} not in file ({n} frames)", "frame not in file")
            out.append((k, _page_pixels(im, deep, pages[k], draft)))
        # the stored size after any draft (the DCT scale decoded); None without Pillow
        decoded_size = None if im is None else im.size
        if any(a.dtype != np.uint8 for _, a in out):
            lo, hi = _photo_range(im, deep, pages, out)
            out = [(k, to_uint8(a, lo, hi)) for k, a in out]
    sizes = [pages[k][:2] for k, _ in out]
    info = {"format": deep.format, "decoded_size": decoded_size}
    first = sizes[0] if sizes else pages[0][:2]
    return Decoded(out, *first, n_frames=n, sizes=sizes, info=info)


def _page_pixels(im: Image.Image, deep: _FullDepth, page: _Page, draft) -> np.ndarray:
    """One page, upright: (H, W) or (H, W, 3) uint8, or its high-depth values."""
    if page.mode == DEEP:
        return _upright(deep.values(page.index), page.orientation)
    im.seek(page.index)
    drafted = draft is not None and im.format in ("JPEG", "MPO")
    if drafted:
        im.decoderconfig = ()  # an MPO seek keeps the last frame's DCT scale: draft anew
        _draft(im, draft, page.orientation)
    bits = _png_bit_depth(deep.path) if im.format == "PNG" else 8  # a PNG's IHDR bit depth
    px = _photo_array(im, bits)  # loads the page
    # orientation read after loading: where Pillow turned the page itself (TIFF, in recent
    # versions) it has dropped the tag, and the page is not turned twice
    px = _upright(px, _orientation(im))
    # never a scrambled page; a drafted one at the DCT-scaled size, turned as its header says
    if drafted:
        page = _Page.stored(*_stored_size(im), page.orientation, page.mode, page.index)
    w, h = page.width, page.height
    if px.shape[:2] != (h, w):
        raise BadImage(
            f"undecodable image (page decoded as {px.shape[1]}x{px.shape[0]}, "
            f"its header says {w}x{h})",
            "undecodable image",
        )
    return px


def _pixels_text(pages: list[_Page]) -> str:
    """The pixel count of a file's pages for the decompression-bomb reason: WxHxN, or the
    total where pages differ in size."""
    w, h = pages[0][:2]
    if all(p[:2] == (w, h) for p in pages):
        return f"{w}x{h}x{len(pages)}"
    return f"{len(pages)} pages totalling {sum(p.width * p.height for p in pages)}"


def _photo_range(
    im: Image.Image, deep: _FullDepth, pages: list[_Page], out: list
) -> tuple[float, float]:
    """min..max over every high-depth page of the file, so a dim page of a volume stays dim."""
    have = {k: a for k, a in out if a.dtype != np.uint8}
    for k, page in enumerate(pages):
        if k in have:
            continue
        if page.mode == DEEP:
            have[k] = deep.values(page.index)
        elif page.mode in HIGH_DEPTH:
            im.seek(page.index)
            have[k] = np.asarray(im)
    return _value_range(a for a in have.values() if a.dtype != np.uint8)


# ----------------------------------------------------------------------------- DICOM


def _quiet_pydicom() -> None:
    """Keep pydicom's own log records (a decoder plugin's failure logged with its traceback,
    notes that may quote header values) out of every log, in whichever process decodes: the
    file's one-line BadImage reason says what went wrong. Its warnings are caught per file."""
    logger = logging.getLogger("pydicom")
    logger.setLevel(logging.CRITICAL)
    logger.propagate = False  # its own NullHandler only: nothing reaches the stage's handlers


_quiet_pydicom()  # on import: the stage's process, each worker process, each Ray worker


def _open_dicom(path: Path) -> pydicom.Dataset:
    """``path`` parsed by pydicom (header and pixel data element, not yet decoded); BadImage
    when it is no usable DICOM (unparseable, truncated, without pixel data)."""
    _quiet_pydicom()  # again: a library (pydicom.config.debug, a logging setup) may reset it
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
    if "TransferSyntaxUID" not in ds.file_meta:
        _set_transfer_syntax(ds)
    return ds


def _set_transfer_syntax(ds: pydicom.Dataset) -> None:
    """A dataset without file meta (no preamble, an older export or raw dump): its transfer
    syntax is the encoding pydicom found it in (implicit VR little endian, the default, else
    explicit VR little or big endian). Compressed pixel data cannot be told apart this way:
    BadImage."""
    if ds["PixelData" if "PixelData" in ds else "FloatPixelData"].is_undefined_length:
        raise BadImage(
            "DICOM without a transfer syntax (no file meta) and compressed pixel data",
            "DICOM without a transfer syntax",
        )
    implicit, little = ds.original_encoding
    if little is False:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        ds.file_meta.TransferSyntaxUID = (
            ExplicitVRLittleEndian if implicit is False else ImplicitVRLittleEndian
        )


def _open_unmarked(path: Path, not_photo: BadImage) -> pydicom.Dataset:
    """A file without the ``DICM`` preamble that no photo decoder recognised, opened as a DICOM
    dataset without file meta. If it is none: a ``.dcm`` / ``.dicom`` file gets the DICOM
    reason, any other file ``not_photo`` (not an image)."""
    try:
        return _open_dicom(path)
    except BadImage:
        if _dicom_suffix(path):
            raise
        raise not_photo from None


def _read_dicom(
    ds: pydicom.Dataset, min_size: int, max_pixels: int | None, oct_central, frames, burned_in: bool
) -> Decoded:
    """An opened DICOM dataset (:func:`_open_dicom`) -> its frames."""
    if not burned_in:
        _refuse_burned_in(ds)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise BadImage("DICOM image without valid Rows/Columns/NumberOfFrames") from None
    _check_pixels(cols * rows * n, f"{cols}x{rows}x{n}", max_pixels)
    _check_size(cols, rows, min_size)
    if frames is None:
        frames = [n // 2] if (oct_central and n > 1) else list(range(n))
    if any(i >= n for i in frames):
        raise BadImage(f"frame index not in file ({n} frames)", "frame index not in file")
    try:
        arr = _dicom_uint8(ds, frames, n)  # (F, H, W[, 3])
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
    info = {"format": "DICOM", "sop_class": str(ds.get("SOPClassUID", "")), "mono": arr.ndim == 3}
    out = [(i, a) for i, a in zip(frames, arr, strict=True)]
    sizes = [(cols, rows)] * len(out)
    return Decoded(out, cols, rows, n, pid, eye, info, sizes)


Range = tuple[float, float]
# The grey pixel transforms (PS3.3 C.11.1 Modality LUT, C.11.2 VOI LUT) by the functional group
# that carries them in an enhanced / multi-frame image (PS3.3 C.7.6.16.2.9 Pixel Value
# Transformation, C.7.6.16.2.10 Frame VOI LUT). A frame's own Per-frame Functional Groups item
# overrides the Shared one, which overrides the top-level attributes.
_TRANSFORM_GROUPS = {
    "PixelValueTransformationSequence": (
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "ModalityLUTSequence",
    ),
    "FrameVOILUTSequence": ("WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence"),
}
_VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # PS3.3 C.11.2.1.3; absent: LINEAR
_IMAGE_PIXEL = ("PhotometricInterpretation", "BitsStored", "BitsAllocated", "PixelRepresentation")


def _refuse_burned_in(ds: pydicom.Dataset) -> None:
    """BadImage for an image its header flags as carrying burned-in annotation (Burned In
    Annotation (0028,0301) YES, PS3.3 C.7.6.1.1.7): text that may identify the patient is part
    of the pixels, which would reach the arrays, MLflow grids and the map's thumbnails."""
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise BadImage(
            "burned-in annotation: Burned In Annotation (0028,0301) is YES, the pixels may show "
            "patient text (ingest.allow_burned_in_annotation: true keeps such files)",
            "burned-in annotation",
        )


def _dicom_values(ds: pydicom.Dataset, frames: Iterable[int], n: int) -> list:
    """The listed frames as they are meant to be seen, each as (values, range): (H, W) or
    (H, W, 3) values, uint8 or the display values (16-bit, rescaled, windowed), and the
    (lo, hi) that is black..white for them, or None where the caller scales over the file.

    Stored values are cut to Bits Stored first (whatever the transfer syntax), then: a palette
    is looked up (PALETTE COLOR -> RGB); grey images get the modality rescale or LUT, the VOI
    LUT or window (each frame its own, from the functional groups of an enhanced image), and
    MONOCHROME1 is inverted within the range those give (a frame without one is inverted by
    :func:`_dicom_uint8`, over the whole file); YBR comes from pydicom already converted to
    RGB."""
    frames = list(frames)
    if frames == list(range(n)):
        arr = ds.pixel_array  # (F, H, W[, 3]) when F > 1, YBR -> RGB
        arr = arr[None] if n == 1 else arr
    else:
        arr = np.stack([pydicom.pixels.pixel_array(ds, index=i) for i in frames])
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    arr = _stored_bits(arr, bits)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":
        return [(a, (0.0, 255.0)) for a in _palette_rgb(arr, ds)]
    if ds.get("SamplesPerPixel", 1) != 1:  # colour: 8-bit or fewer shown over Bits Stored
        stored = (0.0, 2.0 ** min(bits, 8) - 1)
        return [(a, stored if a.dtype == np.uint8 else None) for a in arr]
    return [_grey_frame(a, _frame_header(ds, i)) for a, i in zip(arr, frames, strict=True)]


def _grey_frame(px: np.ndarray, view: pydicom.Dataset) -> tuple[np.ndarray, Range | None]:
    """One grey frame's stored values (H, W) through its modality and VOI transforms (pydicom's
    ``apply_rescale`` and ``apply_voi_lut`` on the frame's header ``view``), with the range
    shown black..white (a VOI's output range; for values still of 8 bits or fewer, the range
    their Bits Stored or 8-bit LUT allows: 0..63 for 6-bit, 0..1 for 1-bit), MONOCHROME1
    inverted within it; else None, the values left as they are (scaled, and a MONOCHROME1
    frame inverted, over the whole file by :func:`_dicom_uint8`: each frame's own rescaled
    range would invert frames of one volume differently)."""
    lo, hi = _display_range(view)
    shown = apply_voi_lut(apply_rescale(px, view), view)
    # a VOI's output, or values still of 8 bits or fewer (stored, or an 8-bit modality LUT's),
    # span lo..hi; others (rescaled, more bits) are scaled over the file
    fixed = (lo, hi) if (_has_voi(view) or shown.dtype == np.uint8) and hi > lo else None
    if fixed is not None and _inverted(view):  # the lowest value is white
        flipped = lo + hi - shown.astype(np.float64)
        exact = shown.dtype == np.uint8 and (lo, hi) == (0, 255)
        shown = flipped.astype(np.uint8) if exact else flipped
    return shown, fixed


def _inverted(ds: pydicom.Dataset) -> bool:
    """Whether the grey image is MONOCHROME1 (its lowest value is white)."""
    return str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"


def _frame_header(ds: pydicom.Dataset, index: int) -> pydicom.Dataset:
    """The header frame ``index`` is shown by: a small Dataset (for pydicom's ``apply_*``) of
    the Image Pixel attributes and the modality / VOI transforms, each group of those taken
    from the frame's Per-frame Functional Groups item, else the Shared one, else the top
    level. Empty elements count as absent."""
    view = pydicom.Dataset()
    view.file_meta = ds.file_meta  # a LUT's byte order
    for keyword in _IMAGE_PIXEL + sum(_TRANSFORM_GROUPS.values(), ()):
        if keyword in ds:
            view.add(ds[keyword])
    shared, per_frame = "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"
    for groups, i in ((shared, 0), (per_frame, index)):
        level = _item(ds.get(groups), i)
        for sequence, keywords in _TRANSFORM_GROUPS.items():
            item = _item(level.get(sequence) if level is not None else None, 0)
            if item is None:
                continue
            for keyword in keywords:  # the group is replaced as a whole
                if keyword in view:
                    del view[keyword]
                if keyword in item:
                    view.add(item[keyword])
    for elem in list(view):
        if elem.is_empty:
            del view[elem.tag]
    _drop_unusable_voi(view)
    return view


def _drop_unusable_voi(view: pydicom.Dataset) -> None:
    """Remove from a frame's header a VOI that cannot be applied, so the frame is shown as one
    without it (the VOI only chooses what is black and white): an unknown VOI LUT Function
    is LINEAR, its default; a window (the first, as pydicom applies) whose centre or width is
    not a finite number or whose width is below PS3.3 C.11.2.1.2's minimum for its function
    (>= 1 for LINEAR, > 0 for LINEAR_EXACT and SIGMOID); a VOI LUT without descriptor or data,
    or whose entries are not 8 or 10-16 bits (PS3.3 C.8.11.3.1.5)."""
    function = str(view.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function not in _VOI_FUNCTIONS:
        view.pop("VOILUTFunction", None)
        function = "LINEAR"
    width, centre = _first_number(view, "WindowWidth"), _first_number(view, "WindowCenter")
    usable = width is not None and (width >= 1 if function == "LINEAR" else width > 0)
    if centre is None or not usable:
        for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
            view.pop(keyword, None)
    luts = view.get("VOILUTSequence")
    if luts and not _usable_lut(luts[0]):
        del view.VOILUTSequence


def _first_number(ds: pydicom.Dataset, keyword: str) -> float | None:
    """The first value of a numeric element as a finite float; None if absent or not one."""
    value = ds.get(keyword)
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _usable_lut(item: pydicom.Dataset) -> bool:
    """Whether pydicom can apply this VOI LUT item: a 3-value descriptor with 8 or 10-16 bit
    entries and LUT data."""
    descriptor = item.get("LUTDescriptor")
    try:
        bits = int(descriptor[2])
    except (TypeError, ValueError, IndexError):
        return False
    return (bits == 8 or 10 <= bits <= 16) and bool(item.get("LUTData"))


def _item(sequence: object, index: int) -> pydicom.Dataset | None:
    """Item ``index`` of a sequence value, or None (absent, empty or too short)."""
    if not isinstance(sequence, Sequence) or index >= len(sequence):
        return None
    return sequence[index]


def _dicom_uint8(ds: pydicom.Dataset, frames: list[int], n: int) -> np.ndarray:
    """The listed frames as (F, H, W[, 3]) uint8: each frame's display values scaled from the
    range that is black..white for them, or, where there is none, from the min..max of every
    such frame of the file (all frames, also when only some are kept); a MONOCHROME1 frame
    of the latter kind is inverted within that same whole-file range, as a viewer does."""
    shown, whole = _dicom_values(ds, frames, n), (0.0, 0.0)
    if any(r is None for _, r in shown):
        every = shown if sorted(frames) == list(range(n)) else _dicom_values(ds, range(n), n)
        whole = _value_range(a for a, r in every if r is None)
    flip = _inverted(ds) and ds.get("SamplesPerPixel", 1) == 1
    return np.stack([_scaled(a, whole, flip) if r is None else _scaled(a, r) for a, r in shown])


def _scaled(values: np.ndarray, shown: Range, invert: bool = False) -> np.ndarray:
    """``values`` scaled from ``shown`` (lo, hi) to 0..255 uint8 (``invert``: hi black, lo
    white); 8-bit values already on 0..255 are kept as they are."""
    if values.dtype == np.uint8 and shown == (0, 255) and not invert:
        return values
    values = values.astype(np.float64)
    return to_uint8(shown[0] + shown[1] - values if invert else values, *shown)


def _has_voi(ds: pydicom.Dataset) -> bool:
    """Whether pydicom's ``apply_voi_lut`` transforms this grey image (VOI LUT or window)."""
    grey = ds.get("SamplesPerPixel", 1) == 1 and ds.get("PhotometricInterpretation") in (
        "MONOCHROME1",
        "MONOCHROME2",
    )
    window = "WindowCenter" in ds and "WindowWidth" in ds
    return grey and (bool(ds.get("VOILUTSequence")) or window)


def _palette_rgb(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Palette indices (F, H, W) -> (F, H, W, 3) uint8 through the Palette Color LUTs
    (pydicom's ``apply_color_lut``, segmented LUTs too). Entries are scaled by their nominal
    depth's full range (a palette names colours, not a data range: never min..max); an alpha
    LUT is composited onto black."""
    lut = apply_color_lut(arr, ds)  # (F, H, W, 3 or 4): 8-bit entries may come in uint16
    full = 2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1
    full = full if lut.max(initial=0) <= full else 65535  # 16-bit entries labelled 8-bit
    colour = lut[..., :3].astype(np.float64)
    if lut.shape[-1] == 4:
        colour *= lut[..., 3:] / full
    return np.round(colour * (255.0 / full)).astype(np.uint8)


def _stored_bits(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """Integer pixel values cut to their low ``bits_stored`` bits, sign-extended when signed.

    Bits above Bits Stored may hold anything (overlays, junk from the modality). pydicom clears
    them for native, RLE and JPEG data but returns JPEG-LS and JPEG 2000 values as the
    codestream holds them, so a stream encoded at 16-bit precision keeps them: cut here,
    for every syntax alike."""
    width = arr.dtype.itemsize * 8
    if arr.dtype.kind not in "iu" or not 0 < bits_stored < width:
        return arr
    shift = width - bits_stored
    if arr.dtype.kind == "i":
        return (arr << shift) >> shift  # arithmetic shift back: sign-extended from the top bit
    return arr & ((1 << bits_stored) - 1)


def _display_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The (lowest, highest) value a grey image can take after its modality and VOI
    transforms (the range a MONOCHROME1 image is inverted within, and a VOI's output range):
    the VOI LUT's entries, the modality LUT's, or the Bits Stored range through rescale slope
    and intercept (the output range pydicom's windowing maps to)."""
    voi = ds.get("VOILUTSequence")
    modality = ds.get("ModalityLUTSequence")
    if voi:
        return 0.0, float(2 ** int(voi[0].LUTDescriptor[2]) - 1)
    if modality:
        return 0.0, float(2 ** int(modality[0].LUTDescriptor[2]) - 1)
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        lo, hi = 0.0, 2.0**bits - 1
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        slope, intercept = float(slope), float(intercept)
        lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
    return lo, hi


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
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file")
        dicom = (min_size, max_pixels, oct_central, frames, allow_burned_in)
        if _has_preamble(path):
            return _read_dicom(_open_dicom(path), *dicom)
        try:
            return _read_photo(path, min_size, max_pixels, draft, oct_central, frames)
        except BadImage as exc:
            if exc.kind != "not an image":
                raise
            return _read_dicom(_open_unmarked(path, exc), *dicom)
    except BadImage:
        raise
    except OSError as exc:
        if exc.errno is not None:  # the file system's error, not the decoder's
            raise BadImage(f"unreadable file ({exc.strerror})", "unreadable file") from None
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadImage(f"undecodable image ({msg})", "undecodable image") from None
    except Exception as exc:  # noqa: BLE001 -- any other decoder failure on a malformed file
        raise BadImage(f"undecodable image ({type(exc).__name__})", "undecodable image") from None
