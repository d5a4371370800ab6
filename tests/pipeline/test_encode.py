"""``retina-vae encode``: latent means of image files and folders, bad files listed."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from sklearn.decomposition import PCA

from pipeline import latent
from pipeline.encode import main
from pipeline.html_map import latent_map, read_payload
from pipeline.params import load_params
from pipeline.pixels import prepare_file, prepare_pixels
from pipeline.processed import preprocessing
from vae_core.checkpoint import save_checkpoint
from vae_core.model import ConvVAE, VAEConfig

REPO = Path(__file__).resolve().parents[2]
SIZE, J = 32, 3


def _model(root: Path, channels: int = 1, extra: dict | None = None) -> ConvVAE:
    """A small untrained model saved at ``root/vae.pt``; ``extra`` None: a checkpoint from
    before train recorded the preprocessing."""
    torch.manual_seed(0)
    model = ConvVAE(
        VAEConfig(in_channels=channels, height=SIZE, width=SIZE, widths=(4, 8), latent_dim=J)
    )
    save_checkpoint(root / "vae.pt", model, extra=extra)
    return model.eval()


def _params(root: Path, modality: str = "oct") -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["modality"] = modality
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _photo(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    _photo(images / "a.png", 0)
    _photo(images / "sub" / "b.jpg", 1)
    (images / "notes.txt").write_text("not an image")  # a sidecar: skipped, not an error
    (images / ".thumbnails").mkdir()  # a file manager's copies: a hidden folder, skipped
    _photo(images / ".thumbnails" / "a.png", 5)
    # a two-frame TIFF: one row per frame
    frames = [Image.fromarray(np.full((40, 40), v, np.uint8)) for v in (30, 200)]
    frames[0].save(images / "volume.tif", save_all=True, append_images=frames[1:])
    return images


def test_encode_folder_matches_the_model_on_preprocessed_pixels(tmp_path, folder):
    model = _model(tmp_path)
    out = tmp_path / "latents.csv"
    argv = ["--params", str(_params(tmp_path)), "--model", str(tmp_path / "vae.pt")]
    assert main([*argv, "--out", str(out), str(folder)]) == 0
    table = pd.read_csv(out)
    sigmas = [f"sigma_{j}" for j in range(J)]
    assert list(table.columns) == ["path", "frame"] + [f"mu_{j}" for j in range(J)] + sigmas
    names = [Path(p).name for p in table["path"]]
    assert names == ["a.png", "b.jpg", "volume.tif", "volume.tif"]
    assert table["frame"].tolist() == [0, 0, 0, 1]
    # the same preprocessing by hand, then the encoder: identical latent means
    pixels = prepare_file(folder / "sub" / "b.jpg", "oct", (SIZE, SIZE), "pad", "all")[0]
    with torch.no_grad():
        mu, _ = model.encode(torch.tensor(pixels[None]).float() / 255.0)
    row = table[[n == "b.jpg" for n in names]]
    np.testing.assert_allclose(row[[f"mu_{j}" for j in range(J)]].to_numpy()[0], mu[0], atol=1e-5)
    sigma = torch.exp(0.5 * _).numpy()[0]  # the posterior standard deviation
    np.testing.assert_allclose(row[sigmas].to_numpy()[0], sigma, rtol=1e-5)
    # the two TIFF frames differ, so do their latents
    vol = table[[n == "volume.tif" for n in names]].filter(like="mu_").to_numpy()
    assert not np.allclose(vol[0], vol[1])


def test_a_folder_given_inside_a_hidden_one_is_encoded(tmp_path):
    """Only folders hidden *below* the one named are skipped: ~/.cache/scans is the user's."""
    _model(tmp_path)
    images = tmp_path / ".cache" / "scans"
    images.mkdir(parents=True)
    _photo(images / "a.png", 0)
    out = tmp_path / "latents.csv"
    argv = ["--params", str(_params(tmp_path)), "--model", str(tmp_path / "vae.pt")]
    assert main([*argv, "--out", str(out), str(images)]) == 0
    assert [Path(p).name for p in pd.read_csv(out)["path"]] == ["a.png"]


