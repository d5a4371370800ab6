"""The processed-data contract (pipeline.processed): file names, and shard folders read as one
array, so every reader sees the same rows."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import processed, train


def _sharded(tmp_path, sizes: list[int]) -> tuple[np.ndarray, object]:
    rng = np.random.default_rng(0)
    full = rng.integers(0, 256, (sum(sizes), 2, 3, 4), dtype=np.uint8)
    folder = tmp_path / "train_images"
    folder.mkdir()
    start = 0
    for k, n in enumerate(sizes):
        np.save(folder / processed.shard_name(k), full[start : start + n])
        start += n
    return full, processed.open_images(tmp_path, "train")


def test_a_shard_folder_indexes_like_the_whole_array(tmp_path):
    full, arr = _sharded(tmp_path, [4, 4, 4, 1])
    assert isinstance(arr, processed.ShardedArray)
    assert (len(arr), arr.shape, arr.dtype, arr.ndim) == (13, full.shape, np.uint8, 4)
    for i in (0, 3, 4, 12, -1, -13):
        assert np.array_equal(arr[i], full[i])
    for s in (slice(0, 13), slice(2, 9), slice(3, 5), slice(5, 5), slice(11, 40), slice(1, 12, 3)):
        assert np.array_equal(arr[s], full[s])
    idx = np.array([12, 0, 7, 7])
    assert np.array_equal(arr[idx], full[idx]) and np.array_equal(np.asarray(arr), full)
    with pytest.raises(IndexError):
        arr[13]


def test_single_file_and_shards_give_the_same_dataset(tmp_path):
    full, _ = _sharded(tmp_path, [5, 5, 2])
    np.save(tmp_path / "whole.npy", full)
    a = train.ArrayDataset(str(tmp_path / "whole.npy"))
    b = train.ArrayDataset(str(processed.images_path(tmp_path, "train")))
    assert len(a) == len(b) == 12
    assert all(np.array_equal(a[i].numpy(), b[i].numpy()) for i in range(12))
    assert processed.images_path(tmp_path, "val").name == "val_images.npy"  # named when missing
    assert not processed.exists(tmp_path, "val")
