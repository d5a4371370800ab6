"""Preprocess: field-of-view crop, aspect, subject-level split, outputs, determinism."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import demo, ingest, preprocess
from pipeline.params import load_params
from tests.pipeline.dicom_factory import write_params


def test_split_by_subject_stratified_and_overridden():
    rng = np.random.default_rng(0)
    rows = [
        {"subject_id": f"s{s}", "label": ["A", "B"][s % 2], "split": None}
        for s in range(60)
        for _ in range(rng.integers(1, 4))
    ]
    rows += [
        {"subject_id": "fixed", "label": "A", "split": "test"},
        {"subject_id": "fixed", "label": "A", "split": "val"},
        {"subject_id": "fixed", "label": "A", "split": "test"},
        {"subject_id": "fixed", "label": "A", "split": None},
    ]
    df = pd.DataFrame(rows)
    split = preprocess.assign_splits(df, 0.2, 0.2, seed=3)
    assert split.notna().all()
    assert (df.assign(split=split).groupby("subject_id")["split"].nunique() == 1).all()
    assert set(split[df["subject_id"] == "fixed"]) == {"test"}
    per = df.assign(split=split).drop_duplicates("subject_id").groupby(["split", "label"]).size()
    # 20% of each label's 30 subjects, plus the subject fixed to test
    assert (per["test"]["A"], per["test"]["B"], per["val"]["A"], per["val"]["B"]) == (7, 6, 6, 6)
    assert split.equals(preprocess.assign_splits(df, 0.2, 0.2, seed=3))
    assert not split.equals(preprocess.assign_splits(df, 0.2, 0.2, seed=4))


def test_given_train_and_test_without_val_draw_val_from_train():
    """An official train/test release: val is val_fraction of each label's train subjects;
    the test subjects stay test, and so does every subject's split in any other case."""
    rows = [
        {"subject_id": f"s{s:02d}", "label": "AB"[s % 2], "split": "test" if s < 20 else "train"}
        for s in range(60)
        for _ in range(1 + s % 3)  # 1-3 images per subject
    ]
    df = pd.DataFrame(rows)
    split = preprocess.assign_splits(df, 0.25, 0.1, seed=0)
    assert (df.assign(split=split).groupby("subject_id")["split"].nunique() == 1).all()
    assert (split[df["split"] == "test"] == "test").all()
    per = df.assign(split=split).drop_duplicates("subject_id").groupby(["split", "label"]).size()
    assert (per["val"]["A"], per["val"]["B"], per["train"]["A"], per["train"]["B"]) == (
        5,
        5,
        15,
        15,
    )
    given = df.assign(split=np.where(df["subject_id"] == "s59", "val", df["split"]))
    assert preprocess.assign_splits(given, 0.25, 0.1, seed=0).equals(given["split"])
    # a sheet of train only (test_fraction 0, or an .npz of train arrays): val all the same
    only_train = df[df["split"] == "train"]
    split = preprocess.assign_splits(only_train, 0.25, 0.0, seed=0)
    subjects = only_train.assign(split=split).drop_duplicates("subject_id")["split"]
    assert subjects.value_counts().to_dict() == {"train": 30, "val": 10}


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        # a subject's majority label picks its stratum; a tie goes to the label it names first:
        # both subjects below land in stratum B, so with test_fraction 0.5 one of them is test
        ([("s1", "B", None), ("s1", "A", None), ("s2", "B", None)], {"test": 1, "train": 1}),
        # explicit splits: the most common wins, a tie goes to the earlier of train, val, test
        ([("s1", "A", "test"), ("s1", "A", "val"), ("s1", "A", None)], {"val": 1}),
        ([("s1", "A", "test"), ("s1", "A", "test"), ("s1", "A", "train")], {"test": 1}),
        # unlabelled subjects form their own stratum
        ([("s1", None, None), ("s2", None, None), ("s3", "A", None)], {"test": 1, "train": 2}),
    ],
)
def test_split_ties_and_strata(rows, expected):
    df = pd.DataFrame(rows, columns=["subject_id", "label", "split"])
    split = preprocess.assign_splits(df, 0.0, 0.5, seed=0)
    per_subject = df.assign(split=split).groupby("subject_id")["split"].agg(set)
    assert all(len(s) == 1 for s in per_subject)  # one split per subject
    counts = pd.Series([next(iter(s)) for s in per_subject]).value_counts().to_dict()
    assert counts == expected


