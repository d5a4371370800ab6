"""pipeline.tracking against a real MLflow sqlite store (no Ray)."""

from __future__ import annotations

import base64
import http.server
import json
import subprocess
import threading

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline import tracking
from pipeline.params import TrackingParams
from pipeline.processed import split_sizes
from tests.conftest import REPO, free_port, make_images, write_processed
from vae_core.model import ConvVAE, VAEConfig

SQLITE_REL = TrackingParams(uri="sqlite:///mlflow.db", experiment="e", register_model=None)


def test_env_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.resolve_tracking_uri(SQLITE_REL) == "http://tracking:5000"


@pytest.fixture
def login_server():
    """A real HTTP server whose /health answers 200 only to ``alice:pw`` in basic auth or the
    bearer token ``t0k`` (as a tracking server behind a login does), 401 otherwise."""
    allowed = {"Basic " + base64.b64encode(b"alice:pw").decode(), "Bearer t0k"}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the handler's name is http.server's)
            ok = self.path == "/health" and self.headers.get("Authorization") in allowed
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


USER, PASSWORD, TOKEN = (f"MLFLOW_TRACKING_{k}" for k in ("USERNAME", "PASSWORD", "TOKEN"))
REFUSED = "/health answered HTTP 401"


CREDENTIALS_FILE = "[mlflow]\nmlflow_tracking_username = alice\nmlflow_tracking_password = pw\n"


@pytest.mark.parametrize(
    "user_info, env, file, answer",
    [
        ("alice:pw@", {}, "", None),
        ("alice:pw@", {TOKEN: "wrong"}, "", None),
        ("alice:wrong@", {USER: "alice", PASSWORD: "pw"}, "", REFUSED),
        ("alice@", {USER: "alice", PASSWORD: "pw"}, "", None),  # no password: not used
        ("", {USER: "alice", PASSWORD: "pw"}, "", None),
        ("", {PASSWORD: "pw", TOKEN: "t0k"}, "", None),
        ("", {USER: "alice", TOKEN: "wrong"}, "", REFUSED),
        ("", {}, CREDENTIALS_FILE, None),  # ~/.mlflow/credentials
        ("", {PASSWORD: "wrong"}, CREDENTIALS_FILE, REFUSED),  # a variable wins over the file
        ("", {}, "", REFUSED),
    ],
)  # fmt: skip
def test_probe_logs_in_as_the_run_will(
    login_server, monkeypatch, tmp_path, user_info, env, file, answer
):
    """Whatever way a login is given (the URI's user info, MLflow's variables, its credentials
    file), the probe is let in exactly when it is right, as MLflow's client is."""
    for name in (USER, PASSWORD, TOKEN):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path))
    if file:
        (tmp_path / ".mlflow").mkdir()
        (tmp_path / ".mlflow" / "credentials").write_text(file)
    assert tracking.probe(f"http://{user_info}{login_server}") == answer


