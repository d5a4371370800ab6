"""Warnings a library raises while decoding a file (pydicom's colour-space and frame-count
notes, ...), caught per file and reported once per kind with a count: never a traceback-style
line per file on the terminal, never a file path or a header value.

A kind is the warning's text with every quoted value hidden but the DICOM terms that explain it
(``'RGB'``, ``'YBR_FULL_422'``) and every count replaced by ``N``, prefixed by the library that
raised it (from the warning's own source file, inside site-packages: not the image's path).

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

# Quoted values shown as they are: DICOM Photometric Interpretation terms (no patient data)
TERMS = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_ICT",
        "YBR_RCT",
        "YBR_PARTIAL_420",
        "Photometric Interpretation",
        "Number of Frames",
        "Samples per Pixel",
        "Bits Allocated",
        "Bits Stored",
        "Planar Configuration",
    }
)
# A quoted value (not an apostrophe), also b'...' and one whose closing quote is missing (a
# repr cut short): hidden to the end of the text
_QUOTED = re.compile(r"(?<!\w)(?:[bBrRuU]{1,2}(?='))?'(.*?)(?:'(?!\w)|$)|\"(.*?)(?:\"|$)")
_NUMBER = re.compile(r"(?<![\w(,.])\d+(?:\.\d+)?(?![\w,)])")  # not inside a (gggg,eeee) tag
_LIBRARY = re.compile(r"(?:site|dist)-packages[/\\]([A-Za-z_][\w]*)")


# The loggers of the photo decoders (DICOM's pydicom logger is set by readers._open_dicom)
LIBRARY_LOGGERS = ("PIL", "imagecodecs", "tifffile")
_NOTED: ContextVar[list[str] | None] = ContextVar("libwarn_noted", default=None)
log = logging.getLogger("retina_vae.libwarn")


def kind(message: str, filename: str = "", library: str | None = None) -> str:
    """The one-line kind of a warning: quoted values hidden unless in :data:`TERMS`, numbers
    as N, prefixed by the raising library's package name (``library``, else found in
    ``filename``, the warning's source file)."""
    text = " ".join(str(message).split())
    text = _QUOTED.sub(lambda m: m[0] if (m[1] or m[2]) in TERMS else "'...'", text)
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
