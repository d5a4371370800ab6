"""One decode per image: ingest's decode feeds preprocess (pipeline.pixel_cache), and the
outputs are the same bytes as decoding twice, the way preprocess did before the cache."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline import ingest, pixel_cache, pixels, preprocess, processed, readers
from pipeline.io import write_json
from pipeline.params import load_params
from tests.pipeline.dicom_factory import OCT_TOMOGRAPHY, gradient, make_dicom, write_params

READ_IMAGE = readers.read_image  # the real decoder, kept before any test wraps it


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """(H, W, 3) uint8: a bright disc on black with smooth colour and some texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    base = np.stack([200 - 60 * r, 90 + 40 * np.sin(xx / 37.0), 40 + 30 * np.cos(yy / 23.0)], -1)
    img = base + rng.normal(0, 12, (h, w, 3))
    img[r > 0.95] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def _collection(root: Path) -> None:
    """Every path through the cache: hits (large JPEG, PNG, DICOM) and misses (a small JPEG
    whose two decodes fall on different DCT scales; a DICOM volume with a duplicate frame)."""
    for label in ("A", "B"):
        (root / label).mkdir(parents=True)
    Image.fromarray(_photo(1100, 1300, 0)).save(root / "A" / "big-1.jpeg", quality=90)
    Image.fromarray(_photo(1024, 1024, 1)).save(root / "B" / "big-2.jpg", quality=85)
    Image.fromarray(_photo(260, 300, 2)).save(root / "A" / "mid-3.png")
    Image.fromarray(_photo(200, 200, 3)).save(root / "B" / "small-4.jpeg", quality=90)
    vol = np.stack([gradient(96, 80, seed=s) for s in (5, 6)])  # 8-bit, 2 distinct frames
    make_dicom(root / "A" / "vol-5.dcm", vol, sop_class=OCT_TOMOGRAPHY)
    wide = np.stack([gradient(96, 80, seed=s).astype(np.uint16) * 200 for s in (7, 8, 7)])
    make_dicom(root / "B" / "vol-6.dcm", wide, sop_class=OCT_TOMOGRAPHY)  # frame 2 = frame 0
    Image.fromarray(_photo(1100, 1300, 0)).save(root / "B" / "copy-7.png")  # not a JPEG copy


def _change_big_1(root: Path) -> None:
    """Change a file ingest prepared, after ingest: other pixels, another modification time."""
    Image.fromarray(_photo(1100, 1300, 9)).save(root / "A" / "big-1.jpeg", quality=90)
    os.utime(root / "A" / "big-1.jpeg", ns=(1, 1))


def _params(tmp_path: Path, src: Path, **pre) -> Path:
    return write_params(
        tmp_path,
        ingest={"source": str(src), "modality": "fundus", "patient_pattern": r"^[a-z]+-(\d+)"},
        preprocess={"image_size": [32, 32], "illumination": "graham", **pre},
    )


def _reference(params_file: Path, out: Path) -> None:
    """preprocess as it was before the cache: every file decoded again at preprocess's draft,
    all pixels in memory, np.save per split."""
    params = load_params(params_file)
    pp = params.preprocess
    df = pd.read_parquet(params.paths.manifest).reset_index(drop=True)
    df["split"] = preprocess.assign_splits(df, pp.val_fraction, pp.test_fraction, pp.seed)
    size = tuple(pp.image_size)
    images = np.zeros((len(df), 3, *size), np.uint8)
    for src, rows in df.groupby("source", sort=False).indices.items():
        frames = [int(f) for f in df["frame"].iloc[rows]]
        d = READ_IMAGE(Path(params.ingest.source) / src, draft=(max(size),) * 2, frames=frames)
        for r, (_, px) in zip(rows, d.frames, strict=True):
            images[r] = pixels.prepare_pixels(
                px, "fundus", size, pp.oct_aspect, illumination=pp.illumination
            )
    out.mkdir(parents=True)
    for split in processed.SPLITS:
        rows = np.flatnonzero((df["split"] == split).to_numpy())
        np.save(out / f"{split}_images.npy", images[rows])
        df.iloc[rows][processed.TABLE_COLUMNS].to_parquet(out / f"{split}.parquet", index=False)
    record = {"ingest.modality": "fundus", "preprocess.oct_aspect": pp.oct_aspect,
              "preprocess.illumination": pp.illumination}  # fmt: skip
    write_json(out / processed.RECORD, record)  # how the images were made, beside them


