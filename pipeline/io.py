"""Atomic output writing: every file appears complete under its final name, or not at all; and
:class:`ArrowRows`, a table built row by row in little memory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("retina_vae.io")

# Temporaries are named ``.<name>.<host>.<pid>.<random>.tmp``: a stage that starts removes
# those of dead processes on this host (a SIGKILLed writer leaves its temporary behind), and
# never one of a live writer (a concurrent stage, ``dvc exp run --queue -j 2``).
HOST = socket.gethostname().replace(".", "_")


def temp_path(path: str | Path) -> Path:
    """A fresh temporary name beside ``path``, owned by this process (nothing created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{HOST}.{os.getpid()}."
    fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    Path(tmp_name).unlink()  # the writer creates it (file or directory)
    return Path(tmp_name)


def _owner_dead(name: str) -> bool:
    """Whether ``name`` is a :func:`temp_path` of this host whose process has exited."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    parts = name[: -len(".tmp")].rsplit(".", 3)  # [.<name>, host, pid, random]
    if len(parts) != 4 or parts[1] != HOST or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(folders: list[Path]) -> int:
    """Delete the temporaries of dead writers directly in ``folders``; return bytes freed."""
    freed = 0
    for folder in folders:
        for path in folder.iterdir() if folder.is_dir() else []:
            if not _owner_dead(path.name):
                continue
            files = [path] if not path.is_dir() else [f for f in path.rglob("*") if f.is_file()]
            freed += sum(f.stat().st_size for f in files if not f.is_symlink())
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            log.info("removed %s, the temporary output of a killed run", path)
    return freed


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Works for files and directories: write into the yielded path (a file, or ``mkdir`` it);
    a killed or failing writer leaves the old output (or none), never a half-written one.
    """
    path = Path(path)
    tmp = temp_path(path)
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


# rows per Parquet row group (~100 KB of a manifest): the writer buffers a whole group, several
# times its size, so one group of everything grew a stage's peak RSS with the row count (+24 MiB
# writing 35,000 rows in one group, +8 MiB in groups of 1024)
ROW_GROUP = 1024


def write_table(path: str | Path, df: Any) -> None:
    """Write a pandas DataFrame to ``.parquet``, ``.csv`` or ``.tsv`` by suffix, atomically; or
    an Arrow table to ``.parquet`` (the same bytes as pandas' ``to_parquet`` of that table)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".parquet" and isinstance(df, pa.Table):
            pq.write_table(df, tmp, compression="snappy", row_group_size=ROW_GROUP)
        elif path.suffix == ".parquet":
            df.to_parquet(tmp, index=False, row_group_size=ROW_GROUP)
        elif path.suffix in (".csv", ".tsv"):
            df.to_csv(tmp, index=False, sep="\t" if path.suffix == ".tsv" else ",")
        else:
            raise ValueError(f"{path}: unsupported table format {path.suffix!r}")


class ArrowRows:
    """A table appended to row by row and held as Arrow record batches of :attr:`CHUNK` rows
    (a few bytes per value; only the last rows as Python tuples): N rows cost about their
    Arrow size, not a Python object per value, so a stage's memory stays flat in N."""

    CHUNK = 4096

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._batches: list[pa.RecordBatch] = []
        self._open: list[tuple] = []

    def __len__(self) -> int:
        return len(self._batches) * self.CHUNK + len(self._open)

    def append(self, row: tuple) -> None:
        """One row: a value per schema field, in order."""
        self._open.append(row)
        if len(self._open) == self.CHUNK:
            self._batches.append(self._batch())
            self._open = []

    def value(self, row: int, name: str) -> Any:
        """The value of field ``name`` in row ``row``."""
        k, i = divmod(row, self.CHUNK)
        if k == len(self._batches):
            return self._open[i][self.schema.get_field_index(name)]
        return self._batches[k].column(name)[i].as_py()

    def table(self) -> pa.Table:
        """Every row so far (chunked as held, not copied)."""
        return pa.Table.from_batches([*self._batches, self._batch()], schema=self.schema)

    def _batch(self) -> pa.RecordBatch:
        columns = zip(*self._open, strict=True) if self._open else [[] for _ in self.schema]
        return pa.RecordBatch.from_arrays(
            [pa.array(list(c), type=f.type) for c, f in zip(columns, self.schema, strict=True)],
            schema=self.schema,
        )
