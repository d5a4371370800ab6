"""The sources stage: a fingerprint of an external source and label sheet that changes exactly
when one of them does (the end-to-end `dvc repro` check is in tests/test_pipeline_e2e.py)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline import deid, sources
from pipeline.params import load_params
from tests.pipeline.dicom_factory import dvc_temp_copy, write_params


def _fingerprint(tmp_path: Path, **ingest) -> dict:
    params = write_params(tmp_path, ingest=ingest)
    assert sources.main(["--params", str(params)]) == 0
    return json.loads(Path(load_params(params).paths.sources).read_text())


def test_fingerprint_changes_with_the_sheet_or_the_tree_and_names_nothing(tmp_path):
    src, sheet = tmp_path / "PHI-7781234", tmp_path / "labels.csv"
    src.mkdir()
    (src / "PHI-7781234_left.png").write_bytes(b"one")
    sheet.write_text("path,label\nPHI-7781234_left.png,0\n")
    ingest = {"source": str(src), "labels": str(sheet)}
    first = _fingerprint(tmp_path, **ingest)
    assert _fingerprint(tmp_path, **ingest) == first  # nothing changed
    text = Path(load_params(tmp_path / "params.yaml").paths.sources).read_text()
    assert "7781234" not in text and "PHI" not in text

    sheet.write_text("path,label\nPHI-7781234_left.png,1\n")  # a label edited
    second = _fingerprint(tmp_path, **ingest)
    assert second["labels"] != first["labels"] and second["source"] == first["source"]

    # what ingest never reads: a git fetch in a git-LFS dataset, a file manager's thumbnails,
    # a sidecar note; none re-runs ingest
    (src / ".git").mkdir()
    (src / ".git" / "FETCH_HEAD").write_text("x")
    (src / ".thumbnails").mkdir()
    (src / ".thumbnails" / "PHI-7781234_left.png").write_bytes(b"small")
    (src / "notes.txt").write_text("seen by a grader")
    assert _fingerprint(tmp_path, **ingest)["source"] == second["source"]

    (src / "new.png").write_bytes(b"two")  # a file added
    third = _fingerprint(tmp_path, **ingest)
    assert third["source"] != second["source"]

    st = os.stat(src / "new.png")
    (src / "new.png").write_bytes(b"TWO")  # replaced, same size: its time tells
    os.utime(src / "new.png", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # even on a coarse clock
    assert _fingerprint(tmp_path, **ingest)["source"] != third["source"]


def test_demo_source_and_no_sheet_have_no_fingerprint(tmp_path):
    found = _fingerprint(tmp_path, source="demo", labels=None)
    assert (found["source"], found["labels"]) == (None, None)


def test_a_new_pseudonymisation_key_changes_the_fingerprint_and_shows_nothing(
    tmp_path, monkeypatch
):
    """RETINA_VAE_SALT is no param DVC sees: the fingerprint carries a keyed hash of it, so a
    new key re-runs ingest (new subject ids); the key itself is in no byte of the file."""
    monkeypatch.setenv(deid.SALT_ENV, "clinic-secret-1")
    first = _fingerprint(tmp_path, source="demo", labels=None)
    assert _fingerprint(tmp_path, source="demo", labels=None) == first
    monkeypatch.setenv(deid.SALT_ENV, "clinic-secret-2")
    second = _fingerprint(tmp_path, source="demo", labels=None)
    assert second["salt"] != first["salt"]
    assert "clinic-secret" not in json.dumps(first) + json.dumps(second)  # the file as written


def test_a_file_name_that_is_not_utf8_is_fingerprinted_by_its_bytes(tmp_path):
    """A latin-1 name (os.fsencode bytes) is hashed as it is on disk, with its size and time:
    reference hashlib over the known bytes; the fingerprint names nothing."""
    src = tmp_path / "src"
    src.mkdir()
    name = b"Schr\xf6dinger_OD.png"
    path = os.path.join(os.fsencode(src), name)
    with open(path, "wb") as f:
        f.write(b"one")
    st = os.stat(path)
    want = hashlib.sha256(name + f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode()).hexdigest()
    assert _fingerprint(tmp_path, source=str(src), labels=None)["source"] == want
    text = Path(load_params(tmp_path / "params.yaml").paths.sources).read_bytes()
    assert b"dinger" not in text


def test_a_home_relative_source_is_the_users(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "scans").mkdir(parents=True)
    (tmp_path / "home" / "scans" / "a.png").write_bytes(b"one")
    expanded = _fingerprint(tmp_path, source=str(tmp_path / "home" / "scans"), labels=None)
    assert _fingerprint(tmp_path, source="~/scans", labels=None) == expanded


def test_a_relative_source_and_sheet_are_at_the_repository_root_in_a_dvc_temp_copy(
    tmp_path, monkeypatch, capsys
):
    """`dvc exp run --temp` and a queued run run the stage in <repo>/.dvc/tmp/exps/tmpXXXX:
    a relative ingest.source / ingest.labels names there the files it names in the workspace
    (where it stays as written), and a missing one is named as written and as resolved."""
    repo, data = tmp_path / "repo", tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(b"one")
    (data / "labels.csv").write_text("path,label\na.png,0\n")
    ingest = {"source": "../data/images", "labels": "../data/labels.csv"}
    repo.mkdir()
    monkeypatch.chdir(repo)
    in_workspace = _fingerprint(repo, **ingest)
    absolute = _fingerprint(repo, source=str(data / "images"), labels=str(data / "labels.csv"))
    assert in_workspace == absolute
    copy = dvc_temp_copy(repo)
    monkeypatch.chdir(copy)
    assert _fingerprint(copy, **ingest) == in_workspace
    # a sheet git tracks is in the copy as the experiment's commit holds it: that one is read,
    # not the workspace's, edited since the experiment was queued
    (repo / "sheet.csv").write_text("path,label\na.png,0\n")
    (copy / "sheet.csv").write_text("path,label\na.png,1\n")
    images = "../data/images"
    tracked = _fingerprint(copy, source=images, labels="sheet.csv")["labels"]
    assert tracked == _fingerprint(copy, source=images, labels=str(copy / "sheet.csv"))["labels"]
    assert tracked != _fingerprint(copy, source=images, labels=str(repo / "sheet.csv"))["labels"]

    capsys.readouterr()
    missing = {"source": "../data/gone", "labels": None}
    assert sources.main(["--params", str(write_params(copy, ingest=missing))]) == 1
    where = f"../data/gone (resolved to {repo.resolve() / '../data/gone'})"
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"retina-vae sources: error: {where}: source folder not found (ingest.source)")
    )
    monkeypatch.chdir(repo)  # the workspace: the path as written, as before
    assert sources.main(["--params", str(write_params(repo, ingest=missing))]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "retina-vae sources: error: ../data/gone: source folder not found (ingest.source)"
        )
    )
