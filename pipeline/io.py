"""Atomic output writing: every file appears complete under its final name, or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and directories: write into the yielded path (a file, or ``mkdir`` it);
    a killed or failing writer leaves the old output (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the writer creates it (file or directory)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON (sorted keys, so reruns are byte-identical), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_table(path: str | Path, df: Any) -> None:
    """Write a pandas DataFrame to ``.parquet``, ``.csv`` or ``.tsv`` by suffix, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet":
            df.to_parquet(tmp, index=False)
        elif path.suffix in (".csv", ".tsv"):
            df.to_csv(tmp, index=False, sep="\t" if path.suffix == ".tsv" else ",")
        else:
            raise ValueError(f"{path}: unsupported table format {path.suffix!r}")
