"""The ingest manifest contract: what ingest writes and preprocess and evaluate read.

``paths.manifest`` holds one row per image or frame (columns :data:`MANIFEST_COLUMNS`). Its
``source`` is a path relative to :func:`source_root`, or for an ``.npz`` source the row
``{split}_images[i]`` of that file (:func:`npz_source`, read back by :func:`npz_row`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import UserError
from pipeline.params import Params, external_path, shown_path

MANIFEST_COLUMNS = [
    "image_id",
    "source",
    "frame",
    "modality",
    "label",
    "severity",  # a number from the labels CSV's optional severity column (else null)
    "subject_id",
    "eye",
    "width",
    "height",
    "content_hash",
    "split",
]


def source_root(params: Params) -> Path:
    """The folder (or .npz file) that manifest ``source`` paths are relative to: ``paths.demo``,
    or ``ingest.source`` (a relative one at the repository root: :func:`external_path`)."""
    if params.ingest.source == "demo":
        return Path(params.paths.demo)
    return external_path(params.ingest.source)


def source_shown(params: Params) -> str:
    """:func:`source_root` for a message: as the user wrote it (and what it resolved to)."""
    if params.ingest.source == "demo":
        return params.paths.demo
    return shown_path(params.ingest.source)


def labels_path(params: Params) -> Path | None:
    """The label sheet ``ingest.labels`` (a relative one at the repository root), or None."""
    return external_path(params.ingest.labels) if params.ingest.labels else None


# Files that are never images and are skipped (not quarantined) when walking a source folder.
SIDECAR_SUFFIXES = {".csv", ".tsv", ".txt", ".md", ".json", ".yaml", ".yml", ".xml", ".ini"}
DICOMDIR = "DICOMDIR"


def is_candidate(path: str | Path) -> bool:
    """Whether a file found in a source folder should be tried as an image at all; ``path``
    relative to that folder. Nothing inside a hidden folder is: ``.git/`` (a git-LFS clone of
    a dataset keeps a copy of every image there), ``.thumbnails/``, ``.ipynb_checkpoints/``."""
    folder, name = os.path.split(path)  # os.path, not pathlib: no interned string per file
    return not (
        name.startswith(".")
        or any(part.startswith(".") and part not in (".", "..") for part in _parts(folder))
        or name.upper() == DICOMDIR
        or name.lower() in ("thumbs.db", "desktop.ini")
        or os.path.splitext(name)[1].lower() in SIDECAR_SUFFIXES
    )


def _parts(folder: str) -> list[str]:
    """A relative folder's names (``a/b`` -> ``[a, b]``; either separator)."""
    return folder.replace(os.sep, "/").split("/") if folder else []


def source_files(root: Path) -> Iterator[str]:
    """Every file under ``root`` as a posix path relative to it, in sorted path order (symlinks
    to files included, and links whose target is missing, so that ingest names them;
    symlinked folders not entered, unreadable folders skipped): what
    ``sorted(p for p in root.rglob("*") if p.is_file() or <a broken link>)`` lists, one folder
    at a time."""

    def walk(folder: str, prefix: str) -> Iterator[str]:
        try:
            with os.scandir(folder) as found:
                names = sorted((e.name, _is_folder(e)) for e in found)
        except PermissionError:
            return
        for name, is_folder in names:
            path = os.path.join(folder, name)
            if is_folder:
                yield from walk(path, f"{prefix}{name}/")
            elif os.path.isfile(path) or broken_link(path):
                yield prefix + name

    return walk(str(root), "")


NOT_UTF8 = "file or folder name is not valid UTF-8 (rename it)"  # a quarantine reason and kind
_HIDDEN = "<name not UTF-8>"


def is_utf8(path: str) -> bool:
    """Whether a path the file system gave is valid UTF-8. Python keeps the bytes of a name
    that is not (a latin-1 name from an old zip, 'M\\xfcller.png') as lone surrogates, which
    nothing that writes text takes (parquet, CSV, the keyed hashes of :mod:`pipeline.deid`),
    and which no label sheet (UTF-8 text) can name."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def escaped(path: str) -> str:
    """``path`` as text with each byte that is not UTF-8 written ``\\xNN`` (``M\\xfcller.png``):
    how quarantine.csv names such a file, so that it can be found and renamed."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def hidden(path: str | os.PathLike) -> str:
    """``path`` for a log line: each folder or file name that is not UTF-8 shown as
    ``<name not UTF-8>`` (it may hold a patient's name; a log never shows it)."""
    path = os.fspath(path)
    if is_utf8(path):
        return path
    return "/".join(part if is_utf8(part) else _HIDDEN for part in path.split("/"))


def broken_link(path: str) -> bool:
    """A symlink whose target is missing: listed, so that ingest quarantines it with its
    reason instead of losing the file without a word."""
    return os.path.islink(path) and not os.path.exists(path)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def is_npz(root: Path) -> bool:
    """Whether the source is a MedMNIST-style ``.npz`` file (rows, not files)."""
    return root.suffix.lower() == ".npz" and root.is_file()


def npz_key(split: str) -> str:
    """The array of ``split``'s images in a MedMNIST-style .npz: ``{split}_images``."""
    return f"{split}_images"


def npz_source(split: str, index: int) -> str:
    """The manifest ``source`` of row ``index`` of an .npz array: ``{split}_images[i]``."""
    return f"{npz_key(split)}[{index}]"


def npz_row(source: str) -> tuple[str, int]:
    """``{split}_images[i]`` -> (array name, row); one line when it is not an .npz row."""
    key, _, rest = source.partition("[")
    if not rest.endswith("]") or not rest[:-1].isdigit():
        raise UserError(f"manifest source {source!r} is not an .npz row (re-run retina-vae ingest)")
    return key, int(rest[:-1])
