"""The Ray Data engine (data.engine: ray) gives the local engine's outputs row for row, on a
real two-node Ray cluster (ray.cluster_utils), and training reads its shards."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline import demo, evaluate, ingest, preprocess, processed, train
from pipeline.params import load_params
from tests.pipeline.dicom_factory import gradient, malformed_tiff, write_params
from vae_core.distributed import make_loaders

REPO = Path(__file__).resolve().parents[2]

TWO_NODES = r"""
import os, sys
import ray
from ray.cluster_utils import Cluster
params = sys.argv[1]
# the driver's node has no CPU for tasks: every file is decoded on the two other nodes
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
cluster.add_node(num_cpus=1)
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
try:
    ray.init(address=cluster.address)
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    from pipeline import ingest, preprocess
    for stage in (ingest, preprocess):
        rc = stage.main(["--params", params])
        if rc:
            sys.exit(rc)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _source(tmp_path: Path) -> Path:
    """The demo collection (PNG, JPEG, DICOM volumes, a labels CSV) plus every kind of file
    ingest refuses: a truncated one, an empty one, a listed-but-missing one, one that cannot
    be read (a folder), one that breaks the decoder (a malformed TIFF), an exact copy."""
    (tmp_path / "demo").mkdir()
    params = write_params(tmp_path / "demo", demo={"patients": 6, "images_per_eye": 2})
    assert demo.main(["--params", str(params)]) == 0
    src = tmp_path / "src"
    shutil.copytree(load_params(params).paths.demo, src)
    table = pd.read_csv(src / "labels.csv", dtype=str)
    first = src / table["path"].iloc[0]
    (src / "images" / "trunc.png").write_bytes(first.read_bytes()[:200])
    (src / "images" / "empty.png").write_bytes(b"")
    Image.open(first).save(src / "images" / "copy.png")
    (src / "images" / "folder.png").mkdir()
    (src / "images" / "pages.tif").write_bytes(malformed_tiff(Image.open(first)))
    # decoded the same on both engines: a photo stored sideways (EXIF Orientation 6) and a
    # 16-bit multi-page TIFF whose pages differ in size (one scale for the file)
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = Image.open(first).convert("RGB").transpose(Image.Transpose.ROTATE_90)
    turned.save(src / "images" / "sideways.jpg", exif=exif, quality=95)
    pages = [
        Image.fromarray(gradient(60, 80, seed=s).astype(np.uint16) * m)
        for s, m in ((1, 200), (2, 20))
    ]
    pages[1] = pages[1].resize((70, 50))
    pages[0].save(src / "images" / "volume.tif", save_all=True, append_images=pages[1:])
    extra = [
        ("images/sideways.jpg", "CNV", "993", "R"),
        ("images/volume.tif", "DME", "992", "L"),
        ("images/trunc.png", "DME", "999", "R"),
        ("images/empty.png", "DME", "998", "L"),
        ("images/missing.png", "DME", "997", "L"),
        ("images/folder.png", "DME", "995", "L"),
        ("images/pages.tif", "DME", "994", "R"),
        ("images/copy.png", "NORMAL", "996", "R"),
    ]
    columns = ["path", "label", "patient_id", "eye"]  # no severity: left empty
    table = pd.concat([table, pd.DataFrame(extra, columns=columns)], ignore_index=True)
    table.to_csv(src / "labels.csv", index=False)
    return src


def _params(root: Path, src: Path, **data) -> Path:
    root.mkdir(exist_ok=True)
    return write_params(
        root,
        ingest={"source": str(src), "labels": str(src / "labels.csv"), "workers": 2},
        preprocess={"workers": 2, "val_fraction": 0.2, "test_fraction": 0.2},
        data={"engine": "local", "shard_size": 5, **data},
    )