def _same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture
def decodes(monkeypatch) -> Counter:
    """File name -> how many times the real decoder ran on it (workers=1: in this process)."""
    calls: Counter = Counter()

    def counting(path, **kwargs):
        calls[Path(path).name] += 1
        return READ_IMAGE(path, **kwargs)

    monkeypatch.setattr(readers, "read_image", counting)
    return calls


def test_one_decode_per_image_and_the_same_bytes(tmp_path, decodes, caplog):
    caplog.set_level(logging.INFO)
    src = tmp_path / "photos"
    _collection(src)
    params = _params(tmp_path, src)
    assert ingest.main(["--params", str(params)]) == 0
    assert preprocess.main(["--params", str(params)]) == 0
    p = load_params(params).paths
    manifest = pd.read_parquet(p.manifest)
    assert len(manifest) == 9 and Counter(manifest["source"])["B/vol-6.dcm"] == 2  # a dup frame
    _reference(params, tmp_path / "reference")
    _same_files(Path(p.processed), tmp_path / "reference")
    assert decodes == {
        "big-1.jpeg": 1,  # 1100 px: both bounds decode at 1/8 -- one decode
        "big-2.jpg": 1,
        "mid-3.png": 1,  # no reduced decoding for PNG or DICOM: always one decode
        "vol-5.dcm": 1,
        "copy-7.png": 1,
        "small-4.jpeg": 2,  # 200 px: 1/2 for ingest's check, 1/4 for 32 px -- two scales
        "vol-6.dcm": 2,  # a frame dropped as a duplicate: preprocess decodes the kept ones
    }
    assert "pixels: 6 from ingest's decode, 3 decoded here" in caplog.text
    # ingest's own outputs are what its check-scale decode gives, as before
    for row in manifest.itertuples():
        frames = dict(READ_IMAGE(src / row.source, draft=ingest.CHECK_SIZE).frames)
        assert row.content_hash == ingest.pixel_hash(frames[row.frame])


def test_any_mismatch_decodes_again_with_the_same_result(tmp_path, decodes, caplog):
    src = tmp_path / "photos"
    _collection(src)
    params = _params(tmp_path, src)
    p = load_params(params).paths
    assert ingest.main(["--params", str(params)]) == 0
    cache = pixel_cache.cache_dir(load_params(params))
    rows = json.loads((cache / "meta.json").read_text())["rows"]
    assert rows == 1 + 1 + 1 + 2 + 3 + 1  # every decoded frame but small-4's

    # other preprocess params, ingest not re-run: nothing from the cache, same bytes as before
    raw = yaml.safe_load(params.read_text())
    raw["preprocess"].update(image_size=[48, 40], illumination="clahe")
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    decodes.clear()
    assert preprocess.main(["--params", str(other)]) == 0
    assert decodes == Counter({n: 1 for n in decodes}) and len(decodes) == 7
    _reference(other, tmp_path / "ref-other")
    _same_files(Path(p.processed), tmp_path / "ref-other")

    # a source file changed after ingest: that file is decoded again (its new pixels), the
    # rest still come from the cache
    _change_big_1(src)
    decodes.clear()
    assert preprocess.main(["--params", str(params)]) == 0
    assert decodes["big-1.jpeg"] == 1 and decodes["mid-3.png"] == 0
    _reference(params, tmp_path / "ref-changed")
    _same_files(Path(p.processed), tmp_path / "ref-changed")

    # a cache that is not this manifest's, or is damaged, is not used at all
    for damage in ("manifest", "pixels"):
        if damage == "manifest":
            pd.read_parquet(p.manifest).iloc[::-1].to_parquet(p.manifest, index=False)
        else:
            with open(cache / "pixels.bin", "r+b") as f:
                f.truncate(100)
        decodes.clear()
        assert preprocess.main(["--params", str(params)]) == 0
        assert sum(decodes.values()) == 7
        _reference(params, tmp_path / f"ref-{damage}")
        _same_files(Path(p.processed), tmp_path / f"ref-{damage}")


