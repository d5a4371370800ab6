"""The whole pipeline through real `dvc repro`, at a tiny size, in a temporary copy of the repo.

Checks the user's three jobs end to end: `dvc repro` builds every output, a second `dvc repro`
does nothing, a changed param re-runs only the stages that read it, and `dvc exp run -S` gives
an experiment whose training is its own MLflow run in the repository's one mlflow.db.
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "demo": {"patients": 10, "images_per_eye": 2, "oct_height": 64, "oct_width": 64},
    "ingest": {"workers": 1},
    "preprocess": {"image_size": [32, 32], "workers": 1, "val_fraction": 0.2, "test_fraction": 0.2},
    "model": {"latent_dim": 4, "widths": [8, 16]},
    "train": {"epochs": 2, "batch_size": 8, "num_workers": 1, "image_every": 1},
    "evaluate": {"iwae_k": 4, "batch_size": 16, "map_method": "pca", "traversal_dims": 2},
}
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    for name in ("pipeline", "vae_core"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for group, values in TINY.items():
        params[group].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q"], root)
    _run([*git, "add", "-A"], root)
    _run([*git, "commit", "-qm", "tiny"], root)
    _run(["dvc", "repro"], root)
    return root


def _runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    return client.search_runs([client.get_experiment_by_name("retina-vae").experiment_id])


def test_repro_builds_every_output(repo):
    for rel in (
        "data/interim/manifest.parquet",
        "data/processed/train_images.npy",
        "models/vae.pt",
        "metrics/train_history.csv",
        "reports/evaluation/embeddings.parquet",
    ):
        assert (repo / rel).exists(), rel
    ingest = json.loads((repo / "metrics/ingest.json").read_text())
    assert ingest["found"] == ingest["ingested"] + ingest["quarantined"] + ingest["duplicates"]
    evaluation = json.loads((repo / "metrics/eval.json").read_text())
    assert evaluation["test_iwae"] >= -evaluation["test_neg_elbo"] - 1e-3
    shown = _run(["dvc", "metrics", "show", "--json"], repo)
    assert "eval.json" in shown and "train.json" in shown
    (run,) = _runs(repo)
    assert run.info.status == "FINISHED"
    assert "test_neg_elbo" in run.data.metrics


def test_second_repro_does_nothing(repo):
    out = _run(["dvc", "repro"], repo)
    assert "Running stage" not in out


def test_changed_param_reruns_only_its_stages(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["knn_k"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo)
    assert "Running stage 'evaluate'" in out
    for stage in ("demo", "ingest", "preprocess", "train"):
        assert f"Running stage '{stage}'" not in out


def test_operational_param_reruns_nothing(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["image_every"] += 1  # train.OPERATIONAL: how training runs, not what
    params["cluster"]["ship_code"] = not params["cluster"]["ship_code"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo)
    assert "Running stage" not in out


def test_experiment_is_its_own_mlflow_run(repo):
    before = {r.info.run_id for r in _runs(repo)}
    _run(["dvc", "exp", "run", "--temp", "-S", "model.latent_dim=3"], repo)
    rows = list(csv.DictReader(io.StringIO(_run(["dvc", "exp", "show", "--csv"], repo))))
    assert sorted(row["model.latent_dim"] for row in rows if row["typ"] != "baseline") == ["3"]
    new = [r for r in _runs(repo) if r.info.run_id not in before]
    assert len(new) == 1
    assert new[0].data.params["model.latent_dim"] == "3"


def test_queued_experiment_runs_its_own_code_and_records_its_commit(repo):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    queued_at = _run(["git", "rev-parse", "HEAD"], repo).strip()
    before = {r.info.run_id for r in _runs(repo)}
    _run(["dvc", "exp", "run", "--queue", "-S", "model.latent_dim=2"], repo)
    # committed after queueing: a workspace whose stages all fail
    cli = repo / "pipeline" / "cli.py"
    original = cli.read_text()
    cli.write_text(original + "\nraise SystemExit('the workspace code ran')\n")
    _run([*git, "commit", "-qam", "breaks every stage"], repo)
    try:
        _run(["dvc", "exp", "run", "--run-all", "-j", "1"], repo)
    finally:
        cli.write_text(original)
        _run([*git, "commit", "-qam", "repaired"], repo)
    new = [r for r in _runs(repo) if r.info.run_id not in before]
    assert [r.data.params["model.latent_dim"] for r in new] == ["2"]  # it ran, with its code
    assert new[0].info.status == "FINISHED"
    assert new[0].data.tags["mlflow.source.git.commit"] == queued_at