@pytest.mark.slow
def test_ray_engine_matches_the_local_engine_on_two_nodes(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    src = _source(tmp_path)
    local = _params(tmp_path / "local", src)
    for stage in (ingest, preprocess):
        assert stage.main(["--params", str(local)]) == 0
    on_ray = _params(tmp_path / "ray", src, engine="ray")
    script = tmp_path / "two_nodes.py"
    script.write_text(TWO_NODES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run(
        [sys.executable, str(script), str(on_ray)],
        env=env,
        cwd=REPO,
        timeout=500,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # the tasks ran on the worker nodes, none on the driver's (the stages log where); ingest's
    # tasks prepared the training pixels from their own decode (pipeline.pixel_cache) and
    # preprocess's decode only the 5 files that cache does not cover, as the local engine
    used = "pixels: 22 from ingest's decode, 5 decoded here"
    assert used in caplog.text and used in done.stderr, done.stderr
    for stage, files in (("ingest", 22), ("preprocess", 5)):  # missing.png: no file to read
        line = re.search(
            rf"{stage} on Ray Data: (\d+) files over (\d) node\(s\) \((\d+) on", done.stderr
        )
        assert line and line.groups()[0] == str(files) and line.groups()[2] == "0", done.stderr
    a, b = load_params(local).paths, load_params(on_ray).paths
    report = json.loads(Path(b.ingest_report).read_text())
    assert (report["quarantined"], report["duplicates"], report["listed_missing"]) == (4, 1, 1)
    reasons = dict(pd.read_csv(b.quarantine).itertuples(index=False))
    assert reasons == {
        "images/trunc.png": reasons["images/trunc.png"],
        "images/empty.png": "empty file",
        "images/folder.png": "unreadable file (Is a directory)",
        "images/pages.tif": "undecodable image (TypeError)",
    }
    assert reasons["images/trunc.png"].startswith("undecodable image")
    m = pd.read_parquet(b.manifest)
    size = {(s, f): (w, h) for s, f, w, h in m[["source", "frame", "width", "height"]].values}
    with Image.open(src / "images" / "copy.png") as upright:  # the picture stored sideways
        assert size[("images/sideways.jpg", 0)] == upright.size  # recorded upright
    assert (size[("images/volume.tif", 0)], size[("images/volume.tif", 1)]) == ((80, 60), (70, 50))
    for name in ("manifest", "quarantine", "duplicates", "ingest_report", "preprocess_report"):
        assert Path(getattr(a, name)).read_bytes() == Path(getattr(b, name)).read_bytes(), name
    assert list((Path(b.manifest).parent / "prepared").glob("part-*.bin"))  # the tasks' parts
    for split in processed.SPLITS:
        pa, pb = Path(a.processed), Path(b.processed)
        assert (pa / f"{split}.parquet").read_bytes() == (pb / f"{split}.parquet").read_bytes()
        files = processed.image_files(pb, split)
        assert (
            files[0].parent.name == f"{split}_images" and not (pb / f"{split}_images.npy").exists()
        )
        sizes = [len(np.load(f, mmap_mode="r")) for f in files]
        assert all(n == 5 for n in sizes[:-1]) and 0 < sizes[-1] <= 5 or sizes == [0]
        local_images = np.load(pa / f"{split}_images.npy")
        assert np.array_equal(np.concatenate([np.load(f) for f in files]), local_images)

    # training reads the shards: same checks, same items, same batches in the same order
    assert train.check_processed(Path(b.processed)) == train.check_processed(Path(a.processed))
    (ta, va), (tb, vb) = train.ProcessedData(a.processed)(), train.ProcessedData(b.processed)()
    assert len(tb) == len(ta) > 5 and len(vb) == len(va)
    pairs = zip(make_loaders(ta, va, 4, 0, 1, 2), make_loaders(tb, vb, 4, 0, 1, 2), strict=True)
    for loaders in pairs:
        for x, y in zip(*loaders, strict=True):
            assert torch.equal(x, y)


@pytest.mark.slow
def test_training_runs_on_the_shards(ray_session, tmp_path):
    src = _source(tmp_path)
    params = _params(tmp_path, src, engine="ray", shard_size=4)
    raw = yaml.safe_load(params.read_text())
    raw["train"].update(epochs=1, num_workers=2, batch_size=8)
    raw["model"].update(latent_dim=4, widths=[8, 16])
    raw["tracking"].update(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="test")
    raw["evaluate"].update(iwae_k=4, map_method="pca", traversal_dims=1, traversal_steps=3)
    params.write_text(yaml.safe_dump(raw))
    for stage in (ingest, preprocess, train, evaluate):
        assert stage.main(["--params", str(params)]) == 0
    p = load_params(params).paths
    assert len(processed.image_files(p.processed, "train")) > 1
    metrics = json.loads(Path(p.train_metrics).read_text())
    assert metrics["epochs"] == 1 and np.isfinite(metrics["train"]["neg_elbo"])
    embeddings = pd.read_parquet(Path(p.evaluation) / "embeddings.parquet")
    manifest = pd.read_parquet(p.manifest)
    assert sorted(embeddings["image_id"]) == sorted(manifest["image_id"])  # every shard row
