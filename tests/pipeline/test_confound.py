"""The confound report: does the latent read the camera better than the disease?

A synthetic collection where one class (DME) comes only from a second camera whose photos
have a red colour cast: a latent space that keeps the cast (here the first principal
components of the pixels, a linear encoder) reads the camera perfectly and the label only
partly, and the report must say so. Without the cast it must stay quiet.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient
from sklearn.decomposition import PCA

from pipeline import evaluate
from pipeline.latent import (
    UNKNOWN_VALUE,
    attribute_probe,
    confound_report,
    metadata_attributes,
)
from vae_core.checkpoint import save_checkpoint
from vae_core.model import ConvVAE, VAEConfig

REPO = Path(__file__).resolve().parents[2]

CLASSES = ("NORMAL", "CNV", "DME")
PATIENT_FOLDERS = {"^siteA/": "MRN100001_DOE/", "^siteB/": "MRN100002_ROE/"}
SIZE = 16


def collection(
    n: int, seed: int, cast: bool, noise: float = 25.0, spot: bool = True
) -> tuple[np.ndarray, pd.DataFrame]:
    """(n, 3, 16, 16) uint8 fundus-like images and their processed-table rows.

    CNV images carry a faint bright spot somewhere (when ``spot``); DME images come from
    camera "siteB", whose photos have a red cast (when ``cast``); NORMAL and CNV from "siteA".
    """
    rng = np.random.default_rng(seed)
    labels = np.array(CLASSES)[np.arange(n) % 3]
    images = rng.normal(110, noise, (n, 3, SIZE, SIZE))  # (N, C, H, W)
    for i, label in enumerate(labels):
        if label == "CNV" and spot:
            y, x = rng.integers(2, SIZE - 4, 2)
            images[i, :, y : y + 3, x : x + 3] += 40
        if label == "DME" and cast:
            images[i, 0] += 70  # red up
            images[i, 2] -= 40  # blue down
    site = np.where(labels == "DME", "siteB", "siteA")
    ext = np.where(labels == "DME", "dcm", "jpeg")
    meta = pd.DataFrame(
        {
            "image_id": [f"img-{seed}-{i:04d}" for i in range(n)],
            "label": labels,
            "subject_id": [f"s{i // 4}" for i in range(n)],
            "eye": rng.choice(["OD", "OS"], n),
            "modality": "fundus",
            "source": [f"{s}/{i:04d}.{e}" for i, (s, e) in enumerate(zip(site, ext, strict=True))],
            "frame": 0,
        }
    )
    return np.clip(images, 0, 255).astype(np.uint8), meta


def encode(train: np.ndarray, test: np.ndarray, dims: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A linear encoder: the first principal components of the pixels (fit on train)."""
    pca = PCA(dims, random_state=0).fit(train.reshape(len(train), -1) / 255.0)
    return (pca.transform(x.reshape(len(x), -1) / 255.0) for x in (train, test))


def report_for(cast: bool):
    train_x, train_meta = collection(240, 0, cast)
    test_x, test_meta = collection(120, 1, cast)
    train_z, test_z = encode(train_x, test_x)
    attrs = [metadata_attributes(m).assign(label=m["label"]) for m in (train_meta, test_meta)]
    return confound_report(train_z, attrs[0], test_z, attrs[1], seed=0)


def test_a_camera_confound_is_reported_with_a_warning():
    report = report_for(cast=True)
    m = report.metrics
    assert m["confound_source_folder"] == pytest.approx(1.0)  # the cast gives the camera away
    assert m["confound_source_folder_majority"] == pytest.approx(2 / 3)
    assert 0.3 < m["confound_eye"] < 0.7 and "confound_eye_majority" in m  # eye: chance
    table = report.table.set_index("attribute")
    assert table.loc["source_folder", "kind"] == "acquisition"
    assert table.loc["eye", "kind"] == "other"
    assert table.loc["label", "skill"] < table.loc["source_folder", "skill"] == pytest.approx(1.0)
    (warning,) = report.warnings
    assert "source_folder better than the label" in warning
    assert "not disease" in warning


