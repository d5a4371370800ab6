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
from pipeline.params import Params

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
    """The folder (or .npz file) that manifest ``source`` paths are relative to."""
    return Path(params.paths.demo if params.ingest.source == "demo" else params.ingest.source)


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
            elif os.path.isfile(path) or _broken_link(path):
                yield prefix + name

    return walk(str(root), "")


def _broken_link(path: str) -> bool:
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
