"""The processed-data contract: what preprocess writes and train, evaluate and tracking read.

``paths.processed`` holds, per split of :data:`SPLITS`:

- ``{split}.parquet``: one row per image (columns :data:`TABLE_COLUMNS`), in array row order;
- (once for the folder) ``preprocessing.json``: the values of :data:`PREPROCESSING` the images
  were made with, which train records in the checkpoint and encode applies to new images;
- its images, uint8 (N, C, H, W) with C = :data:`CHANNELS` of the modality (1 grey for OCT, 3
  RGB for fundus), either
  - local engine: ``{split}_images.npy``, one array, or
  - Ray Data engine (``data.engine: ray``): ``{split}_images/00000.npy, 00001.npy, ...``, shards
    of ``data.shard_size`` images each (the last one shorter), in row order: their
    concatenation is the array the local engine writes, row for row.

:func:`open_images` gives either as a read-only array-like (memory-mapped; a
:class:`ShardedArray` indexes across shards without loading them) so readers need not know
which.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")
CHANNELS = {"oct": 1, "fundus": 3}  # channels of each modality's images: grey, or RGB
# no source path: a file or folder name may carry a patient identifier (an MRN, a scan date), and
# these tables travel with the de-identified arrays; ingest's manifest keeps the link to the files
TABLE_COLUMNS = ["image_id", "label", "subject_id", "eye", "modality", "split", "frame"]
# The params that make an image file the encoder's input (its size is the model config's).
# (``ingest.oct_frames`` only chooses which frames of a volume become images, not their pixels.)
PREPROCESSING = ("ingest.modality", "preprocess.oct_aspect", "preprocess.illumination")
RECORD = "preprocessing.json"


def preprocessing(flat: dict[str, Any]) -> dict[str, str]:
    """``{"ingest.modality": ..., ...}``: the :data:`PREPROCESSING` values of flat params
    (:meth:`pipeline.params.Params.flat`)."""
    return {key: flat[key] for key in PREPROCESSING}


def read_record(processed: str | Path) -> dict[str, str] | None:
    """The :data:`PREPROCESSING` values the folder's images were made with; None for a folder
    from before preprocess recorded them."""
    path = Path(processed) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def images_file(processed: str | Path, split: str) -> Path:
    """The local engine's one array, ``{split}_images.npy``."""
    return Path(processed) / f"{split}_images.npy"


def shard_folder(processed: str | Path, split: str) -> Path:
    """The Ray Data engine's shard folder, ``{split}_images``."""
    return Path(processed) / f"{split}_images"


def table_path(processed: str | Path, split: str) -> Path:
    """The split's metadata rows, ``{split}.parquet``."""
    return Path(processed) / f"{split}.parquet"


def images_path(processed: str | Path, split: str) -> Path:
    """The shard folder ``{split}_images`` when there is one, else ``{split}_images.npy``
    (which need not exist: callers name it in their "not found")."""
    folder = shard_folder(processed, split)
    return folder if folder.is_dir() else images_file(processed, split)


def shard_name(index: int) -> str:
    return f"{index:05d}.npy"


def image_files(processed: str | Path, split: str) -> list[Path]:
    """The files holding one split's images, in row order ([] when there are none)."""
    return _files_at(images_path(processed, split))


def _files_at(path: Path) -> list[Path]:
    """The one file ``path``, or the shard files of the folder ``path``, in row order."""
    if path.is_file():
        return [path]
    return sorted(path.glob("[0-9]*.npy")) if path.is_dir() else []


def exists(processed: str | Path, split: str) -> bool:
    return bool(image_files(processed, split))


def split_sizes(processed: str | Path) -> dict[str, int]:
    """Images per split on disk: ``{"train_images": N, ...}`` (splits without images left out)."""
    return {
        f"{split}_images": len(open_images(processed, split))
        for split in SPLITS
        if exists(processed, split)  # one .npy, or the Ray Data engine's shards
    }


class ShardedArray:
    """Read-only (N, C, H, W) view over shard files: ``len``, ``shape``, ``dtype``, ``ndim`` and
    indexing by int, slice or integer array, like the memory-mapped single array."""

    def __init__(self, files: list[Path]) -> None:
        if not files:
            raise FileNotFoundError("no shard files")
        self.files = [str(f) for f in files]
        self._parts: list[np.ndarray] | None = None
        parts = self._open()
        self.starts = np.cumsum([0] + [len(p) for p in parts]).tolist()  # N_0, N_0+N_1, ...
        inner = {p.shape[1:] for p in parts}
        dtypes = {p.dtype for p in parts}
        if len(inner) != 1 or len(dtypes) != 1:
            raise ValueError(f"shards of {Path(self.files[0]).parent} differ in shape or dtype")
        self.shape = (self.starts[-1], *inner.pop())
        self.dtype = dtypes.pop()
        self.ndim = len(self.shape)

    def _open(self) -> list[np.ndarray]:
        if self._parts is None:
            self._parts = [np.load(f, mmap_mode="r") for f in self.files]
        return self._parts

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parts": None}  # each process maps the files itself

    def __len__(self) -> int:
        return self.shape[0]

    def _row(self, i: int) -> np.ndarray:
        n = self.shape[0]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} images")
        k = bisect.bisect_right(self.starts, i) - 1
        return self._open()[k][i - self.starts[k]]

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self._row(int(key))
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            if step == 1:  # contiguous: whole slices of the shards it spans
                parts, parts_in = [], self._open()
                for k, part in enumerate(parts_in):
                    lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
                    if lo < hi:
                        parts.append(part[lo - self.starts[k] : hi - self.starts[k]])
                if not parts:
                    return np.zeros((0, *self.shape[1:]), self.dtype)
                return parts[0] if len(parts) == 1 else np.concatenate(parts)
            key = np.arange(start, stop, step)
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        if not len(idx):
            return np.zeros((0, *self.shape[1:]), self.dtype)
        return np.stack([self._row(int(i)) for i in idx])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[0 : self.shape[0]]
        return np.asarray(out, dtype=dtype)


def open_images(processed: str | Path, split: str) -> np.ndarray | ShardedArray:
    """One split's images, memory-mapped; FileNotFoundError when the split has none on disk."""
    return open_path(images_path(processed, split))


def open_path(path: str | Path) -> np.ndarray | ShardedArray:
    """A ``{split}_images.npy`` file or a ``{split}_images`` shard folder, memory-mapped."""
    path = Path(path)
    if path.is_file():
        return np.load(path, mmap_mode="r")
    files = _files_at(path)
    if not files:
        raise FileNotFoundError(f"{path}: no images (.npy file or shard folder)")
    return ShardedArray(files)
