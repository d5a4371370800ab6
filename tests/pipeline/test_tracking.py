"""pipeline.tracking against a real MLflow sqlite store (no Ray)."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.params import TrackingParams
from tests.conftest import make_images
from vae_core.model import ConvVAE, VAEConfig

SQLITE_REL = TrackingParams(uri="sqlite:///mlflow.db", experiment="e")


def test_env_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.resolve_tracking_uri(SQLITE_REL) == "http://tracking:5000"


def test_relative_sqlite_is_at_the_repository_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(SQLITE_REL, cwd=tmp_path) == (
        f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    )
    exp = tmp_path / ".dvc" / "tmp" / "exps" / "tmpab12cd"  # a `dvc exp run --temp` copy
    exp.mkdir(parents=True)
    assert tracking.resolve_tracking_uri(SQLITE_REL, cwd=exp) == (
        f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    )
    absolute = TrackingParams(uri="sqlite:////data/m.db", experiment="e")
    assert tracking.resolve_tracking_uri(absolute, cwd=exp) == "sqlite:////data/m.db"


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.mark.slow
def test_start_run_reopens_a_known_run_and_creates_otherwise(store, tmp_path):
    run_id, resumed = tracking.start_run(store, "exp", params={"a.b": (1, 2)}, tags={"t": "1"})
    assert not resumed
    tracking.finish_run(store, run_id, "FAILED")
    again, resumed = tracking.start_run(store, "exp", params={}, tags={}, run_id=run_id)
    assert (again, resumed) == (run_id, True)
    run = MlflowClient(store).get_run(run_id)
    assert run.info.status == "RUNNING" and run.data.params["a.b"] == "[1, 2]"
    other, resumed = tracking.start_run(store, "exp", params={}, tags={}, run_id="0" * 32)
    assert other != run_id and not resumed
    # Artifacts beside the database, not in the current directory.
    exp = MlflowClient(store).get_experiment_by_name("exp")
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()


@pytest.mark.slow
def test_epoch_logger_logs_metrics_per_step_and_grids(store):
    run_id, _ = tracking.start_run(store, "exp", params={}, tags={})
    examples = make_images(3, 32, 1, 0)
    logger = tracking.EpochLogger(store, run_id, epochs=3, image_every=2, examples=examples)
    model = ConvVAE(VAEConfig(height=32, width=32, widths=(8,), latent_dim=2))
    keys = ("train_neg_elbo", "val_neg_elbo", "train_kl", "val_active_units")
    keys += ("train_images_per_s",)
    for epoch in range(3):
        row = {"epoch": epoch, **{k: float(epoch + 1) for k in keys}}
        logger(epoch, row, model)
    client = MlflowClient(store)
    history = client.get_metric_history(run_id, "val_neg_elbo")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    pngs = [p for p in images if p.endswith(".png")]  # key+step+N+timestamp+...png

    def steps(key: str) -> list[int]:
        return sorted(int(p.split("+")[2]) for p in pngs if f"/{key}+" in p)

    # every 2nd epoch (step 1) and the last one (step 2)
    assert steps("reconstructions") == [1, 2]
    assert steps("prior_samples") == [1, 2]