def test_bad_files_are_listed_and_the_rest_written(tmp_path, folder, capsys, caplog):
    _model(tmp_path)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    _photo(folder / "tiny.png", 2, size=(10, 10))
    out = tmp_path / "latents.parquet"
    argv = ["--params", str(_params(tmp_path)), "--model", str(tmp_path / "vae.pt")]
    assert main([*argv, "--out", str(out), str(folder), str(tmp_path / "missing.png")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    listed = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(listed) == 3 and all("\n" not in line for line in listed)
    for name in ("broken.jpg: undecodable", "tiny.png: too small", "missing.png: file not found"):
        assert any(name in line for line in listed), name
    assert "retina-vae encode: error: 3 file(s) could not be encoded" in err
    assert len(pd.read_parquet(out)) == 4  # a.png, b.jpg, two TIFF frames


def test_npz_rows_are_encoded(tmp_path):
    _model(tmp_path, channels=3)
    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, test_images=rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8),
             test_labels=np.zeros((5, 1), np.uint8))  # fmt: skip
    out = tmp_path / "latents.csv"
    argv = ["--params", str(_params(tmp_path, "fundus")), "--model", str(tmp_path / "vae.pt")]
    assert main([*argv, "--out", str(out), str(npz)]) == 0
    table = pd.read_csv(out)
    assert table["path"].tolist() == [f"{npz}:test_images"] * 5
    assert table["frame"].tolist() == list(range(5))