def _reference_splits(df: pd.DataFrame, val: float, test: float, seed: int) -> list[str]:
    """The split rule written out plainly, one subject at a time (the oracle for the
    vectorised one): explicit splits by majority (ties: train, val, test order); the rest
    stratified by majority label (ties: the label named first; unlabelled its own stratum,
    first), strata in sorted order, subject ids sorted then shuffled by one seeded generator."""
    order = ("train", "val", "test")
    chosen = {}
    for subject, rows in df.groupby("subject_id", sort=False):
        given = Counter(v for v in rows["split"] if isinstance(v, str))
        if given:
            chosen[subject] = max(order, key=lambda s: (given[s], -order.index(s)))
    strata: dict = {}
    for subject, rows in df.groupby("subject_id", sort=False):
        if subject not in chosen:
            names = [v if isinstance(v, str) else "" for v in rows["label"]]
            best = max(Counter(names).items(), key=lambda kv: (kv[1], -names.index(kv[0])))[0]
            strata.setdefault(best, []).append(subject)
    rng = np.random.default_rng(seed)
    for label in sorted(strata):  # "" (unlabelled) sorts first
        ids = rng.permutation(np.array(sorted(strata[label]), dtype=object))
        n_test, n_val = round(len(ids) * test), round(len(ids) * val)
        for i, subject in enumerate(ids):
            chosen[subject] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return [chosen[s] for s in df["subject_id"]]