def test_no_cast_no_warning():
    report = report_for(cast=False)
    assert report.warnings == []
    assert report.metrics["confound_source_folder"] < 0.85


def test_attribute_probe_skips_what_cannot_be_measured():
    z = np.random.default_rng(0).normal(size=(10, 2))
    one = pd.Series(["OD"] * 10)
    assert attribute_probe(z, one, z, one) == ({}, "1 value(s) among the train images")
    unknown = pd.Series([UNKNOWN_VALUE] * 5 + ["OD", "OS"] * 2 + [None])
    result, why = attribute_probe(z, unknown, z, unknown)
    assert why is None and result["test_images"] == 4 and result["classes"] == 2


def test_metadata_attributes_from_table_columns():
    meta = pd.DataFrame(
        {
            "eye": ["OD", None, "OS"],
            "source": ["siteA/x/1.jpeg", "2.png", "siteB\\3.dcm"],
            "manufacturer": ["Topcon", "Zeiss", None],
            "width": [512, 512, 2000],
            "height": [512, 496, 1500],
        }
    )
    attrs = metadata_attributes(meta)
    assert attrs["eye"].tolist() == ["OD", UNKNOWN_VALUE, "OS"]
    # codes in the sorted order of the names, never the names (one may be a patient's)
    assert attrs["source_folder"].tolist() == ["folder 1", UNKNOWN_VALUE, "folder 2"]
    assert attrs["manufacturer"].tolist() == ["Topcon", "Zeiss", UNKNOWN_VALUE]
    assert attrs["size_class"].tolist() == ["512x512", "512x496", "2000x1500"]
    npz = metadata_attributes(pd.DataFrame({"source": ["train_images[0]", "val_images[3]"]}))
    assert list(npz.columns) == []  # no folders, no sizes: nothing to probe


def test_patient_folders_never_become_an_attribute():
    """A folder per patient (its name may be an identifier) is not shown or probed."""
    meta = pd.DataFrame(
        {
            "source": [f"Doe^John{i // 2}/scan{i}.dcm" for i in range(8)],
            "subject_id": [f"s{i // 2}" for i in range(8)],
        }
    )
    assert "source_folder" not in metadata_attributes(meta)
    many = pd.DataFrame({"source": [f"folder{i}/x.png" for i in range(50)]})
    assert "source_folder" not in metadata_attributes(many)
    sites = meta.assign(source=[f"site{i % 3}/scan{i}.dcm" for i in range(8)])
    assert metadata_attributes(sites)["source_folder"].nunique() == 3
    # two patients, two folders: still one per patient (no minimum number of folders)
    two = pd.DataFrame(
        {
            "source": ["MRN100001_DOE/a.jpg", "MRN100001_DOE/b.jpg", "MRN100002_ROE/c.jpg"],
            "subject_id": ["s-1", "s-1", "s-2"],
        }
    )
    assert "source_folder" not in metadata_attributes(two)


