"""Decoding photo files (JPEG, MPO, PNG, TIFF, BMP, WebP) for :func:`pipeline.readers.read_image`.

Pillow opens and decodes them; pages Pillow would cut to 8 bits or cannot open at all (16-bit
colour PNG and TIFF, float64 or 16-bit grey + alpha TIFF pages, 16-bit palette indices) are
read at full depth, a PNG by imagecodecs (libpng), a TIFF page by tifffile. Here: the pages of a
file (TIFF pages, animation frames, MPO images; previews, pyramid levels and masks skipped),
their EXIF/TIFF orientation, palettes, transparency composited onto black, MINISWHITE grey,
the whole-file intensity range of high-depth pages and JPEG draft (DCT-scaled) decoding.
:mod:`pipeline.readers` describes each decision and holds what DICOM decoding shares
(:class:`~pipeline.readers.BadImage`, the size and pixel-count checks, the scaling to uint8).
"""

from __future__ import annotations

import contextlib
import re
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from pipeline.readers import BadImage, Decoded, check_pixels, check_size, to_uint8, value_range

PHOTO_FORMATS = {"JPEG", "MPO", "PNG", "TIFF", "BMP", "WEBP"}

HIGH_DEPTH = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}  # scaled over the file to uint8
# Pages Pillow would cut to their high byte (it has no 16-bit colour modes) are read at full
# depth instead: a 16-bit PNG by imagecodecs (libpng), such a TIFF page by tifffile.
DEEP = "deep"  # the _Page.mode of such a page; its values are scaled over the file too
# TIFF PhotometricInterpretation read at full depth: grey (0 is white, 0 is black), RGB
MINISWHITE, MINISBLACK, RGB, PALETTE = 0, 1, 2, 3
DEEP_PHOTOMETRIC = (MINISWHITE, MINISBLACK, RGB)
# ... and those tifffile's pages may have: a palette too (16-bit indices: Pillow cannot open them)
# TIFF Compression values Pillow knows but its libtiff is built without (WebP): tifffile's
TIFFFILE_COMPRESSION = {50001}
SIGNED = 2  # TIFF SampleFormat of signed integers
TIFFFILE_PHOTOMETRIC = (*DEEP_PHOTOMETRIC, PALETTE)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOT_RECOGNISED = "not an image (format not recognised)"  # then tried as DICOM without meta
TEXT_PROBE = 1024  # bytes looked at to tell a text file (an HTML page ...) from binary data
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f\x7f]")  # never in a text file
# Image formats no decoder here reads, known by their signature so that they are refused as
# such ("unsupported image format HEIF"), not as "not an image": HEIF/HEIC (phones' default:
# an ISO BMFF "ftyp" box of one of these brands) and JPEG XL (codestream or container)
NO_DECODER = ("HEIF", "JPEG XL")
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")
# a quoted value in a Pillow plugin's reason (repr() of file bytes: a chunk type ...), hidden
_QUOTED = re.compile(r"""[bB]?'[^']*'|[bB]?"[^"]*"|[bB]?'.*|[bB]?".*""")
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
    broken EXIF block says nothing reliable about the pixels, which may still be fine). A PNG
    is loaded first, outside that: Pillow's getexif decodes it (an eXIf chunk may follow the
    image data), and a decode error swallowed there would leave the page half-loaded, failing
    later with an unrelated TypeError instead of its reason (a truncated file)."""
    if im.format == "PNG" and "exif" not in im.info:
        im.load()
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
            fmt = _signature_format(path)
            if fmt in NO_DECODER:  # an image, of a format none of the decoders reads
                raise BadImage(f"unsupported image format {fmt}") from None
            if fmt is not None:  # a photo by its signature that Pillow cannot open: broken
                why = _pillow_refusal(fp, path, fmt)
                raise BadImage(f"undecodable image ({fmt}: {why})", "undecodable image") from None
            text = _text_kind(path)
            if text is not None:  # a page a failed download saved, never a DICOM dataset
                raise BadImage(f"not an image (text: {text})", "not an image") from None
            raise BadImage(NOT_RECOGNISED, "not an image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(
                "decompression bomb: exceeds Pillow's pixel limit", "decompression bomb"
            ) from None
    if im.format not in PHOTO_FORMATS:
        im.close()
        raise BadImage(f"unsupported image format {im.format}")
    return im


@contextlib.contextmanager
def _pillow_guard(max_pixels: int | None) -> Iterator[None]:
    """Pillow's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) while a file is
    read: off where ``max_pixels`` (ingest.max_pixels) is given, which is then the one limit,
    checked on every page's size from the header before anything is decoded (read_photo), so
    that Pillow's fixed default (89,478,485) refuses no image the user's limit allows; Pillow's
    own where it is None. Pillow checks at open and again as it decodes (a TIFF's tiles)."""
    if max_pixels is None:
        yield
        return
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _text_kind(path: Path) -> str | None:
    """What a file that is text is (an HTML or XML page, JSON, a Git LFS pointer, other
    text), from its first bytes: UTF-8 without control characters other than tab, line and
    page breaks (a DICOM dataset, even without its preamble, starts with binary tags and
    lengths: NUL bytes); None for any other file."""
    with open(path, "rb") as f:
        head = f.read(TEXT_PROBE)
    if not head or _CONTROL.search(head):
        return None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:  # only a multi-byte character cut at the probe's end
        if len(head) < TEXT_PROBE or exc.start < len(head) - 3:
            return None
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith((b"<!doctype html", b"<html")) or b"<html" in start[:512]:
        return "an HTML page, as a failed download saves"
    if start.startswith(b"<"):
        return "an XML document, as a failed download saves"
    if start.startswith((b"{", b"[")):
        return "JSON, as a failed download saves"
    if start.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file it stands for"
    return "a text file"


def _signature_format(path: Path) -> str | None:
    """The format a file's first bytes (its signature, magic number) name: a photo format
    (JPEG, PNG, WEBP) or one of :data:`NO_DECODER` (HEIF, JPEG XL); None for any other file
    (TIFF is told by :func:`_is_tiff`)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS:
        return "HEIF"
    if head.startswith((b"\xff\x0a", b"\0\0\0\x0cJXL \r\n\x87\n")):
        return "JPEG XL"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(PNG_SIGNATURE):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def _pillow_refusal(fp: BinaryIO, path: Path, fmt: str) -> str:
    """Why Pillow's ``fmt`` plugin refuses the file ``fp`` (its header is broken, cut short or
    of a kind it cannot decode: a 12-bit JPEG, a PNG chunk whose CRC does not match): the
    plugin's own one-line reason, which names structure (bit depths, chunk types), never
    header values; "header cut short or malformed" where it fails without one."""
    factory = Image.OPEN[fmt][0]
    fp.seek(0)
    try:
        factory(fp, path.name).close()
    except SyntaxError as exc:  # Pillow's plugins raise SyntaxError with a reason ...
        cause = exc.__cause__ or exc.__context__
        if str(exc) and not isinstance(cause, (struct.error, EOFError, IndexError)):
            return _QUOTED.sub("'...'", str(exc).splitlines()[0])  # no file content
    except Exception:  # noqa: BLE001 -- ... or struct.error, EOFError, IndexError: no reason
        pass
    return "header cut short or malformed"


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
    check_pixels(n * size[0] * size[1], f"{size[0]}x{size[1]}x{n}", max_pixels)


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
    (Pillow un-premultiplies it, and compositing again is off by one); signed 8-bit samples
    (Pillow takes their bytes as unsigned: -1 is white, 0 black), scaled over the file as
    other signed pages; a compression Pillow's libtiff has no codec for
    (:data:`TIFFFILE_COMPRESSION`)."""
    if im.format != "TIFF":
        return False
    bits = im.tag_v2.get(258, 1)
    bits = bits if isinstance(bits, tuple) else (bits,)
    photometric = im.tag_v2.get(262)
    extras = im.tag_v2.get(338, ())
    if im.tag_v2.get(259, 1) in TIFFFILE_COMPRESSION:
        return True  # Pillow's libtiff has no codec for it: "decoder error" on every page
    if photometric in DEEP_PHOTOMETRIC and 1 in (
        extras if isinstance(extras, tuple) else (extras,)
    ):
        return True  # associated alpha: Pillow un-premultiplies it, tifffile keeps the picture
    fmt = im.tag_v2.get(339, 1)
    fmt = max(fmt if isinstance(fmt, tuple) else (fmt,))
    if photometric in DEEP_PHOTOMETRIC and fmt == SIGNED and max(bits) <= 8:
        return True  # signed 8-bit: Pillow reads the bytes as unsigned, -1 as 255 (white)
    if max(bits) <= 8 or photometric not in DEEP_PHOTOMETRIC:
        return False
    if photometric == MINISWHITE or im.mode not in HIGH_DEPTH:
        return True
    return not _mode_holds(im.mode, max(bits), fmt)


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
        read at full depth; reduced-resolution copies and masks skipped as in :func:`_pages`.
        BadImage for a TIFF without any page (a header alone, a first-page offset past its
        end: a download cut short), which is no file of previews only."""
        n = len(self.tiff().pages)
        if n == 0:
            kind = "undecodable image"
            raise BadImage(f"{kind} (TIFF without any readable page)", kind)
        pages = (self.page(i) for i in range(n))
        return [p for p in pages if p is not None]

    def page(self, index: int) -> _Page | None:
        """TIFF page ``index`` as tifffile reads it (headers only); None for a reduced-
        resolution copy or a mask. BadImage beyond Pillow's pixel limit, as Pillow refuses (none
        while :func:`_pillow_guard` has lifted it for ``max_pixels``, checked over all pages)."""
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
    """The stored (width, height) at which :func:`~pipeline.readers.read_image` with ``draft``
    decodes the JPEG at ``path`` (the DCT scale it picks); None for any other format."""
    with Image.open(path) as im:  # header only
        if im.format not in ("JPEG", "MPO"):
            return None
        _draft(im, draft, _orientation(im))
        return im.size


def _draft(im: Image.Image, draft: tuple[int, int], orientation: int) -> None:
    """Smallest DCT scale whose UPRIGHT size stays >= ``draft`` (width, height): the bound is
    turned with the picture, since a sideways-stored photo's width is its upright height."""
    im.draft(im.mode, draft if orientation < 5 else (draft[1], draft[0]))


def read_photo(
    path: Path,
    min_size: int,
    max_pixels: int | None,
    draft: tuple[int, int] | None,
    oct_central: bool,
    frames: list[int] | None,
) -> Decoded:
    """A photo file -> its frames (:func:`pipeline.readers.read_image`'s arguments): every page
    checked for size and pixel count from its header first, the kept ones decoded upright and
    high-depth ones scaled to uint8 over the whole file."""
    with (
        _pillow_guard(max_pixels),
        _open_photo(path) as im,
        _FullDepth(path, "TIFF" if im is None else im.format) as deep,
    ):
        pages = _pages(im, path, deep, max_pixels) if im is not None else deep.pages()
        if not pages:
            kind = "no full-resolution image"
            raise BadImage(f"{kind} (only reduced-resolution or mask pages)", kind)
        n = len(pages)
        check_pixels(sum(p.width * p.height for p in pages), _pixels_text(pages), max_pixels)
        for k, p in enumerate(pages):  # every page of a volume is an image
            check_size(p.width, p.height, min_size, k if n > 1 else None)
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
    return value_range(a for a in have.values() if a.dtype != np.uint8)