@pytest.mark.parametrize("seed", range(12))
def test_split_matches_the_rule_written_out(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    labels = np.array([None, "A", "B", "C", "10", "9"], dtype=object)
    df = pd.DataFrame(
        {
            "subject_id": [f"s{int(i):03d}" for i in rng.integers(0, 60, n)],
            "label": labels[rng.integers(0, 6, n)],
            "split": np.array([None] * 4 + ["train", "val", "test"], dtype=object)[
                rng.integers(0, 7, n)
            ]
            if seed % 2
            else None,
        },
        index=rng.permutation(n) + 100,  # not a RangeIndex: the result follows df's index
    )
    val, test = rng.uniform(0, 0.4, 2)
    split = preprocess.assign_splits(df, val, test, seed)
    assert split.index.equals(df.index)
    assert split.tolist() == _reference_splits(df, val, test, seed)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_demo_to_arrays_contract_and_byte_identical(tmp_path):
    params = write_params(tmp_path, demo={"patients": 8, "dicom_fraction": 0.4})
    p = load_params(params).paths
    for stage in (demo, ingest, preprocess):
        assert stage.main(["--params", str(params)]) == 0
    report = json.loads(Path(p.preprocess_report).read_text())
    assert report["classes"] == sorted(report["classes"]) and report["channels"] == 1
    total = 0
    subjects = {}
    for split in ("train", "val", "test"):
        x = np.load(Path(p.processed) / f"{split}_images.npy", mmap_mode="r")
        t = pd.read_parquet(Path(p.processed) / f"{split}.parquet")
        assert x.dtype == np.uint8 and x.shape == (len(t), 1, 32, 32)
        assert list(t.columns) == preprocess.TABLE_COLUMNS and (t["split"] == split).all()
        assert report["splits"][split]["images"] == len(t)
        subjects[split] = set(t["subject_id"])
        total += len(t)
    assert total == 8 * 2 * 2 and len(subjects["train"]) >= 4
    assert not (
        subjects["train"] & subjects["val"]
        or subjects["train"] & subjects["test"]
        or subjects["val"] & subjects["test"]
    )
    first = _digests(Path(p.processed))
    first_report = Path(p.preprocess_report).read_bytes()
    # rerun with two workers: byte-identical arrays, tables and report
    params2 = write_params(
        tmp_path, demo={"patients": 8, "dicom_fraction": 0.4}, preprocess={"workers": 2}
    )
    assert preprocess.main(["--params", str(params2)]) == 0
    assert _digests(Path(p.processed)) == first
    assert Path(p.preprocess_report).read_bytes() == first_report


def test_npz_arrays_and_official_split(tmp_path):
    npz = tmp_path / "m.npz"
    rng = np.random.default_rng(0)
    train = rng.integers(0, 255, (6, 28, 28, 3), dtype=np.uint8)
    train[:, :4] = 0  # a dark band that a field-of-view crop would remove
    np.savez(
        npz,
        train_images=train,
        train_labels=np.arange(6).reshape(6, 1) % 2,
        val_images=rng.integers(0, 255, (2, 28, 28, 3), dtype=np.uint8),
        val_labels=np.array([[0], [1]]),
    )
    params = write_params(
        tmp_path,
        ingest={"source": str(npz), "modality": "fundus", "min_size": 28},
        preprocess={"image_size": [28, 28]},
    )
    assert ingest.main(["--params", str(params)]) == 0
    assert preprocess.main(["--params", str(params)]) == 0
    out = Path(load_params(params).paths.processed)
    x = np.load(out / "train_images.npy")
    assert x.shape == (6, 3, 28, 28) and np.load(out / "test_images.npy").shape == (0, 3, 28, 28)
    with np.load(npz) as data:  # already cropped and at size: pixels kept exactly
        assert np.array_equal(x[0], data["train_images"][0].transpose(2, 0, 1))


@pytest.mark.parametrize("split_column", ["split", None])
def test_a_sheet_that_puts_every_image_in_train(tmp_path, capsys, split_column):
    """As PALM and IDRiD are often shared: a split column that says train on every row. Used,
    it leaves no test image: one line naming the key; ignored, the subjects are split."""
    from PIL import Image

    src = tmp_path / "images"
    src.mkdir()
    for k in range(20):
        Image.fromarray(np.full((40, 40, 3), 10 * k + 20, np.uint8)).save(src / f"{k}.png")
    rows = "".join(f"{k}.png,{'AB'[k % 2]},train\n" for k in range(20))
    (tmp_path / "labels.csv").write_text("path,label,split\n" + rows)
    params = write_params(
        tmp_path,
        ingest={"source": str(src), "labels": str(tmp_path / "labels.csv"),
                "modality": "fundus", "split_column": split_column},
        preprocess={"image_size": [32, 32], "val_fraction": 0.2, "test_fraction": 0.2,
                    "illumination": "graham", "oct_aspect": "crop"},
    )  # fmt: skip
    assert ingest.main(["--params", str(params)]) == 0
    code = preprocess.main(["--params", str(params)])
    if split_column is None:
        assert code == 0
        # how the images were made, beside them: what the model will record and encode apply
        made = json.loads(
            (Path(load_params(params).paths.processed) / "preprocessing.json").read_text()
        )
        assert made == {"ingest.modality": "fundus", "preprocess.oct_aspect": "crop",
                        "preprocess.illumination": "graham"}  # fmt: skip
        sizes = json.loads(Path(load_params(params).paths.preprocess_report).read_text())
        assert {s: sizes["splits"][s]["images"] for s in ("train", "val", "test")} == {
            "train": 12, "val": 4, "test": 4
        }  # fmt: skip
        return
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith(
        f"retina-vae preprocess: error: {tmp_path / 'labels.csv'}: "
    )
    assert "(train 20, val 0, test 0); set ingest.split_column: null to split by subject" in err
    assert not Path(load_params(params).paths.processed).exists()  # nothing half-written


def test_missing_manifest_is_one_line_error(tmp_path, capsys):
    params = write_params(tmp_path)
    assert preprocess.main(["--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("retina-vae preprocess: error: ") and "\n" not in err
    assert "run retina-vae ingest first" in err


def test_manifest_of_an_older_ingest_is_one_line_error(tmp_path, capsys):
    params = write_params(tmp_path)
    manifest = Path(load_params(params).paths.manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": ["i-1"], "source": ["a.png"], "modality": ["fundus"]}).to_parquet(
        manifest
    )
    assert preprocess.main(["--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "re-run retina-vae ingest" in err
    assert "lacks column(s) label, subject_id, eye, split, frame;" in err


@pytest.mark.parametrize("content", [b"", b"PAR1 not really parquet", b"image_id,source\n"])
def test_a_manifest_that_is_not_parquet_is_one_line_error(tmp_path, capsys, content):
    params = write_params(tmp_path)
    manifest = Path(load_params(params).paths.manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_bytes(content)
    assert preprocess.main(["--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("retina-vae preprocess: error: ") and "\n" not in err
    assert "not a Parquet manifest; re-run retina-vae ingest" in err


@pytest.mark.parametrize(
    ("val", "test", "fractions", "expected"),
    [
        ((30, 12), (300, 100), (0.15, 0.15), []),
        ((29, 10), (300, 100), (0.15, 0.15),
         ["the val split has 29 images from 10 subjects (an accuracy on it is +-0.18 (95%)): "
          "too few to compare runs; add images or raise preprocess.val_fraction"]),
        ((4, 2), (5, 3), (0.15, 0.15),
         ["the val split has 4 images from 2 subjects (an accuracy on it is +-0.49 (95%)): "
          "too few to compare runs; add images or raise preprocess.val_fraction",
          "the test split has 5 images from 3 subjects (an accuracy on it is +-0.44 (95%)): "
          "too few to compare runs; add images or raise preprocess.test_fraction"]),
        ((0, 0), (0, 0), (0.0, 0.2),
         ["the test split has 0 images from 0 subjects (it is empty): "
          "too few to compare runs; add images or raise preprocess.test_fraction"]),
        ((0, 0), (0, 0), (0.0, 0.0), []),  # no evaluation split asked for: nothing to warn of
    ],
)  # fmt: skip
def test_small_evaluation_splits_are_warned_of(val, test, fractions, expected):
    splits = {
        name: {"images": n, "subjects": s, "labels": {}}
        for name, (n, s) in {"train": (500, 200), "val": val, "test": test}.items()
    }
    assert preprocess.small_split_warnings(splits, *fractions) == expected