def test_many_image_sizes_are_binned_by_the_longer_side():
    sides = np.arange(100, 3000, 150)
    attrs = metadata_attributes(pd.DataFrame({"width": sides, "height": sides // 2}))
    assert attrs["size_class"].iloc[0] == "<256 px" and attrs["size_class"].iloc[-1] == ">=2048 px"
    assert attrs["size_class"].nunique() == 5


# ----------------------------------------------------------------------------- the stage


def _stage_setup(root: Path) -> Path:
    """Processed arrays of a camera collection (RGB 16 px), its manifest, an (untrained)
    checkpoint and a params file, all under ``root``.

    The collection is made for an untrained encoder: little noise and no CNV spot, so the only
    signal is the red cast of camera B (all DME images): any encoder separates the cameras,
    and reads the label only as far as the camera gives it away (DME vs the rest)."""
    processed = root / "processed"
    processed.mkdir()
    manifest = []
    for seed, (split, n) in enumerate({"train": 120, "val": 12, "test": 60}.items()):
        images, meta = collection(n, seed, cast=True, noise=4.0, spot=False)
        meta = meta.assign(split=split, subject_id=[f"SUBJ-{split}-{i:04d}" for i in range(n)])
        meta["image_id"] = meta["image_id"].str.replace("img-", f"img-{split}-")
        np.save(processed / f"{split}_images.npy", images)
        # as preprocess writes them: the source paths (and the original sizes; camera B's
        # photos are larger) live in the manifest only
        meta.drop(columns="source").to_parquet(processed / f"{split}.parquet", index=False)
        big = meta["source"].str.startswith("siteB")
        # folders named like patients, with many images and no patient ID in them: they look
        # like sites, and their names must not reach an output (PATIENT_FOLDERS)
        source = meta["source"].replace(PATIENT_FOLDERS, regex=True)
        manifest.append(meta.assign(source=source, width=np.where(big, 3000, 2000), height=2000))
    pd.concat(manifest).to_parquet(root / "manifest.parquet", index=False)
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(in_channels=3, height=SIZE, width=SIZE, widths=(8, 16), latent_dim=6))
    save_checkpoint(root / "vae.pt", model, extra={})
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"].update(
        processed=str(processed),
        manifest=str(root / "manifest.parquet"),
        model=str(root / "vae.pt"),
        train_history=str(root / "history.csv"),
        evaluation=str(root / "evaluation"),
        eval_metrics=str(root / "eval.json"),
    )
    params["evaluate"].update(iwae_k=4, map_method="pca", traversal_dims=1, traversal_steps=3)
    params["tracking"].update(uri=f"sqlite:///{root / 'mlflow.db'}", experiment="confound")
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.slow
def test_evaluate_reports_the_camera_confound(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _stage_setup(tmp_path)
    assert evaluate.main(["--params", str(params)]) == 0

    metrics = json.loads((tmp_path / "eval.json").read_text())
    for attr in ("eye", "source_folder", "size_class"):
        assert 0.0 <= metrics[f"test_confound_{attr}"] <= 1.0
        assert 0.0 < metrics[f"test_confound_{attr}_majority"] < 1.0
    assert metrics["test_confound_source_folder"] > metrics["test_confound_source_folder_majority"]
    table = pd.read_csv(tmp_path / "evaluation" / "tables" / "confounds.csv")
    assert table["attribute"].tolist() == ["label", "eye", "source_folder", "size_class"]
    assert "reads source_folder better than the label" in caplog.text
    assert "confound" in caplog.text and "WARNING" in caplog.text.upper()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("confound").experiment_id])
    assert run.data.metrics["confound/source_folder"] == metrics["test_confound_source_folder"]
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/tables")}
    assert {"evaluation/tables/confounds.csv", "evaluation/tables/confounds.json"} <= tables

    # the map can be coloured by the same attributes; no subject id reaches it
    html = (tmp_path / "evaluation" / "latent_map.html").read_text()
    tag = '<script type="application/json" id="map-data">'
    data = json.loads(html[html.index(tag) + len(tag) : html.index("</script>", html.index(tag))])
    categories = [c for c, v in data["columns"].items() if v["kind"] == "category"]
    assert categories == ["label", "split", "eye", "source_folder", "size_class"]
    assert data["columns"]["size_class"]["names"] == ["2000x2000", "3000x2000"]
    assert "SUBJ-" not in html
    assert data["columns"]["source_folder"]["names"] == ["folder 1", "folder 2"]

    # the folders are named like patients: no name reaches a file evaluate wrote or logged
    logged = download_artifacts(
        run_id=run.info.run_id,
        dst_path=str(tmp_path / "logged"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    outputs = [tmp_path / "eval.json", *(tmp_path / "evaluation").rglob("*")]
    outputs += list(Path(logged).rglob("*"))
    assert sum(p.suffix == ".html" for p in outputs) >= 2  # the map, here and as logged
    for path in filter(Path.is_file, outputs):
        assert b"MRN10000" not in path.read_bytes(), path
    assert "MRN10000" not in json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
