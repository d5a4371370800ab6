"""Decoding DICOM files (pydicom) for :func:`pipeline.readers.read_image`.

Parsing (with or without file meta and the ``DICM`` preamble), the refusal of burned-in
annotation, and the pixel values as they are meant to be seen: Bits Stored, PALETTE COLOR
looked up, rescale or modality LUT, VOI LUT or window (each frame its own, from an enhanced
image's functional groups), MONOCHROME1 inverted, then scaled to uint8. pydicom's own log
records are kept out of every log (:func:`_quiet_pydicom`). :mod:`pipeline.readers` describes
each decision and holds what photo decoding shares (:class:`~pipeline.readers.BadImage`, the
size and pixel-count checks, the scaling to uint8).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_rescale, apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from pipeline.readers import (
    BadImage,
    Decoded,
    Range,
    check_pixels,
    check_size,
    dicom_suffix,
    normalise_eye,
    to_uint8,
    value_range,
)


def _quiet_pydicom() -> None:
    """Keep pydicom's own log records (a decoder plugin's failure logged with its traceback,
    notes that may quote header values) out of every log, in whichever process decodes: the
    file's one-line BadImage reason says what went wrong. Its warnings are caught per file."""
    logger = logging.getLogger("pydicom")
    logger.setLevel(logging.CRITICAL)
    logger.propagate = False  # its own NullHandler only: nothing reaches the stage's handlers


_quiet_pydicom()  # on import: the stage's process, each worker process, each Ray worker


def open_dicom(path: Path) -> pydicom.Dataset:
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


def open_unmarked(path: Path, not_photo: BadImage) -> pydicom.Dataset:
    """A file without the ``DICM`` preamble that no photo decoder recognised, opened as a DICOM
    dataset without file meta. If it is none: a ``.dcm`` / ``.dicom`` file gets the DICOM
    reason, any other file ``not_photo`` (not an image)."""
    try:
        return open_dicom(path)
    except BadImage:
        if dicom_suffix(path):
            raise
        raise not_photo from None


def read_dicom(
    ds: pydicom.Dataset,
    min_size: int,
    max_pixels: int | None,
    oct_central: bool,
    frames: list[int] | None,
    burned_in: bool,
) -> Decoded:
    """An opened DICOM dataset (:func:`open_dicom`) -> its frames."""
    if not burned_in:
        _refuse_burned_in(ds)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise BadImage("DICOM image without valid Rows/Columns/NumberOfFrames") from None
    check_pixels(cols * rows * n, f"{cols}x{rows}x{n}", max_pixels)
    check_size(cols, rows, min_size)
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
        _check_frame_count(ds, n)
        arr = np.stack([pydicom.pixels.pixel_array(ds, index=i) for i in frames])
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    arr = _stored_bits(arr, bits)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric == "PALETTE COLOR":
        return [(a, (0.0, 255.0)) for a in _palette_rgb(arr, ds)]
    if ds.get("SamplesPerPixel", 1) != 1:  # colour: 8 bits stored or fewer shown over them
        stored = (0.0, 2.0 ** min(bits, 8) - 1)  # whatever the container (8 in 16 allocated)
        return [(a, stored if bits <= 8 or a.dtype == np.uint8 else None) for a in arr]
    return [_grey_frame(a, _frame_header(ds, i)) for a, i in zip(arr, frames, strict=True)]


def _check_frame_count(ds: pydicom.Dataset, n: int) -> None:
    """BadImage when compressed (encapsulated) pixel data holds fewer frames than the header's
    ``n``: pydicom decodes one frame by its index without noticing that later ones are
    missing, where decoding the whole file fails. The frames are counted without decoding
    (pydicom's ``generate_frames``, by the offset tables or the fragments); a layout it
    cannot split is left to the decoder to judge."""
    syntax = ds.file_meta.get("TransferSyntaxUID")  # open_dicom sets one
    if syntax is None or not syntax.is_compressed or "PixelData" not in ds:
        return  # native data: its length is checked against the header by pydicom
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        found = sum(1 for _ in generate_frames(ds.PixelData, number_of_frames=n,
                                               extended_offsets=offsets))  # fmt: skip
    except Exception:  # noqa: BLE001 - an unsplittable layout: the decoder will say
        return
    if found < n:
        raise BadImage(
            f"DICOM pixel data holds {found} of the {n} frames its header names",
            "DICOM pixel data holds fewer frames than its header",
        )


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
    # a VOI's output, values of 8 bits stored or fewer (in any container, through a linear
    # rescale: pydicom returns floats even for slope 1, intercept 0) or an 8-bit modality LUT's
    # span lo..hi; others (more bits) are scaled over the file
    bits = int(view.get("BitsStored") or px.dtype.itemsize * 8)
    narrow = shown.dtype == np.uint8 or (bits <= 8 and not view.get("ModalityLUTSequence"))
    fixed = (lo, hi) if (_has_voi(view) or narrow) and hi > lo else None
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
        whole = value_range(a for a, r in every if r is None)
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
