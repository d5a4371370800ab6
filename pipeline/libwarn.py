"""Warnings a library raises while decoding a file (pydicom's colour-space and frame-count
notes, ...), caught per file and reported once per kind with a count: never a traceback-style
line per file on the terminal, never a file path or a header value.

A kind is the warning's text with every quoted value hidden but the DICOM terms that explain it
(``'RGB'``, ``'YBR_FULL_422'``) and every count replaced by ``N``, prefixed by the library that
raised it (from the warning's own source file, inside site-packages: not the image's path).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

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
_QUOTED = re.compile(r"(?<!\w)'([^']*)'(?!\w)|\"([^\"]*)\"")  # not an apostrophe
_NUMBER = re.compile(r"(?<![\w(,.])\d+(?:\.\d+)?(?![\w,)])")  # not inside a (gggg,eeee) tag
_LIBRARY = re.compile(r"(?:site|dist)-packages[/\\]([A-Za-z_][\w]*)")


def kind(message: str, filename: str = "") -> str:
    """The one-line kind of a warning: quoted values hidden unless in :data:`TERMS`, numbers
    as N, prefixed by the raising library's package name."""
    text = " ".join(str(message).split())
    text = _QUOTED.sub(lambda m: m[0] if (m[1] or m[2]) in TERMS else "'...'", text)
    text = _NUMBER.sub("N", text)
    library = _LIBRARY.search(filename or "")
    return f"{library[1] if library else 'warning'}: {text[:300]}"


@contextmanager
def caught() -> Iterator[list[str]]:
    """Record every warning raised inside; the list yielded is filled, on leaving, with their
    distinct kinds (sorted). Nothing is printed."""
    kinds: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield kinds
    kinds.extend(sorted({kind(w.message, w.filename) for w in seen}))


def report(counts: Counter, log: logging.Logger) -> None:
    """One warning line per kind, most common first: ``N files: <kind>``."""
    for text, n in counts.most_common():
        log.warning("%d file%s: %s", n, "" if n == 1 else "s", text)
