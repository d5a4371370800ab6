"""The prepared-pixel cache: one decode per image across ingest and preprocess.

Ingest must decode every file completely (that is how truncation is caught) and hashes the
pixels at its check scale (:data:`pipeline.ingest.CHECK_SIZE`). Preprocess needs the same file
decoded at the JPEG scale that covers ``preprocess.image_size``. For non-JPEG files (PNG, TIFF,
BMP, DICOM: no reduced decoding) and for JPEGs where both bounds fall on the same DCT scale
(every JPEG at the default 64 px target, whose draft is the check scale) the two decodes give
identical pixels, so ingest prepares the training pixels from its own decode
(:func:`pipeline.pixels.prepare_pixels`) and writes them here; preprocess takes them instead of
decoding again. Everything else (a JPEG whose scales differ at another target size, a DICOM
volume whose kept frames differ from those decoded, an .npz source) is decoded by preprocess
as before.

The cache is an accelerator only, never a DVC output or dependency: preprocess uses an entry
only when all of these match, and otherwise decodes the file itself, so its outputs are the
same bytes with or without the cache:
- the cache key: modality, ``preprocess.image_size``, ``oct_aspect``, ``illumination``, the
  source of :mod:`pipeline.pixels` and of the decoders (:mod:`pipeline.readers`,
  :mod:`pipeline.photo`, :mod:`pipeline.dicom_pixels`), the decoder library versions and
  :data:`FORMAT` (raised whenever decoding changes what pixels mean, as when photos were
  first turned upright) -- a params or code change without re-running ingest is a miss, not
  a stale hit;
- the manifest: the SHA-256 of the manifest file this cache was written with;
- the file: its size and modification time at ingest;
- the frames: the frame list preprocess needs for that file equals the one ingest decoded.

Layout (``<folder of paths.manifest>/prepared/``): ``pixels.bin`` (rows of (C, H, W) uint8,
appended by the local engine's driver as they are decoded, so ingest never holds them in
memory), ``part-<uuid>.bin`` (the same rows, one file per Ray Data ingest task batch, written by
the task itself: :func:`write_part`; on a cluster the folder must be on storage every node
mounts, else those entries are misses), ``index.parquet`` (one row per file: source, frames,
size, mtime_ns, pixel file, first row) and ``meta.json`` (with each pixel file's row count).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.io import ArrowRows, temp_path, write_table
from pipeline.params import Params
from pipeline.processed import CHANNELS

FORMAT = 3  # 3: upright, palette, alpha and Bits Stored decoding (issue 17)
MAIN = "pixels.bin"
INDEX_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("frames", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("file", pa.string()),
        ("row", pa.int64()),
    ]
)
LIBRARIES = ("pillow", "numpy", "scipy", "scikit-image", "pydicom")
_CODE = ("pixels.py", "readers.py", "photo.py", "dicom_pixels.py")


def cache_dir(params: Params) -> Path:
    return Path(params.paths.manifest).parent / "prepared"


def prepare_spec(params: Params) -> dict:
    """What :func:`pipeline.pixels.prepare_pixels` is called with for this params file."""
    pp = params.preprocess
    return {
        "modality": params.ingest.modality,
        "image_size": [int(v) for v in pp.image_size],
        "oct_aspect": pp.oct_aspect,
        "illumination": pp.illumination,
    }


def cache_key(spec: dict) -> str:
    """sha256 over the prepare spec, the decoding/preparing code and the library versions."""
    here = Path(__file__).parent
    code = {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _CODE}
    versions = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    blob = json.dumps(
        {"format": FORMAT, "spec": spec, "code": code, "libs": versions}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def file_stat(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return int(st.st_size), int(st.st_mtime_ns)


def shape_of(spec: dict) -> tuple[int, int, int]:
    return (CHANNELS[spec["modality"]], *spec["image_size"])


def fits(pixels: np.ndarray, frames: list, shape: tuple[int, int, int]) -> bool:
    """True when ``pixels`` are what preprocess makes of ``frames``: (F, C, H, W) uint8."""
    return pixels.dtype == np.uint8 and pixels.shape == (len(frames), *shape)


def write_part(folder: Path, shape: tuple[int, int, int], results: list[dict]) -> None:
    """In a Ray ingest task: move each result's ``prepared`` pixels into one new part file in
    ``folder`` (the writer's :attr:`CacheWriter.tmp`), leaving ``part`` = [file, first row] in
    the result for :meth:`CacheWriter.add_part`; pixels that do not fit are dropped (a miss).
    Published by rename when whole: a failed (retried) task leaves no part file."""
    name, row, out = f"part-{uuid.uuid4().hex}.bin", 0, None
    tmp = Path(folder) / f".{name}.tmp"
    try:
        for r in results:
            px = r.pop("prepared", None)
            if px is None or "frames" not in r or not fits(px, r["frames"], shape):
                continue
            if out is None:
                out = open(tmp, "wb")  # noqa: SIM115 (closed below)
            out.write(np.ascontiguousarray(px).tobytes())
            r["part"] = [name, row]
            row += len(px)
    finally:
        if out is not None:
            out.close()
    if out is not None:
        os.replace(tmp, Path(folder) / name)


class CacheWriter:
    """Appends prepared frames file by file; :meth:`close` publishes the cache atomically."""

    def __init__(self, folder: Path, spec: dict) -> None:
        self.folder = Path(folder)
        self.shape = shape_of(spec)
        self.key = cache_key(spec)
        shutil.rmtree(self.folder, ignore_errors=True)  # never leave an earlier run's cache
        self.tmp = temp_path(self.folder)  # a killed writer's is removed by the next stage
        self.tmp.mkdir(parents=True)
        self._bin = open(self.tmp / MAIN, "wb")  # noqa: SIM115 (closed in close/abort)
        self._rows = ArrowRows(INDEX_SCHEMA)
        self._n = 0

    def add(self, source: str, frames: list[int], stat: tuple[int, int], pixels: np.ndarray):
        """``pixels`` (len(frames), C, H, W) uint8, in ``frames`` order, into ``pixels.bin``."""
        if not fits(pixels, frames, self.shape):
            return  # not what preprocess would make: leave this file to preprocess
        self._bin.write(np.ascontiguousarray(pixels).tobytes())
        self.add_part(source, frames, stat, MAIN, self._n)
        self._n += len(frames)

    def add_part(self, source: str, frames: list[int], stat: tuple[int, int], file: str, row: int):
        """Index a file's frames already written at ``row`` of pixel file ``file`` in
        :attr:`tmp` (by :meth:`add`, or by a Ray task's :func:`write_part`)."""
        frames_text = ",".join(str(int(f)) for f in frames)
        self._rows.append((source, frames_text, int(stat[0]), int(stat[1]), file, int(row)))

    def close(self, manifest: str | Path) -> None:
        self._bin.close()
        write_table(self.tmp / "index.parquet", self._rows.table())
        row_bytes = int(np.prod(self.shape))
        files = {f.name: f.stat().st_size // row_bytes for f in self.tmp.glob("*.bin")}
        meta = {
            "key": self.key,
            "shape": list(self.shape),
            "rows": sum(files.values()),
            "files": files,
            "manifest_sha256": file_sha256(manifest),
        }
        (self.tmp / "meta.json").write_text(json.dumps(meta, sort_keys=True) + "\n")
        os.replace(self.tmp, self.folder)

    def abort(self) -> None:
        self._bin.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class PreparedCache:
    """Read side: :meth:`lookup` gives a file's prepared frames, or None on any mismatch."""

    def __init__(self, folder: Path, meta: dict, index: pa.Table) -> None:
        self.shape = tuple(meta["shape"])
        self.row_bytes = int(np.prod(self.shape))
        self.folder = folder
        self._fds: dict[str, int] = {}
        # Arrow columns, not a Python object per entry (a dict of tuples was 19 MiB at 50,000)
        self._source = index.column("source").combine_chunks()
        self._frames = index.column("frames").combine_chunks()
        self._file = index.column("file").combine_chunks()
        self._stat = np.stack(
            [index.column("size").to_numpy(), index.column("mtime_ns").to_numpy()], axis=1
        )  # (E, 2) int64
        self._row = index.column("row").to_numpy()

    @classmethod
    def open(cls, folder: Path, spec: dict, manifest: str | Path) -> PreparedCache | None:
        """The cache in ``folder`` when it was written for this spec, code and manifest."""
        try:
            meta = json.loads((Path(folder) / "meta.json").read_text())
            if meta.get("key") != cache_key(spec) or tuple(meta["shape"]) != shape_of(spec):
                return None
            if meta.get("manifest_sha256") != file_sha256(manifest):
                return None
            row_bytes = int(np.prod(meta["shape"]))
            for name, rows in meta["files"].items():  # every pixel file whole, as written
                if (Path(folder) / name).stat().st_size != int(rows) * row_bytes:
                    return None
            return cls(Path(folder), meta, pq.read_table(Path(folder) / "index.parquet"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def entries(self, sources: Sequence[str]) -> np.ndarray:
        """(len(sources),) each source file's entry for :meth:`lookup`, -1 where none."""
        found = pc.index_in(pa.array(sources).cast(self._source.type), value_set=self._source)
        return found.fill_null(-1).to_numpy()

    def lookup(self, entry: int, frames: list[int], path: str | Path) -> np.ndarray | None:
        """(len(frames), C, H, W) for the file of ``entry`` (:meth:`entries`) when ingest
        decoded exactly these frames of the unchanged file at ``path``; else None."""
        if entry < 0 or self._frames[entry].as_py() != ",".join(str(int(f)) for f in frames):
            return None
        try:
            if file_stat(path) != tuple(int(v) for v in self._stat[entry]):
                return None
        except OSError:
            return None
        name = self._file[entry].as_py()
        fd = self._fds.get(name)
        if fd is None:  # positioned reads, not a map: nothing stays resident
            try:
                fd = self._fds[name] = os.open(self.folder / name, os.O_RDONLY)
            except OSError:
                return None
        data = os.pread(fd, self.row_bytes * len(frames), self.row_bytes * int(self._row[entry]))
        if len(data) != self.row_bytes * len(frames):
            return None
        return np.frombuffer(data, np.uint8).reshape(len(frames), *self.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
