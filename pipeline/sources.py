"""``retina-vae sources``: fingerprint the source folder and label sheet for DVC.

It writes what makes DVC re-run ingest when an external ``ingest.source`` or ``ingest.labels``
changes.

DVC re-runs a stage when a file it lists changes, but the source folder and the label sheet
are params (``null`` and ``demo`` by default), which dvc.yaml cannot list as deps. So the
``sources`` stage runs on every ``dvc repro`` (``always_changed``) and writes
``paths.sources``: a SHA-256 of the label sheet's bytes and one of the source tree's listing
(each file's relative path, size and modification time; an .npz file's size and time). Ingest
depends on that file, so DVC re-runs ingest exactly when a fingerprint differs from the one its
last run saw, and otherwise skips it. The file holds hashes only: no file name reaches it.
The demo folder needs none of this: it is a DVC output, so ingest depends on it directly.
"""

from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

from pipeline import deid
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.manifest import is_candidate, labels_path, source_files, source_root, source_shown
from pipeline.params import Params, shown_path
from pipeline.stage import run_stage

CHUNK = 1 << 20  # bytes read at a time from the label sheet


def _sheet(path: Path, shown: str) -> str:
    """SHA-256 of the label sheet's bytes (``shown``: its path for a message)."""
    if not path.is_file():
        raise UserError(f"{shown}: labels file not found (ingest.labels)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _stat(h: hashlib._Hash, rel: str, path: str) -> None:
    """Hash ``rel`` (its bytes on disk, a name that is not UTF-8 too), size and time."""
    st = os.stat(path) if os.path.exists(path) else os.lstat(path)  # a link to a missing file
    h.update(os.fsencode(rel) + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())


def _tree(root: Path, shown: str) -> str:
    """SHA-256 of every file's relative path, size and modification time (a file's own, for
    a single file such as an .npz); ``shown``: ``root`` for a message."""
    h = hashlib.sha256()
    if root.is_file():
        _stat(h, root.name, str(root))
    elif root.is_dir():
        for rel in source_files(root):  # what ingest reads: a sidecar or .git/ change is none
            if is_candidate(rel):
                _stat(h, rel, os.path.join(root, rel))
    else:
        raise UserError(f"{shown}: source folder not found (ingest.source)")
    return h.hexdigest()


def fingerprint(params: Params) -> dict[str, str | None]:
    """``{"source": hash | None, "labels": hash | None, "salt": ...}``; None for the demo
    source (a DVC output already) and for no label sheet. ``salt``:
    :func:`~pipeline.deid.salt_fingerprint` of the pseudonymisation key (``RETINA_VAE_SALT``,
    which DVC cannot see: a new key re-runs ingest)."""
    ing, sheet = params.ingest, labels_path(params)
    tree = None if ing.source == "demo" else _tree(source_root(params), source_shown(params))
    labels = None if sheet is None else _sheet(sheet, shown_path(ing.labels))
    return {"source": tree, "labels": labels, "salt": deid.salt_fingerprint(deid.resolve_salt())}


def _body(params: Params, args: argparse.Namespace) -> None:
    write_json(params.paths.sources, fingerprint(params))


def main(argv: list[str] | None = None) -> int:
    return run_stage("sources", argv, _body, description=__doc__.splitlines()[0])