def test_modality_that_does_not_fit_the_model_is_a_one_line_error(tmp_path, folder, capsys):
    _model(tmp_path, channels=1)
    argv = ["--params", str(_params(tmp_path, "fundus")), "--model", str(tmp_path / "vae.pt")]
    assert main([*argv, "--out", str(tmp_path / "l.csv"), str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("retina-vae encode: error: ingest.modality: fundus")
    assert not (tmp_path / "l.csv").exists()


def _params_with(root: Path, modality: str, preprocess: dict) -> Path:
    """``root/params.yaml``: the repository's, with this modality and these preprocess params."""
    params = yaml.safe_load(_params(root, modality).read_text())
    params["preprocess"].update(preprocess)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root / "params.yaml"


def _encode_files(root: Path, paths: list[Path], modality: str, preprocess: dict) -> np.ndarray:
    """``retina-vae encode`` of ``paths`` with these preprocess params -> (N, J) mu."""
    out = root / "latents.csv"
    params = _params_with(root, modality, preprocess)
    argv = ["--params", str(params), "--model", str(root / "vae.pt"), "--out", str(out)]
    assert main([*argv, *map(str, paths)]) == 0
    return pd.read_csv(out).filter(regex=r"^mu_\d+$").to_numpy()


def _encode_npz(tmp_path: Path, rows: np.ndarray, modality: str, preprocess: dict) -> np.ndarray:
    """``retina-vae encode`` on an .npz of ``rows`` with these preprocess params -> (N, J) mu."""
    npz = tmp_path / "rows.npz"
    np.savez(npz, test_images=rows)
    return _encode_files(tmp_path, [npz], modality, preprocess)


def test_npz_rows_are_encoded_from_the_pixels_preprocess_trains_on(tmp_path):
    """No field-of-view crop for .npz rows, and the params' illumination step, as preprocess."""
    model = _model(tmp_path, channels=3)
    rows = np.zeros((2, 40, 40, 3), np.uint8)
    rows[:, 5:35, 5:35] = (200, 90, 40)  # a bright square inside a dark frame: a crop would zoom
    rows[1, 10:30, 10:30] = (60, 30, 20)
    got = _encode_npz(tmp_path, rows, "fundus", {"illumination": "graham"})
    pixels = np.stack(
        [prepare_pixels(r, "fundus", (SIZE, SIZE), "pad", False, "graham") for r in rows]
    )
    with torch.no_grad():
        mu, _ = model.encode(torch.from_numpy(pixels).float() / 255)
    np.testing.assert_allclose(got, mu.numpy(), rtol=1e-4, atol=1e-5)


def test_npz_oct_rows_follow_the_params_aspect_rule(tmp_path):
    """A wide OCT row with ``oct_aspect: crop`` is cropped, as preprocess crops it, not padded."""
    model = _model(tmp_path, channels=1)
    rows = np.random.default_rng(3).integers(0, 256, (2, 20, 60), dtype=np.uint8)  # (N,H,W)
    got = _encode_npz(tmp_path, rows, "oct", {"oct_aspect": "crop"})
    crop, pad = (
        np.stack([prepare_pixels(r, "oct", (SIZE, SIZE), rule, False) for r in rows])
        for rule in ("crop", "pad")
    )
    assert not np.array_equal(crop, pad)  # the rule matters for this row
    with torch.no_grad():
        mu, _ = model.encode(torch.from_numpy(crop).float() / 255)
    np.testing.assert_allclose(got, mu.numpy(), rtol=1e-4, atol=1e-5)


def _fundus_photo(path: Path) -> Path:
    """An RGB photo whose pixels Graham's illumination step changes: a lit disc, uneven."""
    yy, xx = np.mgrid[0:60, 0:64]
    disc = (yy - 30) ** 2 + (xx - 32) ** 2 < 26**2
    rgb = np.stack([150 + xx, 60 + yy, 30 + (xx + yy) // 4], axis=2) * disc[..., None]
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def _mu(model: ConvVAE, pixels: np.ndarray) -> np.ndarray:
    """The model's latent means of (N,C,H,W) uint8 pixels."""
    with torch.no_grad():
        return model.encode(torch.from_numpy(pixels).float() / 255)[0].numpy()


def test_images_are_prepared_with_the_preprocessing_the_model_records(tmp_path, caplog):
    """A model trained with illumination none, encoded under params saying graham: the model's
    none is used (the same latents as under params saying none, those of the photo prepared
    with none), and one line names the key and both values."""
    recorded = preprocessing(load_params(_params_with(tmp_path, "fundus", {})).flat())
    assert recorded["preprocess.illumination"] == "none"
    model = _model(tmp_path, channels=3, extra={"params_hash": "p", **recorded})
    photo = _fundus_photo(tmp_path / "fundus.png")
    graham = _encode_files(tmp_path, [photo], "fundus", {"illumination": "graham"})
    lines = [r.getMessage() for r in caplog.records if r.name == "retina_vae.encode"]
    caplog.clear()
    none = _encode_files(tmp_path, [photo], "fundus", {"illumination": "none"})
    prepared = {
        light: np.stack(prepare_file(photo, "fundus", (SIZE, SIZE), "pad", "all",
                                     illumination=light))
        for light in ("none", "graham")
    }  # fmt: skip
    assert not np.allclose(_mu(model, prepared["none"]), _mu(model, prepared["graham"]), atol=1e-3)
    np.testing.assert_allclose(graham, _mu(model, prepared["none"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(graham, none, rtol=1e-5, atol=1e-6)
    assert lines == [
        "preprocess.illumination: the model was trained with none; params say graham: "
        "using the model's"
    ]
    assert not [r for r in caplog.records if r.name == "retina_vae.encode" and r.levelno > 20]


def test_the_recorded_modality_is_used_over_the_params(tmp_path, caplog):
    """A fundus model encodes a photo as fundus under params saying oct (without the record,
    a channel error), with one line naming ingest.modality."""
    recorded = preprocessing(load_params(_params_with(tmp_path, "fundus", {})).flat())
    model = _model(tmp_path, channels=3, extra=recorded)
    photo = _fundus_photo(tmp_path / "fundus.png")
    got = _encode_files(tmp_path, [photo], "oct", {})
    pixels = np.stack(prepare_file(photo, "fundus", (SIZE, SIZE), "pad", "all"))
    np.testing.assert_allclose(got, _mu(model, pixels), rtol=1e-4, atol=1e-5)
    assert any(
        r.getMessage() == "ingest.modality: the model was trained with fundus; params say oct: "
        "using the model's"
        for r in caplog.records
    )


def test_a_checkpoint_without_the_record_uses_the_params_with_a_note(tmp_path, caplog):
    """A model saved before train recorded its preprocessing: the params' graham is applied,
    as before, and one line says the model does not record its preprocessing."""
    model = _model(tmp_path, channels=3)  # extra {}: no record
    photo = _fundus_photo(tmp_path / "fundus.png")
    got = _encode_files(tmp_path, [photo], "fundus", {"illumination": "graham"})
    pixels = np.stack(
        prepare_file(photo, "fundus", (SIZE, SIZE), "pad", "all", illumination="graham")
    )
    np.testing.assert_allclose(got, _mu(model, pixels), rtol=1e-4, atol=1e-5)
    notes = [r.getMessage() for r in caplog.records if "record" in r.getMessage()]
    assert notes == [
        f"{tmp_path / 'vae.pt'} does not record its preprocessing (trained before checkpoints "
        "kept it): preparing images with the params' ingest.modality, preprocess.oct_aspect, "
        "preprocess.illumination"
    ]


def _evaluation(root: Path, model: ConvVAE, files: list[Path]) -> tuple[Path, PCA, object]:
    """An evaluation folder as evaluate writes it, whose drawn points are ``files``: their
    embeddings, a PCA layout (sklearn, fit on their mu), made-up t-SNE coordinates, a probe
    and the HTML map."""
    pixels = np.stack([prepare_file(f, "oct", (SIZE, SIZE), "pad", "all")[0] for f in files])
    with torch.no_grad():
        mu = model.encode(torch.tensor(pixels).float() / 255.0)[0].numpy()  # (M,J)
    out = root / "evaluation"
    (out / "maps").mkdir(parents=True)
    ids = [f"img-{i}" for i in range(len(files))]
    labels = np.array(["A", "B"] * (len(files) // 2))
    table = pd.DataFrame({"image_id": ids, "split": "train", "label": labels})
    table = table.join(pd.DataFrame(mu, columns=[f"mu_{j}" for j in range(J)]))
    table.to_parquet(out / "embeddings.parquet")
    pca = PCA(n_components=2).fit(mu)
    tsne = np.random.default_rng(0).normal(0, 5, (len(files), 2))
    (out / "maps" / "layout.json").write_text(
        json.dumps(
            {
                "pca_mean": pca.mean_.tolist(),
                "pca_components": pca.components_.tolist(),
                "axes": {"t-SNE": ["t-SNE 1", "t-SNE 2"], "PCA": ["PC1", "PC2"]},
            }
        )
    )
    pd.DataFrame({"image_id": ids, "t-SNE_x": tsne[:, 0], "t-SNE_y": tsne[:, 1]}).to_parquet(
        out / "maps" / "map_points.parquet"
    )
    clf = latent.fit_probe(mu, labels)
    (out / "probe.json").write_text(json.dumps(latent.probe_json(clf)))
    layouts = {"t-SNE": (tsne, ["t-SNE 1", "t-SNE 2"]), "PCA": (pca.transform(mu), ["PC1", "PC2"])}
    latent_map(
        table.assign(mu_0=table["mu_0"].astype(float)), pixels, layouts, "map",
        out / "latent_map.html", ("label", "split", "mu_0"), header=["run x"],
        neighbours=np.zeros((len(files), 1), int),
    )  # fmt: skip
    return out, pca, clf


def test_new_images_are_placed_on_an_existing_map(tmp_path):
    model = _model(tmp_path)
    drawn = [_photo(tmp_path / f"d{i}.png", 10 + i) for i in range(8)]
    evaluation, pca, clf = _evaluation(tmp_path, model, drawn)
    new = _photo(tmp_path / "new.png", 99)
    out, page = tmp_path / "placed.csv", tmp_path / "with_new.html"
    argv = ["--params", str(_params(tmp_path)), "--model", str(tmp_path / "vae.pt")]
    argv += ["--map", str(evaluation), "--html", str(page), "--out", str(out)]
    assert main([*argv, str(drawn[3]), str(new)]) == 0
    table = pd.read_csv(out)
    mu = table[[f"mu_{j}" for j in range(J)]].to_numpy()
    # PCA: the evaluation's own projection, reapplied exactly (sklearn's transform)
    np.testing.assert_allclose(table[["PCA_x", "PCA_y"]], pca.transform(mu), atol=1e-6)
    # t-SNE by neighbours: an image already on the map lands on its own point; a new one
    # within the box of its neighbours' positions
    points = pd.read_parquet(evaluation / "maps" / "map_points.parquet")
    np.testing.assert_allclose(
        table.loc[0, ["t-SNE_x", "t-SNE_y"]].to_numpy(float),
        points.loc[3, ["t-SNE_x", "t-SNE_y"]].to_numpy(float),
        atol=1e-4,
    )
    assert points["t-SNE_x"].min() <= table.loc[1, "t-SNE_x"] <= points["t-SNE_x"].max()
    assert table["predicted_label"].tolist() == clf.predict(mu).tolist()
    np.testing.assert_allclose(table["predicted_probability"], clf.predict_proba(mu).max(1))
    data = read_payload(page)
    assert data["id"][-2:] == ["new-0000", "new-0001"] and data["split"][-1] == "new"
    assert len(data["layouts"]["PCA"]["x"]) == len(data["thumb"]) == 10
    assert data["columns"]["mu_0"]["values"][-1] == pytest.approx(mu[1, 0], abs=1e-4)
    assert "2 new images placed" in data["header"][-1]


def test_html_without_a_map_is_a_one_line_error(tmp_path, folder, capsys):
    _model(tmp_path)
    argv = ["--params", str(_params(tmp_path)), "--model", str(tmp_path / "vae.pt")]
    assert main([*argv, "--html", str(tmp_path / "m.html"), str(folder)]) == 1
    assert "--html needs --map" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_is_a_failure_that_does_not_show_it(
    tmp_path, folder, capfd, caplog
):
    """A latin-1 file name (os.fsencode bytes): one failure line with the name hidden, the
    other files written; the name reaches neither the log nor the output."""
    _model(tmp_path)
    _photo(Path(os.fsdecode(os.path.join(os.fsencode(folder), b"Schr\xf6dinger_OD.png"))), 3)
    out = tmp_path / "latents.csv"
    argv = ["--params", str(_params(tmp_path)), "--model", str(tmp_path / "vae.pt")]
    assert main([*argv, "--out", str(out), str(folder)]) == 1
    log = (capfd.readouterr().err + caplog.text).encode("utf-8", "backslashreplace")
    assert b"Traceback" not in log and b"dinger" not in log
    listed = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert listed == [
        f"{folder}/<name not UTF-8>: file or folder name is not valid UTF-8 (rename it)"
    ]
    assert b"dinger" not in out.read_bytes() and len(pd.read_csv(out)) == 4
