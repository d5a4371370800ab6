"""Preprocess: field-of-view crop, aspect, subject-level split, outputs, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import demo, ingest, preprocess
from pipeline.errors import UserError
from pipeline.params import load_params
from tests.pipeline.dicom_factory import gradient, write_params


def _fundus_like(h: int, w: int, radius: float) -> np.ndarray:
    """A bright disc (the field of view) centred in a black frame: (H, W, 3) uint8."""
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.hypot(yy - h / 2, xx - w / 2) < radius
    img = np.zeros((h, w, 3), np.uint8)
    img[inside] = (200, 90, 40)
    return img


def test_fundus_cropped_to_field_and_squared():
    img = _fundus_like(300, 450, 100)  # wide photo, field 200 px across
    out = preprocess.prepare_pixels(img, "fundus", (40, 40), "pad")
    assert out.shape == (3, 40, 40) and out.dtype == np.uint8
    assert out[0, 20, 1:39].min() > 150 and out[0, 1:39, 20].min() > 150  # field fills the frame
    assert out[:, :2, :2].max() < 30  # corners stay black (outside the circle)


@pytest.mark.parametrize("mode,shape", [("pad", (60, 60)), ("crop", (30, 30))])
def test_oct_aspect(mode, shape):
    img = np.full((30, 60), 200, np.uint8)
    assert preprocess.fit_aspect(img, 32, 32, mode).shape == shape
    out = preprocess.prepare_pixels(img, "oct", (32, 32), mode)
    assert out.shape == (1, 32, 32)
    if mode == "pad":  # black bands above and below the scan
        assert out[0, 0].max() < 10 and out[0, 16].min() > 190
    else:
        assert out.min() > 190


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


def test_prepare_file_matches_pipeline_and_rejects_bad(tmp_path):
    path = tmp_path / "scan.jpeg"
    Image.fromarray(gradient(400, 500)).save(path, quality=90)
    out = preprocess.prepare_file(path, "oct", (32, 32), "crop", "all")
    assert len(out) == 1 and out[0].shape == (1, 32, 32) and out[0].dtype == np.uint8
    fundus = preprocess.prepare_file(path, "fundus", (28, 28), "pad", "all")
    assert fundus[0].shape == (3, 28, 28)
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="undecodable"):
        preprocess.prepare_file(bad, "oct", (32, 32), "crop", "all")


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


def test_missing_manifest_is_one_line_error(tmp_path, capsys):
    params = write_params(tmp_path)
    assert preprocess.main(["--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("retina-vae preprocess: error: ") and "\n" not in err
    assert "run retina-vae ingest first" in err


def _lit_fundus(
    size: int, tint: tuple[float, float, float], gradient_strength: float
) -> np.ndarray:
    """A disc with a dark vessel line, under a colour tint and a left-to-right light gradient."""
    yy, xx = np.mgrid[0:size, 0:size]
    inside = np.hypot(yy - size / 2, xx - size / 2) < size * 0.45
    light = 1.0 - gradient_strength * xx / size  # (H, W) vignetting-like falloff
    img = np.zeros((size, size, 3), np.float32)
    for c, t in enumerate(tint):
        img[..., c] = 180.0 * t * light
    img[size // 2 - 1 : size // 2 + 1, size // 4 : 3 * size // 4] *= 0.5  # the "vessel"
    img[~inside] = 0
    return img.astype(np.uint8)


def test_graham_evens_out_camera_colour_and_exposure():
    """Two photos of the same retina under different tint and lighting come out closer."""
    method = "graham"
    a = _lit_fundus(96, (1.0, 0.5, 0.25), 0.0)
    b = _lit_fundus(96, (0.7, 0.45, 0.35), 0.6)
    raw = [preprocess.prepare_pixels(i, "fundus", (64, 64), "pad").astype(float) for i in (a, b)]
    out = [
        preprocess.prepare_pixels(i, "fundus", (64, 64), "pad", illumination=method).astype(float)
        for i in (a, b)
    ]
    assert out[0].shape == (3, 64, 64)
    assert np.abs(out[0] - out[1]).mean() < 0.6 * np.abs(raw[0] - raw[1]).mean()
    if method == "graham":  # a flat field becomes mid-grey; the vessel stays darker than it
        centre = out[1][:, 24:40, 24:40]
        assert abs(np.median(centre) - 128) < 10
        assert out[1][:, 32, 24:40].mean() < out[1][:, 26, 24:40].mean() - 8
        assert out[1][:, :2, :2].max() == 0  # outside the field stays black


def test_clahe_evens_out_a_light_falloff():
    """CLAHE equalises luminance locally: the dim side of the field comes up towards the bright."""
    img = _lit_fundus(96, (1.0, 0.5, 0.25), 0.6).astype(float)
    texture = 1.0 + 0.15 * np.random.default_rng(0).standard_normal(img.shape[:2])  # (H, W)
    img = np.clip(img * texture[..., None], 0, 255).astype(np.uint8)  # real photos have texture

    def side_ratio(out: np.ndarray) -> float:
        lum = out.astype(float).mean(0)  # (H, W)
        return lum[24:40, 44:52].mean() / lum[24:40, 12:20].mean()  # right (dim) / left

    raw = preprocess.prepare_pixels(img, "fundus", (64, 64), "pad")
    out = preprocess.prepare_pixels(img, "fundus", (64, 64), "pad", illumination="clahe")
    assert side_ratio(raw) < 0.75
    assert side_ratio(out) > side_ratio(raw) + 0.1


def test_illumination_is_ignored_for_oct():
    img = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    plain = preprocess.prepare_pixels(img, "oct", (32, 32), "pad")
    np.testing.assert_array_equal(
        preprocess.prepare_pixels(img, "oct", (32, 32), "pad", illumination="graham"), plain
    )
