"""The evaluate stage on a tiny checkpoint and tiny processed arrays, into a real MLflow store."""

import json
import math
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import tracking
from pipeline.evaluate import main
from pipeline.params import load_params
from vae_core.checkpoint import load_checkpoint, save_checkpoint
from vae_core.model import ConvVAE, VAEConfig

REPO = Path(__file__).resolve().parents[2]
SIZE, J = 16, 4
SPLIT_SIZES = {"train": 24, "val": 6, "test": 16}
pytestmark = pytest.mark.slow


def _images(n: int, seed: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Two kinds of (1, 16, 16) uint8 picture: bright top half ("A") or bright left half ("B"),
    and a severity (N,) in [0, 1] that makes the bright half brighter."""
    rng = np.random.default_rng(seed)
    labels = ["A" if i % 2 == 0 else "B" for i in range(n)]
    severity = rng.uniform(0, 1, n)
    x = rng.integers(0, 60, (n, 1, SIZE, SIZE)).astype(np.uint8)  # (N, C, H, W)
    for img, label, sev in zip(x, labels, severity, strict=True):
        bright = np.uint8(80 + 110 * sev)
        if label == "A":
            img[:, : SIZE // 2, :] += bright
        else:
            img[:, :, : SIZE // 2] += bright
    return x, labels, severity


def _write_processed(root: Path, labelled: bool) -> None:
    processed = root / "processed"
    processed.mkdir()
    manifest = []
    for seed, (split, n) in enumerate(SPLIT_SIZES.items()):
        x, labels, severity = _images(n, seed)
        ids = [f"{split}-{i:03d}" for i in range(n)]
        sources = [f"{split}/{i}.png" for i in range(n)]
        manifest.append(pd.DataFrame({"image_id": ids, "severity": severity, "source": sources}))
        np.save(processed / f"{split}_images.npy", x)
        pd.DataFrame(
            {
                "image_id": [f"{split}-{i:03d}" for i in range(n)],
                "label": labels if labelled else [None] * n,
                "subject_id": [f"s{i // 2}" for i in range(n)],
                "eye": "OD",
                "modality": "oct",
                "split": split,
                "frame": 0,
            }
        ).to_parquet(processed / f"{split}.parquet", index=False)
    # the ingest manifest's severity (the labels CSV's column) and source path (the processed
    # tables carry none), joined on image_id by evaluate
    pd.concat(manifest).to_parquet(root / "manifest.parquet", index=False)


def _setup(
    root: Path,
    *,
    labelled: bool,
    run_id: str | None,
    monkeypatch,
    map_method: str = "pca",
    likelihood: str = "bernoulli",
) -> Path:
    """Tiny checkpoint + arrays + a params file pointing every path into ``root``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _write_processed(root, labelled)
    torch.manual_seed(0)
    config = VAEConfig(1, SIZE, SIZE, widths=(4, 8), latent_dim=J, likelihood=likelihood)
    model = ConvVAE(config)
    extra = {"mlflow_run_id": run_id} if run_id else {}
    save_checkpoint(root / "vae.pt", model, extra=extra)
    pd.DataFrame(
        {"epoch": [0, 1], "train_neg_elbo": [180.0, 170.0], "val_neg_elbo": [181.0, 172.0]}
    ).to_csv(root / "history.csv", index=False)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["paths"].update(
        processed=str(root / "processed"),
        manifest=str(root / "manifest.parquet"),
        model=str(root / "vae.pt"),
        train_history=str(root / "history.csv"),
        evaluation=str(root / "evaluation"),
        eval_metrics=str(root / "eval.json"),
    )
    params["evaluate"].update(
        iwae_k=20,
        batch_size=8,
        map_method=map_method,
        knn_k=3,
        traversal_dims=2,
        traversal_steps=5,
        bootstrap=200,
    )
    params["tracking"]["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluate run into the training run created here; returns (root, run_id)."""
    root = tmp_path_factory.mktemp("eval")
    with tracking.using_uri(f"sqlite:///{root / 'mlflow.db'}"):
        mlflow.set_experiment("retina-vae")
        with mlflow.start_run() as run:
            mlflow.log_metric("train_neg_elbo", 170.0)
    with pytest.MonkeyPatch.context() as mp:
        params = _setup(
            root,
            labelled=True,
            run_id=run.info.run_id,
            monkeypatch=mp,
            map_method="tsne",
            likelihood="gaussian",  # a density: bits per dimension are reported
        )
        assert main(["--params", str(params)]) == 0
    return root, run.info.run_id


LIKELIHOOD = ["test_neg_elbo", "test_recon", "test_kl", "test_neg_elbo_bpd", "test_iwae",
              "test_iwae_bpd", "test_active_units"]  # fmt: skip
LABELS = ["test_probe_accuracy", "test_probe_auc", "test_knn_accuracy", "test_silhouette",
          "test_kmeans_ari", "test_kmeans_nmi", "test_majority_accuracy",
          "test_pca_probe_accuracy", "test_pca_probe_auc", "test_probe_accuracy_vs_pca",
          "test_probe_auc_vs_pca", "test_probe_accuracy_vs_pca_ci_low",
          "test_probe_accuracy_vs_pca_ci_high", "test_probe_auc_vs_pca_ci_low",
          "test_probe_auc_vs_pca_ci_high", "test_features_probe_accuracy",
          "test_features_probe_auc"]  # fmt: skip
SPECTRUM = ["test_spectrum_spearman", "test_pca_spectrum_spearman",
            "test_spectrum_spearman_vs_pca", "test_spectrum_spearman_vs_pca_ci_low",
            "test_spectrum_spearman_vs_pca_ci_high"]  # fmt: skip
KL_DIMS = [f"test_kl_dim_{j}" for j in range(J)]


def test_metrics_json_has_every_metric(evaluated):
    root, _ = evaluated
    metrics = json.loads((root / "eval.json").read_text())
    for key in LIKELIHOOD + LABELS + KL_DIMS + SPECTRUM:
        assert math.isfinite(metrics[key]), key
    assert metrics["eval_images_train"] == SPLIT_SIZES["train"]
    assert metrics["test_images"] == SPLIT_SIZES["test"]
    assert 0 <= metrics["test_active_units"] <= J
    assert 0.0 <= metrics["test_probe_accuracy"] <= 1.0
    assert sum(metrics[k] for k in KL_DIMS) == pytest.approx(metrics["test_kl"], rel=1e-5)


def test_pixel_pca_baseline_beside_the_latent(evaluated):
    """The two picture kinds differ in which half is bright: PCA of the pixels reads that."""
    root, _ = evaluated
    metrics = json.loads((root / "eval.json").read_text())
    assert metrics["test_pca_probe_accuracy"] >= 0.9
    for key in ("accuracy", "auc"):
        margin = metrics[f"test_probe_{key}"] - metrics[f"test_pca_probe_{key}"]
        assert metrics[f"test_probe_{key}_vs_pca"] == pytest.approx(margin)
        low, high = (metrics[f"test_probe_{key}_vs_pca_ci_{end}"] for end in ("low", "high"))
        assert low - 1e-9 <= margin <= high + 1e-9


def test_pixel_pca_orders_the_severity_and_the_spectrum_is_drawn(evaluated):
    """Severity brightens the bright half: a linear fit on the pixels' PCA orders test images
    by it; the latent's fit is reported beside it, with the difference's interval."""
    root, _ = evaluated
    metrics = json.loads((root / "eval.json").read_text())
    assert metrics["test_pca_spectrum_spearman"] > 0.8
    margin = metrics["test_spectrum_spearman"] - metrics["test_pca_spectrum_spearman"]
    assert metrics["test_spectrum_spearman_vs_pca"] == pytest.approx(margin)
    low, high = (
        metrics["test_spectrum_spearman_vs_pca_ci_low"],
        metrics["test_spectrum_spearman_vs_pca_ci_high"],
    )
    assert low - 1e-9 <= margin <= high + 1e-9
    picture = Image.open(root / "evaluation" / "spectrum" / "spectrum.png")
    assert picture.width > 5 * SIZE  # 5 steps (traversal_steps), two rows
    table = pd.read_parquet(root / "evaluation" / "embeddings.parquet")
    mu = table[[f"mu_{j}" for j in range(J)]].to_numpy()
    assert np.ptp(table["spectrum_position"]) > 0 and len(mu) == len(table)
    # the HTML map: t-SNE, PCA and the spectrum layout; severity and mu_j as continuous colours
    page = (root / "evaluation" / "latent_map.html").read_text()
    tag = '<script type="application/json" id="map-data">'
    start = page.index(tag) + len(tag)
    data = json.loads(page[start : page.index("</script>", start)])
    assert list(data["layouts"]) == ["t-SNE", "PCA", "spectrum"]
    kinds = {c: v["kind"] for c, v in data["columns"].items()}
    assert kinds["severity"] == kinds["mu_0"] == kinds["spectrum_position"] == "number"
    assert kinds["label"] == "category"
    assert "k-means ARI" in data["header"][-1] and "silhouette" in data["header"][-1]


def test_iwae_bound_is_above_the_elbo(evaluated):
    metrics = json.loads((evaluated[0] / "eval.json").read_text())
    assert metrics["test_iwae"] >= -metrics["test_neg_elbo"]
    assert metrics["test_neg_elbo"] == pytest.approx(metrics["test_kl"] - metrics["test_recon"])


def test_bits_per_dim_match_nats(evaluated):  # gaussian likelihood: a density
    metrics = json.loads((evaluated[0] / "eval.json").read_text())
    dims = 1 * SIZE * SIZE
    assert metrics["test_neg_elbo_bpd"] == pytest.approx(
        metrics["test_neg_elbo"] / (dims * math.log(2))
    )
    assert metrics["test_iwae_bpd"] == pytest.approx(-metrics["test_iwae"] / (dims * math.log(2)))
    assert metrics["test_iwae_bpd"] <= metrics["test_neg_elbo_bpd"]


def test_embeddings_cover_every_image(evaluated):
    table = pd.read_parquet(evaluated[0] / "evaluation" / "embeddings.parquet")
    assert len(table) == sum(SPLIT_SIZES.values())
    assert table["split"].value_counts().to_dict() == SPLIT_SIZES
    assert table["image_id"].is_unique
    for col in ["image_id", "split", "label", "subject_id"] + [f"mu_{j}" for j in range(J)]:
        assert col in table, col
    sigma = table[[f"sigma_{j}" for j in range(J)]].to_numpy()
    assert (sigma > 0).all()


def test_training_run_holds_metrics_and_artifacts(evaluated):
    root, run_id = evaluated
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_neg_elbo"] == 170.0  # the training run, not a new one
    # MLflow's sections: the likelihood under test/, the latent-space metrics under latent/
    for key in [f"test/{k[5:]}" for k in LIKELIHOOD] + [f"latent/{k[5:]}" for k in LABELS]:
        assert key in run.data.metrics, key
    assert not [k for k in run.data.metrics if "kl_dim" in k]  # one table, not J charts
    assert len(client.search_runs([run.info.experiment_id])) == 1

    def listing(path: str) -> set[str]:
        return {a.path for a in client.list_artifacts(run_id, path)}

    top = listing("evaluation")
    assert {"evaluation/embeddings.parquet", "evaluation/latent_map.html"} <= top
    assert {f"evaluation/maps/{m}_{s}.png" for m in ("pca", "tsne") for s in SPLIT_SIZES} <= (
        listing("evaluation/maps")
    )
    traversals = listing("evaluation/traversals")
    assert len(traversals) == 2 and all(p.endswith(".png") for p in traversals)
    assert {
        "evaluation/grids/reconstructions_test.png",
        "evaluation/grids/prior_samples.png",
    } <= listing("evaluation/grids")
    assert "evaluation/plots/training_history.png" in listing("evaluation/plots")
    tables = listing("evaluation/tables")
    assert {f"evaluation/tables/cluster_composition.{ext}" for ext in ("csv", "json")} <= tables
    html = Path(client.download_artifacts(run_id, "evaluation/latent_map.html", str(root)))
    page = html.read_text()
    assert page.count("test-0") >= SPLIT_SIZES["test"]  # every test id is hoverable
    assert f"MLflow run {run_id}" in page and f"latent size J = {J}" in page  # its header


def test_unlabelled_data_and_unknown_run(tmp_path, monkeypatch, caplog):
    params = _setup(tmp_path, labelled=False, run_id="0" * 32, monkeypatch=monkeypatch)
    assert main(["--params", str(params)]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert not set(LABELS) & set(metrics)  # skipped, not NaN
    # bernoulli (continuous BCE) is not a density of the images: no bits per dimension
    assert "test_neg_elbo_bpd" not in metrics and "test_iwae_bpd" not in metrics
    assert all(math.isfinite(v) for v in metrics.values())
    notes = (tmp_path / "evaluation" / "notes.txt").read_text()
    assert "no labelled test images" in notes
    assert "not in the tracking store" in caplog.text
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("retina-vae").experiment_id])
    assert run.data.tags["retina_vae.trained_run_id"] == "0" * 32
    assert run.data.tags["retina_vae.checkpoint"] == str(tmp_path / "vae.pt")
    assert "test/iwae" in run.data.metrics


def test_an_experiment_that_changes_only_evaluate_params_gets_its_own_run(tmp_path, monkeypatch):
    """`dvc exp run -S evaluate.iwae_k=10` re-uses the trained model (DVC skips train): its
    evaluation must not land in the training run of another experiment, whose params say
    iwae_k=20, but in a run of its own that compares with it (params, curves, DVC tags)."""
    params = _setup(tmp_path, labelled=True, run_id=None, monkeypatch=monkeypatch)
    flat = load_params(params).flat()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trained, _ = tracking.start_run(uri, "retina-vae", params=flat, tags={"data_hash": "d1"})
    tracking.log_training_data(uri, trained, "data/processed", "d1" * 18, {"train_images": 7})
    client = MlflowClient(uri)
    for epoch, value in enumerate([180.0, 170.0]):
        client.log_metric(trained, "val/neg_elbo", value, step=epoch)
    model = load_checkpoint(tmp_path / "vae.pt")
    save_checkpoint(tmp_path / "vae.pt", model, extra={"mlflow_run_id": trained})
    assert main(["--params", str(params)]) == 0  # the experiment that trained it
    first = json.loads((tmp_path / "eval.json").read_text())

    raw = yaml.safe_load(params.read_text())
    raw["evaluate"]["iwae_k"] = 10
    params.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DVC_EXP_NAME", "quick-k10")
    assert main(["--params", str(params)]) == 0  # another experiment, same model
    second = json.loads((tmp_path / "eval.json").read_text())

    held = client.get_metric_history(trained, "test/iwae")
    assert [m.value for m in held] == [pytest.approx(first["test_iwae"])]  # not overwritten
    (other,) = client.search_runs(
        [client.get_run(trained).info.experiment_id], f"attributes.run_id != '{trained}'"
    )
    tags, run_params = other.data.tags, other.data.params
    assert tags["retina_vae.trained_run_id"] == trained and tags["data_hash"] == "d1"
    assert tags["dvc.exp_name"] == "quick-k10" and other.info.run_name.startswith("quick-k10: ")
    # its lineage: the code that evaluated (MLflow's Source) and the data the model learnt from
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["mlflow.source.name"] == "retina-vae evaluate"
    (data,) = other.inputs.dataset_inputs
    assert (data.dataset.name, data.dataset.digest) == ("processed", "d1" * 18)
    assert run_params["evaluate.iwae_k"] == "10" and set(run_params) == set(flat)
    assert other.data.metrics["test/iwae"] == pytest.approx(second["test_iwae"])
    assert set(client.get_run(trained).data.metrics) <= set(other.data.metrics)
    curve = client.get_metric_history(other.info.run_id, "val/neg_elbo")
    assert [(m.step, m.value) for m in curve] == [(0, 180.0), (1, 170.0)]
    # at the last epoch's step, as a training run's evaluation is, so the charts line up
    assert [m.step for m in client.get_metric_history(other.info.run_id, "test/iwae")] == [1]


def test_a_retried_evaluation_log_reuses_its_unfinished_run_and_a_finished_one_never(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flat = load_params(REPO / "params.yaml").flat()
    trained, _ = tracking.start_run(uri, "retina-vae", params=flat, tags={})
    mine = {**flat, "evaluate.iwae_k": 10}
    args = (uri, trained, "models/vae.pt", "retina-vae", mine)
    first = tracking.evaluation_run(*args)
    assert first != trained
    assert tracking.evaluation_run(*args) == first  # its log failed before the end: a retry
    other = tracking.evaluation_run(uri, trained, "models/vae.pt", "retina-vae",
                                    {**flat, "evaluate.iwae_k": 20})  # fmt: skip
    assert other not in (trained, first)  # other params: not that run
    (tmp_path / "out").mkdir()
    tracking.log_evaluation(uri, first, tmp_path / "out", {"test_iwae": -1.0}, "evaluation", [])
    again = tracking.evaluation_run(*args)
    assert again not in (trained, first, other)  # a finished evaluation is never reopened


def test_processed_arrays_of_the_wrong_size_are_a_one_line_error(tmp_path, monkeypatch, capsys):
    params = _setup(tmp_path, labelled=True, run_id=None, monkeypatch=monkeypatch)
    np.save(tmp_path / "processed" / "val_images.npy", np.zeros((6, 1, 8, 8), np.uint8))
    assert main(["--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("retina-vae evaluate: error: ")
    assert "val_images.npy" in err and "(N, 1, 16, 16)" in err and "\n" not in err
    assert not (tmp_path / "evaluation").exists()
    assert not (tmp_path / "eval.json").exists()


def test_missing_checkpoint_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    params = _setup(tmp_path, labelled=True, run_id=None, monkeypatch=monkeypatch)
    (tmp_path / "vae.pt").unlink()
    assert main(["--params", str(params)]) == 1
    err = capsys.readouterr().err.strip()
    assert "vae.pt: model checkpoint not found" in err and "\n" not in err


def test_a_failed_mlflow_log_keeps_the_evaluation_and_can_be_retried(tmp_path, monkeypatch, caplog):
    params = _setup(tmp_path, labelled=True, run_id=None, monkeypatch=monkeypatch)
    store = tmp_path / "store" / "mlflow.db"
    store.parent.write_text("a file where the store's folder should be: MLflow cannot open it")
    raw = yaml.safe_load(params.read_text())
    raw["tracking"]["uri"] = f"sqlite:///{store}"
    params.write_text(yaml.safe_dump(raw))
    assert main(["--params", str(params)]) == 0
    assert (tmp_path / "eval.json").is_file()
    assert (tmp_path / "evaluation" / "embeddings.parquet").is_file()
    failed = [r.getMessage() for r in caplog.records if "logging failed" in r.getMessage()]
    (warning,) = failed
    assert warning.startswith("MLflow logging failed") and "\n" not in warning
    assert f"`retina-vae evaluate --log-only --params {params}`" in warning

    store.parent.unlink()  # the store is back: the retry logs what is on disk, computes nothing
    (tmp_path / "processed" / "test_images.npy").unlink()
    assert main(["--params", str(params), "--log-only"]) == 0
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("retina-vae").experiment_id])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert run.data.metrics["test/iwae"] == pytest.approx(saved["test_iwae"])
    listed = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/embeddings.parquet" in listed
    tables = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation/tables")}
    assert "evaluation/tables/cluster_composition.json" in tables


def test_the_missing_history_note_is_logged(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="retina_vae")
    params = _setup(tmp_path, labelled=True, run_id=None, monkeypatch=monkeypatch)
    (tmp_path / "history.csv").unlink()
    assert main(["--params", str(params)]) == 0
    note = f"note: {tmp_path / 'history.csv'}: not found, training curves not drawn"
    assert note in caplog.text
    assert note[6:] in (tmp_path / "evaluation" / "notes.txt").read_text()


def test_the_evaluation_goes_onto_the_runs_ready_model_not_one_an_outage_cut_off(tmp_path):
    """A re-run after an outage leaves a FAILED logged model beside the READY one; MLflow lists
    a run's models in no set order. Reference: the status MLflow itself records."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("retina-vae")
    run_id = client.create_run(exp).info.run_id
    ids = {}
    for status in (LoggedModelStatus.READY, LoggedModelStatus.FAILED):
        model = client.create_logged_model(exp, source_run_id=run_id)
        client.finalize_logged_model(model.model_id, status)
        ids[str(status)] = model.model_id
    client.log_outputs(run_id, models=[LoggedModelOutput(i, step=4) for i in ids.values()])
    (tmp_path / "out").mkdir()
    tracking.log_evaluation(uri, run_id, tmp_path / "out", {"test_iwae": -3.0}, "evaluation", [])
    assert client.get_logged_model(ids["READY"]).metrics[0].key == "test/iwae"
    assert not client.get_logged_model(ids["FAILED"]).metrics


def test_relogging_an_evaluation_writes_no_metric_twice(tmp_path):
    """A --log-only retry after a partial failure, and the image counts the epochs logged
    already: each metric once per step in the run's history."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("retina-vae")).info.run_id
    for step in (0, 1):  # two epochs
        client.log_metric(run_id, "train/kl", 5.0, step=step)
        client.log_metric(run_id, "data/images_train", 40, step=step)
    (tmp_path / "out").mkdir()
    metrics = {"test_iwae": -3.0, "data_images_train": 40.0}
    for _ in range(2):
        tracking.log_evaluation(uri, run_id, tmp_path / "out", metrics, "evaluation", [])
    assert [m.step for m in client.get_metric_history(run_id, "test/iwae")] == [1]
    assert [m.step for m in client.get_metric_history(run_id, "data/images_train")] == [0, 1]
    tracking.log_evaluation(uri, run_id, tmp_path / "out", {"test_iwae": -2.0}, "evaluation", [])
    assert [m.value for m in client.get_metric_history(run_id, "test/iwae")] == [-3.0, -2.0]


def test_tracking_server_down_at_evaluate_is_one_warning_without_retries_and_no_new_run(
    tmp_path, monkeypatch, caplog, mlflow_server
):
    """Before: MLflow's 7 retries per request (minutes, a line each), and an outage read as
    'training run not in the store', so the evaluation went to a new run."""
    uri = mlflow_server()
    client = MlflowClient(uri)
    exp = client.create_experiment("retina-vae")
    trained = client.create_run(exp).info.run_id
    params = _setup(tmp_path, labelled=True, run_id=trained, monkeypatch=monkeypatch)
    raw = yaml.safe_load(params.read_text())
    raw["tracking"]["uri"] = uri
    params.write_text(yaml.safe_dump(raw))
    assert not tracking.run_exists(uri, "0" * 32)  # absent: False
    mlflow_server.stop()
    with tracking.one_try(), pytest.raises(Exception):  # noqa: B017 - down: not "absent"
        tracking.run_exists(uri, trained)
    caplog.clear()
    assert main(["--params", str(params)]) == 0
    failed = [r.getMessage() for r in caplog.records if "logging failed" in r.getMessage()]
    (warning,) = failed
    assert warning.startswith(f"MLflow logging failed (no MLflow tracking server answers at {uri}")
    assert "Retrying" not in caplog.text  # urllib3's line per retry
    mlflow_server()  # back: the retry fills the training run, no other
    assert main(["--params", str(params), "--log-only"]) == 0
    (run,) = client.search_runs([exp])
    assert run.info.run_id == trained and run.data.tags["retina_vae.evaluated"] == "true"
