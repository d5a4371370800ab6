"""The whole pipeline through real `dvc repro`, at a tiny size, in a temporary copy of the repo.

Checks the user's three jobs end to end: `dvc repro` builds every output, a second `dvc repro`
does nothing, a changed param re-runs only the stages that read it, and `dvc exp run -S` gives
an experiment whose training is its own MLflow run in the repository's one mlflow.db.
"""

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

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
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def _run(cmd: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def _copy_repo(root: Path, **groups: dict) -> Path:
    """A git repository at ``root`` with the pipeline, dvc.yaml and the TINY params (and
    ``groups`` patched in), committed."""
    for name in ("pipeline", "vae_core"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, root / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for group, values in (TINY | groups).items():
        params[group].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    _run([*GIT, "add", "-A"], root)
    _run([*GIT, "commit", "-qm", "tiny"], root)
    return root


def _ran(out: str) -> set[str]:
    """The stages a `dvc repro` ran, but ``sources``, which runs every time (it fingerprints
    an external source: see pipeline/sources.py)."""
    return set(re.findall(r"Running stage '(\w+)'", out)) - {"sources"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = _copy_repo(tmp_path_factory.mktemp("repo"))
    _run(["dvc", "repro"], root)
    # the baseline, as `make baseline` commits it: dvc.lock and metrics/ of this run
    _run([*GIT, "add", "dvc.lock", "metrics"], root)
    _run([*GIT, "commit", "-qm", "baseline"], root)
    return root


def _json(cmd: list[str], cwd: Path) -> dict:
    """A command's JSON output (stdout only; DVC may warn on stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stderr}"
    assert "failed to load" not in result.stderr, result.stderr
    return json.loads(result.stdout)


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
    assert "test/neg_elbo" in run.data.metrics and "val/neg_elbo" in run.data.metrics
    # the logged model carries the last epoch's (step 1) and the evaluation's metrics
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    on_model = {m.key: (m.step, m.value) for m in client.get_logged_model(model.model_id).metrics}
    train = json.loads((repo / "metrics/train.json").read_text())
    assert on_model["val/neg_elbo"] == (1, pytest.approx(train["val"]["neg_elbo"]))
    assert on_model["test/neg_elbo"] == (1, pytest.approx(evaluation["test_neg_elbo"]))


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def test_a_fresh_clone_shows_the_committed_baseline(repo, tmp_path):
    """No `!` in `dvc exp show`, no 'failed to load' from `dvc metrics diff`: the baseline
    row's metrics are the committed run's."""
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    rows = list(csv.DictReader(io.StringIO(_run(["dvc", "exp", "show", "--csv"], clone))))
    committed = json.loads((repo / "metrics/eval.json").read_text())
    for row in rows:  # workspace and the baseline commit
        assert _number(row["test_neg_elbo"]), row
        assert float(row["test_neg_elbo"]) == pytest.approx(committed["test_neg_elbo"])
        assert _number(row["val.neg_elbo"]), row
    diff = _json(["dvc", "metrics", "diff", "--all", "--json"], clone)
    old = diff["metrics/eval.json"]["test_neg_elbo"]["old"]
    assert old == pytest.approx(committed["test_neg_elbo"])


def test_second_repro_does_nothing(repo):
    out = _run(["dvc", "repro"], repo)
    assert _ran(out) == set()


def test_changed_param_reruns_only_its_stages(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["evaluate"]["knn_k"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo)
    assert _ran(out) == {"evaluate"}
    # the README's `dvc metrics diff`: the committed baseline (HEAD) beside the workspace
    diff = _json(["dvc", "metrics", "diff", "--all", "--json"], repo)
    knn = diff["metrics/eval.json"]["test_knn_accuracy"]
    assert _number(str(knn["old"])) and _number(str(knn["new"]))
    now = json.loads((repo / "metrics/eval.json").read_text())["test_knn_accuracy"]
    assert knn["new"] == pytest.approx(now)


def test_operational_param_reruns_nothing(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["image_every"] += 1  # train.OPERATIONAL: how training runs, not what
    params["cluster"]["ship_code"] = not params["cluster"]["ship_code"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(["dvc", "repro"], repo)
    assert _ran(out) == set()


def test_experiment_is_its_own_mlflow_run(repo):
    _run(["git", "checkout", "--", "params.yaml"], repo)  # the tests above edited it
    before = {r.info.run_id for r in _runs(repo)}
    _run(["dvc", "exp", "run", "--temp", "-n", "tiny-exp", "-S", "model.latent_dim=3"], repo)
    rows = list(csv.DictReader(io.StringIO(_run(["dvc", "exp", "show", "--csv"], repo))))
    (exp,) = [row for row in rows if row["typ"] != "baseline"]
    assert exp["model.latent_dim"] == "3" and exp["Experiment"] == "tiny-exp"
    new = [r for r in _runs(repo) if r.info.run_id not in before]
    assert len(new) == 1
    assert new[0].data.params["model.latent_dim"] == "3"
    # the MLflow run and the DVC experiment name each other
    assert new[0].info.run_name == "tiny-exp: model.latent_dim=3"
    assert new[0].data.tags["dvc.exp_name"] == "tiny-exp"
    refs = dict(line.split()[::-1] for line in _run(["git", "show-ref"], repo).splitlines())
    assert refs[new[0].data.tags["dvc.exp_ref"]].startswith(exp["rev"])  # CSV: a short sha

    # the readable comparison: 120 columns, the changed param, DVC's own figures
    lines = _run(["retina-vae", "exps"], repo).strip().splitlines()
    assert max(map(len, lines)) <= 120
    (line,) = [ln for ln in lines if "tiny-exp" in ln]
    assert line.endswith("model.latent_dim=3")
    assert f"{float(exp['val.neg_elbo']):.2f}" in line.split()
    assert f"{float(exp['test_iwae']):.1f}" in line.split()


def test_editing_an_external_label_sheet_or_source_reruns_ingest(tmp_path):
    """An external ingest.source and ingest.labels are no DVC deps of their own: the sources
    stage's fingerprint makes a changed label, or a new file, re-run ingest (and only then);
    given relative to the repository, they are found from an experiment's temporary copy too."""
    src = tmp_path / "images"
    src.mkdir()
    for k in range(4):
        Image.fromarray(np.full((40, 40), 40 * k + 20, np.uint8)).save(src / f"{k}.png")
    sheet = tmp_path / "trainLabels.csv"
    sheet.write_text("image,level\n0,0\n1,1\n2,0\n3,1\n")
    ingest = {"source": str(src), "labels": str(sheet), "path_column": "image"}
    root = _copy_repo(tmp_path / "repo", ingest=TINY["ingest"] | ingest | {"label_column": "level"})

    def labels() -> list[str]:
        return pd.read_parquet(root / "data/interim/manifest.parquet")["label"].tolist()

    assert _ran(_run(["dvc", "repro", "ingest"], root)) == {"demo", "ingest"}
    assert labels() == ["0", "1", "0", "1"]
    assert _ran(_run(["dvc", "repro", "ingest"], root)) == set()  # nothing changed
    sheet.write_text("image,level\n0,0\n1,1\n2,2\n3,1\n")  # one label edited
    assert _ran(_run(["dvc", "repro", "ingest"], root)) == {"ingest"}
    assert labels() == ["0", "1", "2", "1"]
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(src / "9.png")  # an unlisted file
    assert _ran(_run(["dvc", "repro", "ingest"], root)) == {"ingest"}
    report = json.loads((root / "metrics/ingest.json").read_text())
    assert report["unlisted"] == 1
    assert _ran(_run(["dvc", "repro", "ingest"], root)) == set()
    # relative to the repository: an experiment's temporary copy (`dvc exp run --temp`, a
    # queued run: <repo>/.dvc/tmp/exps/tmpXXXX) reads the same files as `dvc repro`
    relative = ["-S", "ingest.source=../images", "-S", "ingest.labels=../trainLabels.csv"]
    _run(["dvc", "exp", "run", "--temp", "-n", "relative", *relative, "ingest"], root)
    rows = csv.DictReader(io.StringIO(_run(["dvc", "exp", "show", "--csv"], root)))
    (exp,) = [row for row in rows if row["Experiment"] == "relative"]
    assert (exp["ingested"], exp["unlisted"]) == ("4", "1")


def test_queued_experiment_runs_its_own_code_and_records_its_commit(repo):
    queued_at = _run(["git", "rev-parse", "HEAD"], repo).strip()
    before = {r.info.run_id for r in _runs(repo)}
    _run(["dvc", "exp", "run", "--queue", "-S", "model.latent_dim=2"], repo)
    # committed after queueing: a workspace whose stages all fail
    cli = repo / "pipeline" / "cli.py"
    original = cli.read_text()
    cli.write_text(original + "\nraise SystemExit('the workspace code ran')\n")
    _run([*GIT, "commit", "-qam", "breaks every stage"], repo)
    try:
        _run(["dvc", "exp", "run", "--run-all", "-j", "1"], repo)
    finally:
        cli.write_text(original)
        _run([*GIT, "commit", "-qam", "repaired"], repo)
    new = [r for r in _runs(repo) if r.info.run_id not in before]
    assert [r.data.params["model.latent_dim"] for r in new] == ["2"]  # it ran, with its code
    assert new[0].info.status == "FINISHED"
    assert new[0].data.tags["mlflow.source.git.commit"] == queued_at