def test_an_npz_source_leaves_no_cache(tmp_path):
    src = tmp_path / "photos"
    _collection(src)
    params = _params(tmp_path, src)
    assert ingest.main(["--params", str(params)]) == 0
    cache = pixel_cache.cache_dir(load_params(params))
    assert (cache / "meta.json").is_file()
    npz = tmp_path / "m.npz"
    np.savez(
        npz,
        train_images=np.zeros((3, 28, 28, 3), np.uint8)
        + np.arange(3)[:, None, None, None].astype(np.uint8),
        train_labels=np.arange(3),
    )
    params = write_params(
        tmp_path, ingest={"source": str(npz), "modality": "fundus", "min_size": 28}
    )
    assert ingest.main(["--params", str(params)]) == 0
    assert not cache.exists()


def _same_on_ray(out: Path, reference: Path) -> None:
    """The Ray engine's shards hold the reference arrays; the tables are the same bytes."""
    for split in processed.SPLITS:
        table = processed.table_path(out, split)
        assert table.read_bytes() == processed.table_path(reference, split).read_bytes()
        shards = [np.load(f) for f in processed.image_files(out, split)]
        expected = np.load(reference / f"{split}_images.npy")
        assert np.array_equal(np.concatenate(shards), expected), split


def test_ray_ingest_feeds_ray_preprocess_and_a_stale_entry_is_not_used(
    ray_session, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    src = tmp_path / "photos"
    _collection(src)
    params = _params(tmp_path, src)
    raw = yaml.safe_load(params.read_text())
    raw["data"].update(engine="ray")
    params.write_text(yaml.safe_dump(raw))
    p = load_params(params).paths
    assert ingest.main(["--params", str(params)]) == 0
    cache = pixel_cache.cache_dir(load_params(params))
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["rows"] == 9 and meta["files"]["pixels.bin"] == 0  # all in the tasks' parts
    assert preprocess.main(["--params", str(params)]) == 0
    assert "pixels: 6 from ingest's decode, 3 decoded here" in caplog.text  # as the local one
    _reference(params, tmp_path / "reference")
    _same_on_ray(Path(p.processed), tmp_path / "reference")

    # a source file changed after ingest: its entry is stale, so that file is decoded afresh
    _change_big_1(src)
    caplog.clear()
    assert preprocess.main(["--params", str(params)]) == 0
    assert "pixels: 5 from ingest's decode, 4 decoded here" in caplog.text
    _reference(params, tmp_path / "ref-changed")
    _same_on_ray(Path(p.processed), tmp_path / "ref-changed")


@pytest.mark.parametrize("side", [256, 600, 1024, 2000])
def test_every_jpeg_is_decoded_once_at_the_default_size(tmp_path, decodes, side):
    """The demo's 256 px photos and native 1024 px ones included: at the default 64 px target
    ingest's check scale is preprocess's draft, whatever the JPEG's size."""
    src = tmp_path / "photos"
    (src / "A").mkdir(parents=True)
    Image.fromarray(_photo(side, side + side // 3, side)).save(src / "A" / "p-1.jpg", quality=90)
    params = _params(tmp_path, src, image_size=[64, 64])
    assert ingest.main(["--params", str(params)]) == 0
    assert preprocess.main(["--params", str(params)]) == 0
    assert decodes == {"p-1.jpg": 1}


def test_a_cache_written_by_the_previous_decoding_is_not_used(tmp_path, monkeypatch):
    """Decoding changed (issue 17: upright, palette, alpha, Bits Stored): the key's format
    component changed with it, so pixels prepared by the old decoding are a miss, never a hit."""
    spec = {"modality": "oct", "image_size": [8, 8], "oct_aspect": "pad", "illumination": "none"}
    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"any manifest")
    assert pixel_cache.FORMAT >= 3

    def write(fmt: int) -> Path:
        monkeypatch.setattr(pixel_cache, "FORMAT", fmt)
        folder = tmp_path / f"prepared-{fmt}"
        writer = pixel_cache.CacheWriter(folder, spec)
        writer.add("a.png", [0], (1, 1), np.zeros((1, 1, 8, 8), np.uint8))
        writer.close(manifest)
        monkeypatch.undo()
        return folder

    old, new = write(2), write(pixel_cache.FORMAT)
    assert pixel_cache.PreparedCache.open(old, spec, manifest) is None
    assert pixel_cache.PreparedCache.open(new, spec, manifest) is not None
