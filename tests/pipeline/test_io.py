"""Atomic outputs: a failing writer leaves the previous output untouched and no temp files."""

import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import io
from pipeline.io import ArrowRows, atomic_path, write_json, write_table


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_directory_output_is_replaced_whole(tmp_path):
    target = tmp_path / "arrays"
    for content in ("old", "new"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "x.txt").write_text(content)
    assert (target / "x.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arrays"]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv"])
def test_write_table_round_trips(tmp_path, suffix):
    df = pd.DataFrame({"image_id": ["a", "b"], "label": ["CNV", None]})
    path = tmp_path / f"t{suffix}"
    write_table(path, df)
    back = (
        pd.read_parquet(path)
        if suffix == ".parquet"
        else pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",")
    )
    assert back["image_id"].tolist() == ["a", "b"]
    assert back["label"].isna().tolist() == [False, True]


def test_arrow_rows_keep_every_row_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(ArrowRows, "CHUNK", 3)
    rows = ArrowRows(pa.schema([("n", pa.int64()), ("text", pa.large_string())]))
    values = [(i, None if i % 4 == 1 else f"t{i}") for i in range(8)]  # 2 full chunks + 2
    for row in values:
        rows.append(row)
    assert len(rows) == 8
    assert [rows.value(i, "text") for i in range(8)] == [t for _, t in values]
    assert rows.table().to_pylist() == [{"n": n, "text": t} for n, t in values]
    write_table(tmp_path / "rows.parquet", rows.table())
    assert pd.read_parquet(tmp_path / "rows.parquet")["n"].tolist() == list(range(8))


@pytest.mark.parametrize("arrow", [False, True])
def test_parquet_is_written_in_bounded_row_groups(tmp_path, monkeypatch, arrow):
    monkeypatch.setattr(io, "ROW_GROUP", 3)
    df = pd.DataFrame({"n": range(8), "text": [f"t{i}" for i in range(8)]})
    write_table(
        tmp_path / "t.parquet", pa.Table.from_pandas(df, preserve_index=False) if arrow else df
    )
    meta = pq.ParquetFile(tmp_path / "t.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [3, 3, 2]
    assert pd.read_parquet(tmp_path / "t.parquet").equals(df)
