"""Warnings a library raises while decoding a file (pydicom's colour-space and frame-count
notes, ...), caught per file and reported once per kind with a count: never a traceback-style
line per file on the terminal, never a file path or a header value.

A kind is the warning's text up to where file content may start: the first quote that opens
(any of ' " ` and typographic quotes; nothing after it is kept, as no rule over quotes can tell
where a value holding quotes ends), the word a name follows (``profile``, ``name``, ...) or a
path, shown as ``'...'``; only pydicom's messages whose variable parts are DICOM terms
(``'RGB'``, ``'YBR_FULL_422'``) and counts are kept whole. Every count is ``N``; the kind is
prefixed by the library that raised it (from the warning's own source file, inside
site-packages: not the image's path).

The decode libraries' loggers (:data:`LIBRARY_LOGGERS`) go the same way: their records quote
file content (libpng, through imagecodecs, quotes an iCCP profile's free-text name; tifffile
names the file and tag values; Pillow logs tag values). :func:`route_library_logs` takes them
off the terminal: inside :func:`caught` each record is one more kind of that file, outside one
it is logged as its kind (quoted values hidden) on ``retina_vae.libwarn``.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

# Messages shown with their quoted values, whole-text templates whose every quoted slot is
# one of these DICOM terms (no patient data): anchored, so no file content can pass as a term
TERMS = (
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_ICT",
    "YBR_RCT",
    "YBR_PARTIAL_420",
)
_TERM = "'(?:" + "|".join(re.escape(t) for t in sorted(TERMS, key=len, reverse=True)) + ")'"
_FRAMES = (
    "(0028,0008) 'Number of Frames' value of N. The returned data will include these extra "
    "frames and if it's correct then you should update 'Number of Frames' accordingly, "
    "otherwise pass 'allow_excess_frames=False' to return only the first N frames."
)
# pydicom's messages whose only variable parts are a term (TERM) or a count (N), in full
_TEMPLATES = tuple(
    re.compile(
        "^"
        + "".join(
            {"TERM": _TERM, "N": r"\d+"}.get(part, re.escape(part))
            for part in re.split(r"\b(TERM|N)\b", t)
        )
        + "$"
    )
    for t in (
        "The (0028,0004) 'Photometric Interpretation' value is TERM however the encoded "
        "image's codestream contains a JFIF APP marker which indicates it should be TERM",
        "N frames have been found in the encapsulated pixel data, which is larger than the "
        "given " + _FRAMES,
        "The number of bytes of pixel data is sufficient to contain N frames which is larger "
        "than the given " + _FRAMES,
    )
)
# Any character a message may open a quoted value with: ASCII, backtick, typographic, guillemets
_QUOTES = re.compile("['\"`\u00ab\u00b4\u00bb\u2018-\u201f\u2039\u203a]")
# The apostrophe of the library's own English (image's, doesn't): after a word of 3+ letters
# (so never a b'', rb'' repr prefix), before a short ending, then a space or the end
_APOSTROPHE = re.compile(r"(?<![A-Za-z])[A-Za-z]{3,}'(?:s|t|re|ve|ll|d|m)(?= |$)")
# Unquoted free text: a name after these words (libpng's iCCP "profile <name>"), a path
_REPR_PREFIX = re.compile(r"(?<!\w)[bBrRuUfF]{1,2}$")  # b'...', rb'...'
_NAME_AFTER = re.compile(r"\b(?:profile|name|named|file|filename|path|patient)\b", re.I)
_PATH = re.compile(r"[^\s(]*[/\\]")
# libpng's fixed reasons at the end of an iCCP message, kept after the hidden profile name
_REASONS = frozenset(
    {
        "invalid signature",
        "invalid length",
        "too short",
        "tag count too large",
        "invalid rendering intent",
        "intent outside defined range",
        "known incorrect sRGB profile",
        "out-of-date sRGB profile with no signature",
        "PCS illuminant is not D50",
        "invalid embedded Abstract ICC profile",
        "unexpected DeviceLink ICC profile class",
        "unexpected NamedColor ICC profile class",
        "unrecognized ICC profile class",
        "unexpected ICC PCS encoding",
        "invalid ICC profile color space",
        "RGB color space not permitted on grayscale PNG",
        "Gray color space not permitted on RGB PNG",
        "ICC profile tag outside profile",
        "ICC profile tag start not a multiple of 4",
        "length does not match profile",
        "exceeds application limits",
    }
)
_NUMBER = re.compile(r"(?<![\w(,.])\d+(?:\.\d+)?(?![\w,)])")  # not inside a (gggg,eeee) tag
_LIBRARY = re.compile(r"(?:site|dist)-packages[/\\]([A-Za-z_][\w]*)")


# The loggers of the photo decoders (DICOM's pydicom logger is set by dicom_pixels.open_dicom)
LIBRARY_LOGGERS = ("PIL", "imagecodecs", "tifffile")
_NOTED: ContextVar[list[str] | None] = ContextVar("libwarn_noted", default=None)
log = logging.getLogger("retina_vae.libwarn")


def _fixed_text(text: str) -> str:
    """``text`` up to where a library may have put file content: the first quote that is not
    an English apostrophe (nothing after a quote that opens is kept: no rule over quotes can
    tell where a value holding quotes ends), the end of a word that a name follows
    (``profile``, ``name``, ...), or a path. A cut is shown as ``'...'``, then one of libpng's
    fixed :data:`_REASONS` if the text ends with it."""
    apostrophes = {m.start() + m[0].index("'") for m in _APOSTROPHE.finditer(text)}
    quotes = (m.start() for m in _QUOTES.finditer(text) if m.start() not in apostrophes)
    name, path = _NAME_AFTER.search(text), _PATH.search(text)
    cuts = [next(quotes, len(text)), name.end() if name else len(text)]
    cut = min(cuts + [path.start() if path else len(text)])
    if cut == len(text):
        return text
    reason = text.rsplit(": ", 1)[-1]
    kept = _REPR_PREFIX.sub("", text[:cut]).rstrip() + " '...'"
    return f"{kept}: {reason}" if reason in _REASONS else kept


def kind(message: str, filename: str = "", library: str | None = None) -> str:
    """The one-line kind of a warning: a pydicom message of :data:`_TEMPLATES` whole, any other
    cut where file content may start (:func:`_fixed_text`); numbers as N, prefixed by the
    raising library's package name (``library``, else found in ``filename``, the warning's
    source file)."""
    text = " ".join(str(message).split())
    if not any(t.match(text) for t in _TEMPLATES):
        text = _fixed_text(text)
    text = _NUMBER.sub("N", text)
    if library is None:
        found = _LIBRARY.search(filename or "")
        library = found[1] if found else "warning"
    return f"{library}: {text[:300]}"


class _Counted(logging.Handler):
    """A decode library's log record as a kind (:func:`kind`, the record's text never shown):
    one more kind of the :func:`caught` block it is emitted in, else a line on ``log``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = kind(record.getMessage(), library=record.name.split(".")[0])
        except Exception:  # noqa: BLE001 -- a record whose arguments do not fit its format
            text = f"{record.name.split('.')[0]}: a log record that could not be formatted"
        noted = _NOTED.get()
        if noted is not None:
            noted.append(text)
        else:
            log.warning("%s", text)


_HANDLER = _Counted(logging.WARNING)


def route_library_logs() -> None:
    """Send the records of every logger in :data:`LIBRARY_LOGGERS` (warnings and worse; their
    debug lines are dropped) through :class:`_Counted` only: none reaches another handler.
    Idempotent; readers calls it on import, so every process that decodes has it."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if _HANDLER not in logger.handlers:
            logger.addHandler(_HANDLER)
        logger.propagate = False
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


@contextmanager
def caught() -> Iterator[list[str]]:
    """Record every warning raised inside, and every record of the decode libraries' loggers
    (:func:`route_library_logs`); the list yielded is filled, on leaving, with their distinct
    kinds (sorted). Nothing is printed."""
    kinds: list[str] = []
    logged: list[str] = []
    token = _NOTED.set(logged)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield kinds
    finally:
        _NOTED.reset(token)
    kinds.extend(sorted({kind(w.message, w.filename) for w in seen} | set(logged)))


def report(counts: Counter, log: logging.Logger) -> None:
    """One warning line per kind, most common first: ``N files: <kind>``."""
    for text, n in counts.most_common():
        log.warning("%d file%s: %s", n, "" if n == 1 else "s", text)