def test_probe_says_why_a_server_cannot_be_reached_without_its_url():
    port = free_port()  # nothing listens there
    assert tracking.probe(f"http://alice:s3cret@127.0.0.1:{port}") == "Connection refused"
    why = tracking.probe("http://alice:s3cret@no-such-host.invalid:5000")
    assert why is not None and "s3cret" not in why and "invalid" not in why


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
    absolute = TrackingParams(uri="sqlite:////data/m.db", experiment="e", register_model=None)
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
def test_epoch_logger_logs_metrics_per_step_and_grids(store, tmp_path):
    run_id, _ = tracking.start_run(store, "exp", params={}, tags={})
    examples = make_images(3, 32, 1, 0)
    logger = tracking.EpochLogger(
        store, run_id, epochs=3, image_every=2, examples=examples, outbox=str(tmp_path / "out")
    )
    model = ConvVAE(VAEConfig(height=32, width=32, widths=(8,), latent_dim=2))
    keys = ("train_neg_elbo", "val_neg_elbo", "train_kl", "val_active_units")
    keys += ("train_images_per_s", "train_data_wait_share", "train_kl_dim_0", "val_kl_dim_1")
    for epoch in range(3):
        row = {"epoch": epoch, **{k: float(epoch + 1) for k in keys}}
        logger(epoch, row, model)
    client = MlflowClient(store)
    history = client.get_metric_history(run_id, "val/neg_elbo")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert sorted(client.get_run(run_id).data.metrics) == [
        "train/data_wait_share", "train/images_per_s", "train/kl", "train/neg_elbo",
        "val/active_units", "val/neg_elbo",
    ]  # fmt: skip
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    pngs = [p for p in images if p.endswith(".png")]  # key+step+N+timestamp+...png

    def steps(key: str) -> list[int]:
        return sorted(int(p.split("+")[2]) for p in pngs if f"/{key}+" in p)

    # the first epoch (MLflow's image cards open there), every 2nd (step 1) and the last
    assert steps("reconstructions") == [0, 1, 2]
    assert steps("prior_samples") == [0, 1, 2]
    assert not list((tmp_path / "out").iterdir())  # all sent


@pytest.mark.slow
def test_outbox_keeps_what_a_down_server_missed_and_never_logs_a_step_twice(store, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens: a tracking server that is down
    run_id, _ = tracking.start_run(store, "exp", params={}, tags={})
    grid = np.zeros((10, 20, 3), np.uint8)
    outage = tracking.Outbox(down, run_id, tmp_path / "out")
    for epoch in (0, 1):
        outage.put(epoch, {"train_kl": float(epoch)}, {"reconstructions": grid})
        assert not outage.send() and outage.down
    assert outage.waiting() == [0, 1]

    back = tracking.Outbox(store, run_id, tmp_path / "out")  # the server answers again
    assert back.send() and back.waiting() == []
    back.put(1, {"train_kl": 9.0}, {"reconstructions": grid})  # epoch 1 trained again
    back.put(2, {"train_kl": 2.0}, {})
    assert tracking.Outbox(store, run_id, tmp_path / "out").send()  # (a resumed worker)
    history = MlflowClient(store).get_metric_history(run_id, "train_kl")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 1.0), (2, 2.0)]
    images = [a.path for a in MlflowClient(store).list_artifacts(run_id, "images")]
    assert sorted(p.split("+")[2] for p in images if p.endswith(".png")) == ["0", "1"]


def _complete_grids(store: str, run_id: str) -> list[str]:
    """Steps of the grids the run holds in full: the PNG and its thumbnail (MLflow's UI card)."""
    names = [a.path for a in MlflowClient(store).list_artifacts(run_id, "images")]
    png = {n.removesuffix(".png") for n in names if n.endswith(".png")}
    webp = {n.removesuffix("+compressed.webp") for n in names if n.endswith(".webp")}
    return sorted(stem.split("+")[2] for stem in png & webp)


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["log_batch", "log_image", "thumbnail"])
def test_outbox_never_resends_what_the_server_applied_before_its_answer_was_lost(
    store, tmp_path, monkeypatch, lost
):
    """The server dies after applying a request but before answering (the at-least-once window
    of a retry): the next send must find the step, or the grid, already in the run. A grid
    cut off between its PNG and its thumbnail ("thumbnail") gets the thumbnail MLflow would
    have written, and no second PNG (a step with two images in the UI)."""
    run_id, _ = tracking.start_run(store, "exp", params={}, tags={})
    grid = np.random.default_rng(0).integers(0, 256, (100, 300, 3), dtype=np.uint8)
    outbox = tracking.Outbox(store, run_id, tmp_path / "out")
    outbox.put(0, {"train_kl": 0.0}, {"reconstructions": grid})
    assert outbox.send()  # the run's holdings are read now, before the outage
    method = "log_batch" if lost == "log_batch" else "log_image"
    applied = getattr(MlflowClient, method)

    def applied_then_lost(self, *args, **kwargs):
        applied(self, *args, **kwargs)
        raise ConnectionError("Connection aborted: RemoteDisconnected")

    monkeypatch.setattr(MlflowClient, method, applied_then_lost)
    outbox.put(1, {"train_kl": 1.0}, {"reconstructions": grid})
    assert not outbox.send() and outbox.waiting() == [1]
    if lost == "thumbnail":  # the PNG landed, the thumbnail upload did not
        (thumbnail,) = (tmp_path / "mlartifacts").rglob("reconstructions+step+1+*.webp")
        mlflows_own = np.asarray(Image.open(thumbnail))  # as log_image made it
        thumbnail.unlink()
    monkeypatch.setattr(MlflowClient, method, applied)  # the server answers again
    assert outbox.send() and outbox.waiting() == []
    history = MlflowClient(store).get_metric_history(run_id, "train_kl")
    assert sorted(m.step for m in history) == [0, 1]
    assert _complete_grids(store, run_id) == ["0", "1"]
    images = [a.path for a in MlflowClient(store).list_artifacts(run_id, "images")]
    pngs = sorted(p.split("+")[2] for p in images if p.endswith(".png"))
    assert pngs == ["0", "1"]
    if lost == "thumbnail":
        (completed,) = (tmp_path / "mlartifacts").rglob("reconstructions+step+1+*.webp")
        np.testing.assert_array_equal(np.asarray(Image.open(completed)), mlflows_own)


