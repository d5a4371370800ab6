"""Atomic outputs: a failing writer leaves the previous output untouched and no temp files."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import demo, io
from pipeline.io import ArrowRows, atomic_path, write_json, write_table
from pipeline.params import load_params
from tests.conftest import REPO
from tests.pipeline.dicom_factory import write_params


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


# ----------------------------------------------------------------------------- stale temporaries


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(done.stdout)  # that process has exited


@pytest.mark.parametrize(
    ("name", "removed"),
    [
        ("dead", True),  # a killed writer on this host
        ("alive", False),  # a writer still at work (a concurrent stage)
        ("other-host", False),  # another machine's writer on shared storage: cannot tell
        ("foreign", False),  # not a temporary of this mechanism
    ],
)
def test_stale_temporaries_of_dead_writers_only_are_removed(tmp_path, name, removed):
    pid = {"dead": _dead_pid(), "alive": os.getpid()}.get(name, _dead_pid())
    host = "elsewhere" if name == "other-host" else io.HOST
    entry = tmp_path / (f".out.{host}.{pid}.k2j4.tmp" if name != "foreign" else ".out.tmp")
    entry.mkdir()
    (entry / "array.npy").write_bytes(b"x" * 1000)
    freed = io.remove_stale_temporaries([tmp_path])
    assert entry.exists() is not removed
    assert freed == (1000 if removed else 0)


def test_temp_path_names_its_owner(tmp_path):
    tmp = io.temp_path(tmp_path / "processed")
    assert tmp.name.startswith(f".processed.{io.HOST}.{os.getpid()}.") and not tmp.exists()
    tmp.mkdir()
    assert io.remove_stale_temporaries([tmp_path]) == 0 and tmp.exists()  # this process lives


@pytest.mark.slow
def test_a_killed_stage_leaves_a_temporary_that_its_next_run_removes(tmp_path):
    params = write_params(tmp_path, demo={"patients": 60, "workers": 1})
    out = Path(load_params(params).paths.demo)
    stage = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "demo", "--params", str(params)],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while not list(out.parent.glob(f".{out.name}.*.tmp/images/*")):
        assert stage.poll() is None and time.monotonic() < deadline, "no temporary seen"
        time.sleep(0.02)
    os.kill(stage.pid, signal.SIGKILL)  # mid-write
    stage.wait(timeout=60)
    (stale,) = out.parent.glob(f".{out.name}.*.tmp")
    alive = io.temp_path(out)  # a concurrent writer's, in the same folder
    alive.mkdir()

    assert demo.main(["--params", str(params)]) == 0
    assert not stale.exists() and alive.exists() and out.is_dir()