@pytest.mark.slow
def test_experiment_opens_in_the_model_training_view(store):
    client = MlflowClient(store)
    new = tracking.experiment_id(store, "fresh")
    assert client.get_experiment(new).tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    old = client.create_experiment("old")  # made before the tag existed: gets it
    chosen = client.create_experiment("chosen", tags={tracking.EXPERIMENT_KIND: "finetuning"})
    assert tracking.experiment_id(store, "old") == old
    assert client.get_experiment(old).tags[tracking.EXPERIMENT_KIND] == tracking.MODEL_TRAINING
    tracking.experiment_id(store, "chosen")  # a kind set by a user is kept
    assert client.get_experiment(chosen).tags[tracking.EXPERIMENT_KIND] == "finetuning"
    run_id, _ = tracking.start_run(store, "fresh", params={}, tags={})
    assert tracking.run_url(store, run_id) == (
        f"http://127.0.0.1:5000/#/experiments/{new}/runs/{run_id}?workflowType=machine_learning"
    )


def _git(repo, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=repo, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


@pytest.mark.slow
def test_training_run_records_its_data_code_and_pipeline_state(store, tmp_path):
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    _git(repo, "init", "-q")
    tracked = ["dvc.lock", "params.yaml", "metrics/train.json", "code.py"]
    for name in tracked:
        (repo / name).write_text("committed\n")
    _git(repo, "add", *tracked)
    _git(repo, "commit", "-q", "-m", "pipeline")
    outputs = [str(repo / "params.yaml"), str(repo / "metrics" / "train.json"), "s3://b/runs"]

    def dirty() -> str:
        tags = tracking.lineage_tags(repo, "train", outputs)
        assert tags["mlflow.source.git.commit"] == _git(repo, "rev-parse", "HEAD")
        assert tags["mlflow.source.name"] == "retina-vae train"
        return tags["retina_vae.git_dirty"]

    assert dirty() == "false"
    # what `dvc exp run -S` and the stages before train rewrite: the code is still the commit's
    for name in tracked[:3]:
        (repo / name).write_text("rewritten by DVC\n")
    assert dirty() == "false"
    (repo / "code.py").write_text("edited\n")  # uncommitted code
    assert dirty() == "true"
    assert "mlflow.source.git.commit" not in tracking.lineage_tags(tmp_path, "train")
    tags = tracking.lineage_tags(repo, "train", outputs)

    processed = write_processed(tmp_path)  # 64 train, 16 val, 8 test images
    sizes = split_sizes(processed)
    assert sizes == {"train_images": 64, "val_images": 16, "test_images": 8}
    run_id, _ = tracking.start_run(store, "exp", params={}, tags=tags)
    data_hash = "f" * 64
    for _ in range(2):  # a resumed run logs it again: still one input
        tracking.log_training_data(store, run_id, "data/processed", data_hash, sizes)
    run = MlflowClient(store).get_run(run_id)
    assert run.data.tags["mlflow.source.git.commit"] == tags["mlflow.source.git.commit"]
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "processed" and inp.dataset.digest == data_hash[:36]
    assert json.loads(inp.dataset.source) == {"uri": "data/processed"}
    assert json.loads(inp.dataset.profile) == sizes
    assert {(t.key, t.value) for t in inp.tags} == {("mlflow.data.context", "training")}


@pytest.mark.slow
def test_registered_model_encodes_images(store):
    import mlflow.pyfunc

    run_id, _ = tracking.start_run(store, "exp", params={}, tags={})
    torch.manual_seed(0)
    model = ConvVAE(VAEConfig(height=32, width=32, widths=(8,), latent_dim=3)).eval()
    images = make_images(4, 32, 1, 0)  # (4, 1, 32, 32) uint8
    tracking.log_model(
        store,
        run_id,
        model,
        images[:2],
        code_paths=[REPO / "vae_core"],
        step=0,
        register_as="encoder",
    )
    version = MlflowClient(store).get_model_version("encoder", "1")
    assert version.run_id == run_id
    with tracking.using_uri(store):
        served = mlflow.pyfunc.load_model("models:/encoder/1")
    x = images.astype(np.float32) / 255.0
    mu = served.predict(x)
    assert mu.shape == (4, 3)
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(mu, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("flat", "key"),
    [
        ("train_neg_elbo", "train/neg_elbo"),
        ("val_active_units", "val/active_units"),
        ("train_images_per_s", "train/images_per_s"),
        ("test_neg_elbo", "test/neg_elbo"),
        ("test_neg_elbo_bpd", "test/neg_elbo_bpd"),
        ("test_iwae_bpd", "test/iwae_bpd"),
        ("test_kl", "test/kl"),
        ("test_recon", "test/recon"),
        ("test_active_units", "test/active_units"),
        ("test_knn_accuracy", "latent/knn_accuracy"),  # "kn", not the likelihood's "kl"
        ("test_probe_auc_vs_pca", "latent/probe_auc_vs_pca"),
        ("test_spectrum_spearman", "latent/spectrum_spearman"),  # a name added later
        ("test_confound_source_folder", "confound/source_folder"),
        ("test_confound_eye_majority", "confound/eye_majority"),
        ("eval_images_train", "data/images_train"),
        ("test_images", "data/images_test"),
        ("train_images", "data/images_train"),  # images per epoch: a count, not a curve
        ("train_kl_dim_3", None),
        ("test_kl_dim_15", None),
        ("epoch_seconds", "epoch_seconds"),
    ],
)
def test_metric_names_are_placed_in_mlflow_sections(flat, key):
    assert tracking.metric_key(flat) == key


@pytest.mark.parametrize(
    ("changed", "experiment", "name"),
    [
        ({}, None, "defaults"),
        ({}, "sober-goat", "sober-goat: defaults"),
        ({"train.beta": 4.0, "model.latent_dim": 8}, None, "model.latent_dim=8 train.beta=4.0"),
        ({"model.widths": (32, 64)}, "exp-1", "exp-1: model.widths=[32, 64]"),
        ({f"demo.k{i:02d}": 1000 + i for i in range(20)}, None,
         " ".join(f"demo.k{i:02d}={1000 + i}" for i in range(7)) + " (+13 more)"),
        # a dataset set up in the uncommitted params.yaml: what the run varied comes first, and
        # a long path is passed over for the shorter keys after it
        ({"ingest.source": "/data/IDRiD/B. Disease Grading/1. Original Images/a. Training Set",
          "ingest.labels": "/data/IDRiD/B. Disease Grading/2. Groundtruths/a. IDRiD_Disease "
                           "Grading_Training Labels.csv",
          "ingest.label_column": "Retinopathy grade", "ingest.modality": "fundus",
          "train.beta": 0.5}, "sober-goat",
         "sober-goat: train.beta=0.5 ingest.label_column=Retinopathy grade "
         "ingest.modality=fundus (+2 more)"),
    ],
)  # fmt: skip
def test_run_name_says_what_differs_from_the_committed_params(changed, experiment, name):
    assert tracking.run_name(changed, experiment) == name
    assert len(tracking.run_name(changed)) <= tracking.RUN_NAME_LIMIT


def test_a_run_name_stays_within_the_limit_and_never_says_nothing():
    long_name = tracking.run_name({"train.beta": 0.5, "demo.k": 1}, "exp-" + "y" * 100)
    assert len(long_name) <= tracking.RUN_NAME_LIMIT and "train.beta=0.5" in long_name
    lone = tracking.run_name({"ingest.source": "/d/" + "x" * 300})
    assert len(lone) <= tracking.RUN_NAME_LIMIT and lone.startswith("ingest.source=/d/xxx")
    assert lone.endswith("…")


def test_dvc_experiment_tags_name_the_experiment_and_its_ref():
    rev = "ab" + "c" * 38
    env = {"DVC_EXP_NAME": "sober-goat", "DVC_EXP_BASELINE_REV": rev}
    assert tracking.dvc_experiment_tags(env) == {
        "dvc.exp_name": "sober-goat",
        "dvc.exp_baseline_rev": rev,
        "dvc.exp_ref": f"refs/exps/ab/{'c' * 38}/sober-goat",
    }
    assert tracking.dvc_experiment_tags({}) == {}


def test_changed_params_against_the_committed_file(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    _git(tmp_path, "add", "params.yaml")
    _git(tmp_path, "commit", "-qm", "params")
    from pipeline.params import load_params

    committed = tracking.committed_params(tmp_path / "params.yaml")
    assert committed == load_params(REPO / "params.yaml").flat()
    edited = {**committed, "model.latent_dim": 8, "model.widths": (16, 32)}
    assert tracking.changed_params(edited, committed) == {
        "model.latent_dim": 8,
        "model.widths": (16, 32),
    }
    assert tracking.committed_params(tmp_path / "other.yaml") is None  # not committed
    assert tracking.committed_params(tmp_path.parent / "params.yaml") is None  # not in git


def test_run_by_hand_from_an_uncommitted_params_file_is_named_against_the_committed_one(
    tmp_path, monkeypatch
):
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(var, raising=False)
    _git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    _git(tmp_path, "add", "params.yaml")
    _git(tmp_path, "commit", "-qm", "params")
    from pipeline.params import load_params

    wide = tmp_path / "wide.yaml"
    wide.write_text(
        (REPO / "params.yaml").read_text().replace("latent_dim: 16 ", "latent_dim: 32 ")
    )
    flat = load_params(wide).flat()
    assert flat["model.latent_dim"] == 32
    baseline = tmp_path / "params.yaml"
    assert tracking.run_labels(flat, wide, baseline) == ("wide.yaml: model.latent_dim=32", {})
    assert tracking.run_labels(flat, wide) == (None, {})  # nothing to compare with
    own = load_params(baseline).flat()  # the committed file itself: its own HEAD, no file label
    assert tracking.run_labels(own, baseline, baseline) == ("defaults", {})
    outside = tmp_path.parent / f"{tmp_path.name}-outside.yaml"  # not in any git repository
    outside.write_text(wide.read_text())
    try:
        name = tracking.run_labels(flat, outside, baseline)[0]
    finally:
        outside.unlink()
    assert name == f"{outside.name}: model.latent_dim=32"
