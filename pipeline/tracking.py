"""MLflow adapter: where the tracking store is, one run per training, per-epoch logging.

The only module of the project that talks to MLflow; every stage that logs goes through here:
``resolve_tracking_uri`` (env ``MLFLOW_TRACKING_URI`` wins; a relative ``sqlite:///x.db`` lives
at the repository root, also from inside a DVC experiment's temporary copy), ``start_run`` /
``finish_run`` on the driver, :class:`EpochLogger`, the picklable callback that Ray's rank-0
worker calls after each epoch, and ``evaluation_run`` / ``log_evaluation`` for evaluate. Only
one process logs each event, so a training has exactly one run whatever its worker count.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pandas as pd
import torch

from pipeline.errors import UserError
from pipeline.figures import image_grid
from pipeline.io import write_json
from pipeline.params import Params, ParamsError, TrackingParams, load_params, repo_root
from vae_core.model import LatentMeans

log = logging.getLogger("retina_vae.tracking")

RUN_TAG = "retina_vae.stage"
# tags that name a trained model (its params and data), carried onto a run that evaluates it
MODEL_TAGS = ("data_hash", "params_hash")
SQLITE = "sqlite:///"
# MLflow 3's experiment kind: its UI shows "custom_model_development" experiments in the
# model-training view (runs, metrics, models) instead of the GenAI one (traces, evaluations)
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def resolve_tracking_uri(tracking: TrackingParams, cwd: str | Path | None = None) -> str:
    """The MLflow tracking URI: env ``MLFLOW_TRACKING_URI``, else ``tracking.uri`` with a
    relative sqlite file (or plain folder) made absolute at :func:`repo_root`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    uri = tracking.uri
    if uri.startswith(SQLITE):
        db = uri[len(SQLITE) :]
        if db.startswith("/") or db == ":memory:":  # sqlite:////abs/path.db
            return uri
        return SQLITE + str(repo_root(cwd) / db)
    if "://" not in uri and not uri.startswith("/"):  # a plain relative folder ("mlruns")
        return str(repo_root(cwd) / uri)
    return uri


def artifact_root(uri: str) -> str | None:
    """Artifacts of a local sqlite store go to ``mlartifacts/`` beside the database file (as
    ``mlflow server`` does), not to ``./mlruns`` of whatever directory the stage ran in."""
    if uri.startswith(SQLITE) and uri != SQLITE + ":memory:":
        return (Path(uri[len(SQLITE) :]).parent / "mlartifacts").as_uri()
    return None  # a tracking server or file store decides


def client(uri: str) -> Any:
    """An MlflowClient on ``uri`` (mlflow imported lazily: it is slow to import)."""
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mlflow resets it on import
    _quiet_links()
    return MlflowClient(tracking_uri=uri)


def _quiet_links() -> None:
    """Stop MLflow printing "View run ... at: URL" when a run ends: its URL is the tracking
    URI as given, user and password included; the stages print their own link
    (:func:`run_url`, without user info) to the model-training view instead."""
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def without_user(uri: str) -> str:
    """``uri`` without its user info (``http://alice:pw@host:5000`` -> ``http://host:5000``)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri  # as written: urlunsplit would also drop sqlite:////abs's empty host
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


# MLflow's own token, auth and TLS variables (mlflow.utils.credentials.get_default_host_creds),
# which its client on rank 0 reads as the driver's does; user and password: worker_login()
MLFLOW_CREDENTIALS = (
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_AUTH",
    "MLFLOW_TRACKING_AWS_SIGV4",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
)


def worker_login() -> dict[str, str]:
    """The driver's MLflow login as variables for Ray workers, which may be on nodes without
    its ``~/.mlflow/credentials``: :data:`MLFLOW_CREDENTIALS` as set here, and the user and
    password MLflow's client uses here (each from ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD``,
    else from the credentials file)."""
    from mlflow.utils.credentials import read_mlflow_creds

    env = {k: os.environ[k] for k in MLFLOW_CREDENTIALS if k in os.environ}
    creds = read_mlflow_creds()
    login = {"MLFLOW_TRACKING_USERNAME": creds.username, "MLFLOW_TRACKING_PASSWORD": creds.password}
    return env | {name: value for name, value in login.items() if value}


def probe(uri: str, timeout: float = 5.0) -> str | None:
    """None when the tracking store at ``uri`` answers, else why not (one line).

    A tracking server's ``/health`` is asked once, within ``timeout`` seconds, by MLflow's own
    HTTP client (``http_request`` with the host credentials MLflow would use: the URI's user
    info, ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` or ``~/.mlflow/credentials``,
    ``MLFLOW_TRACKING_TOKEN``, its TLS settings), so the probe logs in exactly as the run
    will, but without MLflow's retries for minutes. Other stores (a sqlite file, a folder) are
    opened when used and not probed. Runs in the driver and, as a Ray task, on every node.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        answer = http_request(
            get_default_host_creds(uri), "/health", "GET",
            max_retries=0, backoff_factor=0, timeout=timeout, raise_on_status=False,
        )  # fmt: skip
    except Exception as exc:  # MLflow wraps what requests raised, its message naming the URL
        return _root_reason(exc)
    return None if answer.status_code == 200 else f"/health answered HTTP {answer.status_code}"


def _root_reason(exc: BaseException) -> str:
    """The innermost system reason under ``exc`` (``Connection refused``, ``Name or service not
    known``, a TLS verification failure), else ``timed out`` or the innermost exception's type:
    never the message of a wrapper, which quotes the URL with its user info."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        inner = getattr(exc, "reason", None)  # urllib3 keeps its cause there
        if not isinstance(inner, BaseException):
            inner = exc.__cause__ or exc.__context__
        if inner is None and exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]  # requests wraps urllib3's error as its first argument
        exc = inner
    for e in reversed(chain):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    if any("Timeout" in type(e).__name__ for e in chain):
        return "timed out"
    return type(chain[-1]).__name__


# the stores MLflow's client opens by URI scheme (a "+driver" suffix aside: postgresql+psycopg2)
STORE_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                 "databricks-uc", "uc", "file")  # fmt: skip


def uri_problem(uri: str) -> str | None:
    """Why MLflow cannot use the tracking URI ``uri`` as written (one line, the URI without
    its user info), or None: a host:port without ``http://``, a scheme no MLflow store has, a
    folder (MLflow 3 refuses its file store unless ``MLFLOW_ALLOW_FILE_STORE=true``), a sqlite
    file that cannot be opened (a folder, or a file where its folder should be; a missing
    folder is made, as MLflow makes it)."""
    shown = without_user(uri)
    if re.fullmatch(r"[A-Za-z0-9.-]+:[0-9]+/?", uri):
        return f"{shown} has no scheme: a tracking server is http://{uri}"
    scheme = urlsplit(uri).scheme.split("+")[0] if "://" in uri else ""
    if scheme and scheme not in STORE_SCHEMES:
        return f"{shown}: no MLflow store has the scheme {scheme}://"
    file_store = scheme in ("", "file")
    if file_store and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        return (
            f"{shown} is a folder, MLflow's file store, which MLflow 3 refuses (set "
            "MLFLOW_ALLOW_FILE_STORE=true to use it anyway)"
        )
    if uri.startswith(SQLITE) and uri != SQLITE + ":memory:":
        db = Path(uri[len(SQLITE) :])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)  # as MLflow does
            sqlite3.connect(db).execute("pragma schema_version").connection.close()
        except (OSError, sqlite3.Error) as exc:
            return f"{shown}: cannot open the database file ({getattr(exc, 'strerror', 0) or exc})"
    return None


def check_store(uri: str) -> None:
    """A UserError (one line, within seconds) when MLflow cannot use ``uri``
    (:func:`uri_problem`) or no tracking server answers at it."""
    problem = uri_problem(uri)
    if problem is not None:
        raise UserError(
            f"tracking.uri: {problem}; point tracking.uri / MLFLOW_TRACKING_URI at "
            "http(s)://HOST:PORT or sqlite:///FILE"
        )
    why = probe(uri)
    if why is not None:
        raise UserError(
            f"tracking.uri: no MLflow tracking server answers at {uri} ({why}); start it "
            "(`mlflow server --host 0.0.0.0 --port PORT`) or point tracking.uri / "
            "MLFLOW_TRACKING_URI at a running one"
        )


def experiment_id(uri: str, name: str) -> str:
    """The id of experiment ``name``, created if missing (restored if deleted).

    The experiment is tagged as a model-training one (``mlflow.experimentKind``), so MLflow 3's
    UI opens it in its model-training view rather than the GenAI one; an experiment that has
    no kind yet gets the tag, one whose kind a user chose keeps it.
    """
    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name(name)
    if exp is None:
        return mlflow_client.create_experiment(
            name, artifact_location=artifact_root(uri), tags={EXPERIMENT_KIND: MODEL_TRAINING}
        )
    if exp.lifecycle_stage == "deleted":
        mlflow_client.restore_experiment(exp.experiment_id)
    if EXPERIMENT_KIND not in exp.tags:
        mlflow_client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    return exp.experiment_id


def run_exists(uri: str, run_id: str | None) -> bool:
    """Whether ``run_id`` names a live run in the store at ``uri``."""
    if not run_id:
        return False
    from mlflow.exceptions import MlflowException

    try:
        return client(uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as exc:  # only "no such run" means absent: an outage is raised
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return False
        raise


def store_reason(exc: BaseException) -> str:
    """Why a tracking call failed, in one line without the URL (which may hold a password):
    the system reason under it (:func:`_root_reason`: ``Connection refused``, ``timed out``),
    else MLflow's error code."""
    reason = _root_reason(exc)
    if reason in ("MlflowException", "RestException"):
        return str(getattr(exc, "error_code", None) or reason)
    return reason


def failure_line(uri: str, exc: BaseException) -> str:
    """What a failed tracking call says, in one line: for MLflow's errors, whose message quotes
    the URL with its user info, ``uri`` without it and :func:`store_reason`; else the first
    line of the message (at most 200 characters)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return f"{without_user(uri)}: {store_reason(exc)}"
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def start_run(
    uri: str,
    experiment: str,
    *,
    params: dict[str, Any],
    tags: dict[str, str],
    run_id: str | None = None,
    run_name: str | None = None,
) -> tuple[str, bool]:
    """Reopen ``run_id`` when it exists in the store, else create a run with ``params`` and
    ``tags``; return ``(run_id, resumed)``. A reopened run is set back to RUNNING."""
    from mlflow.entities import RunStatus

    mlflow_client = client(uri)
    if run_exists(uri, run_id):
        mlflow_client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        mlflow_client.set_tag(run_id, "retina_vae.resumed", "true")
        return run_id, True
    run = mlflow_client.create_run(
        experiment_id(uri, experiment), tags={**tags, RUN_TAG: "train"}, run_name=run_name
    )
    new_id = run.info.run_id
    _log_params(mlflow_client, new_id, params)
    return new_id, False


def _log_params(mlflow_client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_value(v)) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow_client.log_batch(run_id, params=items[i : i + 100])


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED, FAILED or KILLED."""
    client(uri).set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------- metric names

# MLflow's UI shows one chart section per metric-name prefix before "/". The stages keep flat
# names (history rows, metrics/*.json for DVC); metric_key places each one in its section when
# it is logged, by its prefix alone, so a metric added later falls into place with no change here.
TEST_LIKELIHOOD = ("neg_elbo", "recon", "kl", "iwae", "active_units")  # test/: the bound, parts
PER_DIM = re.compile(r"_kl_dim_\d+$")  # KL of one latent dimension: a table, not J charts
IMAGE_COUNT = re.compile(r"^(?:eval_images_(\w+)|(train|val|test)_images)$")  # data/: counts


def metric_key(name: str) -> str | None:
    """The MLflow key of the flat metric ``name`` (its section before the "/"), or None for a
    metric that is not charted.

    ``train_X`` -> ``train/X``, ``val_X`` -> ``val/X``; ``test_confound_X`` -> ``confound/X``;
    the test likelihood ``test_{neg_elbo,recon,kl,iwae,active_units}[_...]`` -> ``test/...``;
    every other ``test_X`` (probes, clusters, spectrum, baselines...) -> ``latent/X``;
    ``eval_images_<split>``, ``<split>_images`` -> ``data/images_<split>``; ``*_kl_dim_<j>`` ->
    None (the KL profile is logged as one table); any other name is kept as it is.
    """
    if PER_DIM.search(name):
        return None
    count = IMAGE_COUNT.match(name)
    if count:
        return f"data/images_{count.group(1) or count.group(2)}"
    head, _, rest = name.partition("_")
    if head in ("train", "val") and rest:
        return f"{head}/{rest}"
    if head != "test" or not rest:
        return name
    if rest.startswith("confound_"):
        return f"confound/{rest.removeprefix('confound_')}"
    if any(rest == p or rest.startswith(p + "_") for p in TEST_LIKELIHOOD):
        return f"test/{rest}"
    return f"latent/{rest}"


def mlflow_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Flat metrics as MLflow logs them: keys by :func:`metric_key`, uncharted ones left out,
    ``epoch`` (the step) left out."""
    keyed = {metric_key(k): float(v) for k, v in metrics.items() if k != "epoch"}
    return {k: v for k, v in keyed.items() if k is not None}


def kl_profile(history: list[dict[str, float]]) -> pd.DataFrame:
    """The KL of every latent dimension per epoch and split, one table: rows (split, epoch),
    columns ``dim_0 .. dim_{J-1}`` in nats per image (from the history rows' ``*_kl_dim_j``)."""
    rows = []
    for row in history:
        for split in ("train", "val"):
            dims = {k: v for k, v in row.items() if k.startswith(f"{split}_kl_dim_")}
            if dims:
                values = {f"dim_{k.rsplit('_', 1)[1]}": v for k, v in dims.items()}
                rows.append({"split": split, "epoch": int(row["epoch"]), **values})
    return pd.DataFrame(rows)


def progress_line(epoch: int, epochs: int, row: dict[str, float]) -> str:
    """One console line per epoch."""
    return (
        f"epoch {epoch + 1:>3}/{epochs}  train -ELBO {row['train_neg_elbo']:9.2f}  "
        f"val -ELBO {row['val_neg_elbo']:9.2f}  KL {row['train_kl']:7.2f}  "
        f"AU {int(row['val_active_units']):>3}  {row['train_images_per_s']:8.0f} img/s"
        f"  data wait {row['train_data_wait_share']:4.0%}"
    )


# Rank 0 sends its epoch logs with one try and a short timeout: a tracking server that is down
# then costs an epoch milliseconds (a refused connection) or seconds, not MLflow's minutes of
# retries, and what was not sent waits in the outbox for the next try.
ONE_TRY = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


# metric steps held, (key, step) of whole grids, {(key, step): PNG name} of grids cut short
_Held = tuple[set[int], set[tuple[str, int]], dict[tuple[str, int], str]]


class Outbox:
    """One run's epoch logs on their way to the tracking store, kept in ``folder`` until sent.

    :meth:`put` writes an epoch's metrics and image grids there; :meth:`send` delivers every
    waiting epoch in order and removes it, and stops at the first failure, leaving the rest
    for the next call: training never waits for, or dies of, a tracking server that is down.
    An epoch whose step the run already holds is not logged again (a resumed training repeats
    the epoch whose checkpoint the interruption lost). Each outage is reported in one line.
    """

    def __init__(self, uri: str, run_id: str, folder: str | Path) -> None:
        self.uri, self.run_id, self.folder = uri, run_id, Path(folder)
        self.down = False  # inside an outage (reported once)
        # what the run holds, read at the first send and after each failure: metric steps,
        # (key, step) of whole image grids, and those cut off before their thumbnail
        self._held: _Held | None = None

    def put(self, epoch: int, metrics: dict[str, float], grids: dict[str, np.ndarray]) -> None:
        """Keep epoch ``epoch``'s ``metrics`` and ``grids`` ({key: (H,W,3) uint8})."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for key, grid in grids.items():
            np.save(self.folder / f"{epoch:06d}.{key}.npy", grid)
        # the JSON last: an epoch counts as waiting once it is complete
        write_json(self.folder / f"{epoch:06d}.json", {"metrics": metrics, "time_ms": _now_ms()})

    def waiting(self) -> list[int]:
        """Epochs not yet sent, in order."""
        return sorted(int(p.stem) for p in self.folder.glob("*.json"))

    def send(self) -> bool:
        """Deliver the waiting epochs; True when none is left."""
        try:
            with one_try():
                for epoch in self.waiting():
                    self._send_epoch(epoch)
        except Exception as exc:  # any failure to log must leave training running
            # The server may have applied the request whose answer was lost: read what the
            # run holds again before the next send, so nothing is logged twice.
            self._held = None
            if not self.down:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                log.warning(
                    "tracking server %s unreachable (%s): training goes on; epoch logs wait "
                    "in %s and are sent when it answers",
                    self.uri,
                    reason,
                    self.folder,
                )
            self.down = True
            return False
        if self.down:
            log.info("tracking server %s answers again: waiting epoch logs sent", self.uri)
        self.down = False
        return True

    def _send_epoch(self, epoch: int) -> None:
        from mlflow.entities import Metric

        entry = json.loads((self.folder / f"{epoch:06d}.json").read_text())
        metrics = entry["metrics"]
        mlflow_client = client(self.uri)
        if self._held is None:
            self._held = self._read_held(mlflow_client, next(iter(metrics)))
        steps, images, cut = self._held
        grids = sorted(self.folder.glob(f"{epoch:06d}.*.npy"))
        if epoch not in steps:
            for path in grids:  # (the metrics last: they mark the epoch as logged)
                key = path.name.split(".")[1]
                if (key, epoch) in cut:  # its PNG is there: one more would be a duplicate
                    _log_thumbnail(mlflow_client, self.run_id, cut.pop((key, epoch)), path)
                elif (key, epoch) not in images:
                    mlflow_client.log_image(self.run_id, np.load(path), key=key, step=epoch)
                images.add((key, epoch))
            batch = [Metric(k, v, entry["time_ms"], epoch) for k, v in metrics.items()]
            for i in range(0, len(batch), 1000):  # MLflow's batch limit
                mlflow_client.log_batch(self.run_id, metrics=batch[i : i + 1000])
            steps.add(epoch)
        for path in grids:
            path.unlink()
        (self.folder / f"{epoch:06d}.json").unlink()

    def _read_held(self, mlflow_client: Any, key: str) -> _Held:
        """The metric steps of ``key`` (any: an epoch's metrics go in one batch), the
        (key, step) of the image grids the run holds in full, and {(key, step): PNG name} of
        those cut off between their two files.

        MLflow's ``log_image`` writes ``images/<key>+step+<s>+timestamp+<t>+<uuid>.png`` and then
        its ``...+compressed.webp`` (the UI's card): a grid whose PNG landed without it is
        completed with the thumbnail alone (:func:`_log_thumbnail`), never sent again, so no step
        shows two images. (Grid keys come from file names here, so they never hold the "/" that
        MLflow would write as "~".)
        """
        steps = {m.step for m in mlflow_client.get_metric_history(self.run_id, key)}
        names = [Path(a.path).name for a in mlflow_client.list_artifacts(self.run_id, "images")]
        png = {n.removesuffix(".png") for n in names if n.endswith(".png")}
        webp = {n.removesuffix("+compressed.webp") for n in names if n.endswith(".webp")}

        def grid(stem: str) -> tuple[str, int] | None:
            parts = stem.split("+")  # key, "step", s, "timestamp", t, uuid
            return (parts[0], int(parts[2])) if len(parts) > 2 and parts[2].isdigit() else None

        whole = {grid(stem) for stem in png & webp} - {None}
        cut = {grid(stem): stem for stem in sorted(png - webp)}
        return steps, whole, {k: v for k, v in cut.items() if k is not None and k not in whole}


def _log_thumbnail(mlflow_client: Any, run_id: str, stem: str, grid: Path) -> None:
    """Log the UI card of the grid saved in ``grid`` (a (H,W,3) uint8 ``.npy``) whose PNG the
    run holds as ``images/<stem>.png``: what MLflow's ``log_image`` writes after the PNG, made
    with its own resizing, and the tag it sets."""
    import tempfile

    from mlflow.tracking.multimedia import compress_image_size, convert_to_pil_image
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{stem}+compressed.webp"
        compress_image_size(convert_to_pil_image(np.load(grid))).save(path)
        mlflow_client.log_artifact(run_id, str(path), artifact_path="images")
    mlflow_client.set_tag(run_id, MLFLOW_LOGGED_IMAGES, True)


@contextmanager
def one_try() -> Iterator[None]:
    """MLflow's HTTP settings of :data:`ONE_TRY` for a block (a user's own values win)."""
    saved = {k: os.environ.get(k) for k in ONE_TRY}
    os.environ.update({k: saved[k] or v for k, v in ONE_TRY.items()})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class EpochLogger:
    """Rank 0's per-epoch callback: metrics (:func:`mlflow_metrics`) with ``step=epoch``, a
    progress line and, at the first epoch, every ``image_every`` epochs and at the last,
    reconstruction and prior-sample grids, sent through an :class:`Outbox` in ``outbox`` (a
    folder beside the run's checkpoints).

    Picklable (plain fields only).
    """

    def __init__(
        self,
        uri: str,
        run_id: str,
        epochs: int,
        image_every: int,
        examples: np.ndarray,
        outbox: str,
        seed: int = 0,
    ) -> None:
        self.uri, self.run_id = uri, run_id
        self.epochs, self.image_every, self.seed = epochs, image_every, seed
        self.examples = np.ascontiguousarray(examples)  # (N,C,H,W) uint8 val images
        self.outbox = Outbox(uri, run_id, outbox)

    def __call__(self, epoch: int, row: dict[str, float], model: Any) -> None:
        from pipeline.stage import redact_logs  # here: this runs on rank 0's Ray worker

        redact_logs()  # an outage's reason quotes the URI, password and all
        log.info(progress_line(epoch, self.epochs, row))
        # the first epoch too: MLflow's image cards open at the first step logged
        due = epoch == 0 or (epoch + 1) % self.image_every == 0 or epoch + 1 == self.epochs
        self.outbox.put(epoch, mlflow_metrics(row), self.grids(model) if due else {})
        self.outbox.send()

    def grids(self, model: Any) -> dict[str, np.ndarray]:
        """Originals over reconstructions, and samples from the prior: {key: (H,W,3) uint8}."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        x = torch.tensor(self.examples, device=device).float() / 255.0  # uint8 -> [0, 1]
        generator = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            recon = model.reconstruct(x).float().cpu().numpy()
            samples = model.sample(len(self.examples), generator=generator).float().cpu().numpy()
        model.train(was_training)
        pairs = np.concatenate([self.examples / 255.0, recon])  # row 1 originals, row 2 recon
        ncol = len(self.examples)
        return {
            "reconstructions": image_grid(pairs, ncol=ncol),
            "prior_samples": image_grid(samples, ncol=ncol),
        }


def log_kl_profile(uri: str, run_id: str, history: list[dict[str, float]]) -> None:
    """The training's :func:`kl_profile` as the run's ``training/kl_per_dim.csv`` (one table,
    shown as one by MLflow's artifact view, instead of a chart per latent dimension)."""
    table = kl_profile(history)
    if not table.empty:
        client(uri).log_text(run_id, table.to_csv(index=False), "training/kl_per_dim.csv")


def _now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def using_uri(uri: str) -> Iterator[None]:
    """Point mlflow's fluent API (``mlflow.start_run``...) at ``uri`` for a block only.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI, which would then override
    ``tracking.uri`` for every later stage run in the same process; both are restored here.
    """
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    _quiet_links()
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def log_model(
    uri: str,
    run_id: str,
    model: Any,
    example: np.ndarray,
    code_paths: list,
    step: int,
    register_as: str | None = None,
) -> None:
    """Log the encoder (images -> latent means) with ``mlflow.pytorch.log_model``, with a
    signature and an input example, into ``run_id``. ``code_paths``: vae_core's folder, so
    the model loads wherever torch is installed. ``step``: the last epoch, whose metrics MLflow
    copies onto the logged model (its page and the Models tab). ``register_as``: also register
    it, as the next version of that registered model
    (``mlflow.pyfunc.load_model("models:/<name>/<version>")``).
    """
    import mlflow
    import mlflow.pytorch
    from mlflow.models import infer_signature

    encoder = LatentMeans(model).eval()
    x = example.astype(np.float32) / 255.0  # (N,C,H,W) uint8 -> float in [0, 1]
    with torch.no_grad():
        mu = encoder(torch.from_numpy(x)).numpy()
    # The wrapper is vae_core's own class: loading needs vae_core (code_paths) and torch only.
    with using_uri(uri), mlflow.start_run(run_id=run_id):
        mlflow.pytorch.log_model(
            encoder,
            name="model",
            signature=infer_signature(x, mu),
            input_example=x,
            step=step,
            code_paths=[str(p) for p in code_paths],
            # Given, not inferred: inference re-loads the model in a subprocess (~10 s).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            # a new version of this registered model (models:/<name>/<version>)
            registered_model_name=register_as,
        )


def evaluation_run(
    uri: str,
    run_id: str | None,
    model_path: str,
    experiment: str,
    params: dict[str, Any] | None = None,
    labels: tuple[str | None, dict[str, str]] = (None, {}),
    lineage: dict[str, str] | None = None,
) -> str:
    """The training run ``run_id`` if the store has it and it holds this evaluation's
    ``evaluate.*`` params (``params``, flat); otherwise a new run in ``experiment``, tagged with
    the model it evaluates and ``lineage`` (:func:`lineage_tags` of the evaluating code), with
    the training run's datasets, a warning or a note saying so.

    A DVC experiment that changes only ``evaluate.*`` re-uses the trained model (DVC skips or
    restores ``train``): its evaluation gets a run of its own, named and tagged by ``labels``
    (:func:`run_labels`), with ``params`` and the training run's ``data_hash``, ``params_hash``
    and ``train/``, ``val/`` curves, so it compares with the others; the training run keeps the
    evaluation its params describe."""
    mlflow_client = client(uri)
    source = mlflow_client.get_run(run_id) if run_exists(uri, run_id) else None
    if source is not None:
        held = source.data.params
        other = [
            f"{k}={held[k]}"
            for k, v in sorted((params or {}).items())
            if k.startswith("evaluate.") and k in held and held[k] != _param_value(v)
        ]
        if not other:
            return run_id
        log.info(
            "training run %s holds the evaluation of %s: this one gets a run of its own",
            run_id,
            " ".join(other),
        )
    elif run_id:
        log.warning(
            "training run %s is not in the tracking store %s: logging to a new run", run_id, uri
        )
    else:
        log.warning("%s names no MLflow run: logging to a new run", model_path)
    exp_id = experiment_id(uri, experiment)
    pending = _pending_evaluation(mlflow_client, exp_id, run_id, params or {})
    if pending:  # a retry (--log-only) of a log that failed: the same run, not another
        return pending
    name, dvc_tags = labels
    tags = {
        **dvc_tags,
        RUN_TAG: "evaluate",
        "retina_vae.checkpoint": model_path,
        "retina_vae.trained_run_id": run_id or "unknown",
        **(lineage or {}),
    }
    if source is not None:
        tags.update({k: source.data.tags[k] for k in MODEL_TAGS if k in source.data.tags})
    new_id = mlflow_client.create_run(exp_id, tags=tags, run_name=name or "evaluate").info.run_id
    _log_params(mlflow_client, new_id, params or {})
    if source is not None and source.inputs.dataset_inputs:  # the Datasets panel: what it learnt
        mlflow_client.log_inputs(new_id, datasets=source.inputs.dataset_inputs)
    if source is not None:  # the training curves, so the run compares with training runs
        from mlflow.entities import Metric

        curves = [
            Metric(m.key, m.value, m.timestamp, m.step)
            for key in sorted(source.data.metrics)
            if key.startswith(("train/", "val/"))
            for m in mlflow_client.get_metric_history(run_id, key)
        ]
        for i in range(0, len(curves), 1000):  # MLflow's batch limit
            mlflow_client.log_batch(new_id, metrics=curves[i : i + 1000])
    return new_id


def _pending_evaluation(
    mlflow_client: Any, exp_id: str, run_id: str | None, params: dict[str, Any]
) -> str | None:
    """A run made by :func:`evaluation_run` for the model of ``run_id`` with these ``params``
    whose evaluation was never logged (no ``retina_vae.evaluated`` tag); None when there is
    none. A finished one is never reused: a new evaluation gets a new run."""
    if not run_id:
        return None
    found = mlflow_client.search_runs(
        [exp_id],
        f"tags.`retina_vae.trained_run_id` = '{run_id}' and tags.`{RUN_TAG}` = 'evaluate'",
    )
    want = {k: _param_value(v) for k, v in params.items()}
    for run in found:
        if "retina_vae.evaluated" not in run.data.tags and run.data.params == want:
            return run.info.run_id
    return None


def _last_epoch_step(mlflow_client: Any, run: Any) -> int:
    """The step of ``run``'s last logged epoch (its first ``val/`` or ``train/`` curve);
    0 for a run without curves."""
    keys = sorted(k for k in run.data.metrics if k.startswith(("val/", "train/")))
    history = mlflow_client.get_metric_history(run.info.run_id, keys[0]) if keys else []
    return max((m.step for m in history), default=0)


def _ready_model(mlflow_client: Any, run: Any) -> Any:
    """The run's logged model of the highest step among those that finished uploading (READY),
    else among all, else None: a model whose upload a store outage cut off (FAILED) stays
    beside the one a re-run logged, and must not receive the evaluation."""
    models = list(run.outputs.model_outputs) if run.outputs else []
    ready = [o for o in models if str(mlflow_client.get_logged_model(o.model_id).status) == "READY"]
    return max(ready or models, key=lambda o: o.step, default=None)


def _new_values(run: Any, metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` less those the run already holds with the same latest value: a re-logged
    evaluation (``--log-only`` after a partial failure) and the image counts the epochs logged
    already are not written twice."""
    held = run.data.metrics
    return {k: v for k, v in metrics.items() if k not in held or held[k] != v}


def log_evaluation(
    uri: str,
    run_id: str,
    folder: Path,
    metrics: dict[str, float],
    artifact_path: str,
    tables: list[str],
) -> None:
    """Log an evaluation into ``run_id``: ``metrics`` (flat names, placed by
    :func:`mlflow_metrics`; also on the run's logged model, at the step it was logged with,
    so its page shows them beside the final training metrics; without a model, at the run's
    last epoch step, so an evaluation-only run's charts line up with the others), the whole
    ``folder`` under ``artifact_path``, each CSV of ``tables`` (paths relative to ``folder``)
    that exists also as an MLflow table (``<name>.json``, for ``mlflow.load_table``), and the
    tag ``retina_vae.evaluated``."""
    import mlflow

    mlflow_client = client(uri)
    run = mlflow_client.get_run(run_id)
    model = _ready_model(mlflow_client, run)
    step = model.step if model else _last_epoch_step(mlflow_client, run)
    with using_uri(uri), mlflow.start_run(run_id=run_id):
        mlflow.log_metrics(
            _new_values(run, mlflow_metrics(metrics)),
            step=step,
            model_id=model.model_id if model else None,
        )
        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
        for table in tables:
            if (folder / table).is_file():
                name = f"{artifact_path}/{Path(table).with_suffix('.json').as_posix()}"
                mlflow.log_table(pd.read_csv(folder / table), artifact_file=name)
        mlflow.set_tag("retina_vae.evaluated", "true")


def run_url(uri: str, run_id: str, base: str | None = None) -> str:
    """The run's page in the MLflow UI, in the model-training view.

    MLflow 3.17's UI picks the GenAI or model-training view from a switch it remembers per
    browser (GenAI by default), not from the experiment's kind tag; the ``workflowType`` query
    parameter sets that switch. ``base``: the UI's address; by default a tracking server's
    own, and for a local store ``retina-vae ui``'s (and ``mlflow ui``'s) default.
    """
    experiment = client(uri).get_run(run_id).info.experiment_id
    if base is None:
        web = uri.startswith(("http://", "https://"))
        # a link to click and share: without the user name and password a URI may hold
        base = without_user(uri).rstrip("/") if web else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment}/runs/{run_id}?workflowType=machine_learning"


def newest_run(uri: str, experiment: str) -> tuple[str, str] | None:
    """(run id, run name) of the run of ``experiment`` started last; None when it has none."""
    mlflow_client = client(uri)
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlflow_client.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    return (runs[0].info.run_id, runs[0].info.run_name) if runs else None


# ----------------------------------------------------------------------------- lineage

DATASET_NAME = "processed"
DATASET_CONTEXT = "training"


def lineage_tags(repo: Path, stage: str, pipeline_files: Iterable[str] = ()) -> dict[str, str]:
    """Run tags that say which code a run came from: ``mlflow.source.git.commit`` (the run's
    Source in MLflow), ``mlflow.source.name`` (``retina-vae <stage>``), ``mlflow.source.type``
    and ``retina_vae.git_dirty``: whether tracked files other than ``dvc.lock`` and
    ``pipeline_files`` (the params file and the stage outputs, which ``dvc repro`` and
    ``dvc exp run -S`` rewrite before a stage runs; the params are the run's params) differ
    from the commit. Outside git, the git tags are left out."""
    tags = {"mlflow.source.name": f"retina-vae {stage}", "mlflow.source.type": "LOCAL"}
    commit = _git(repo, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        inside = [_inside(repo, p) for p in (str(repo / "dvc.lock"), *pipeline_files)]
        spec = [f":(exclude){p}" for p in inside if p]
        dirty = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".", *spec)
        if dirty is not None:
            tags["retina_vae.git_dirty"] = "true" if dirty else "false"
    return tags


def pipeline_files(params: Params, params_path: Path) -> list[str]:
    """The params file and every local ``paths.*`` output: what a DVC run rewrites before a
    stage runs (for :func:`lineage_tags`)."""
    outputs = (v for v in dataclasses.asdict(params.paths).values() if "://" not in v)
    return [str(params_path), *outputs]


def _inside(repo: Path, path: str) -> str | None:
    """``path`` (relative to the working directory) relative to ``repo``, or None outside."""
    try:
        return Path(path).resolve().relative_to(repo.resolve()).as_posix()
    except ValueError:
        return None


def _git(repo: Path, *args: str) -> str | None:
    """``git args`` in ``repo``: its stripped output, or None when git fails or is missing."""
    import subprocess

    try:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def committed_params(path: Path) -> dict[str, Any] | None:
    """The params file ``path`` as committed at git HEAD (in a ``dvc exp run``, the
    experiment's baseline), flat as :meth:`pipeline.params.Params.flat` gives it; None outside
    git, when HEAD lacks the file or when it no longer validates."""
    import tempfile

    text = _git(path.resolve().parent, "show", f"HEAD:./{path.name}")
    if text is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        committed = Path(tmp) / "params.yaml"
        committed.write_text(text)
        try:
            return load_params(committed).flat()
        except ParamsError:
            return None


def run_labels(
    flat: dict[str, Any], params_path: Path, baseline: Path | None = None
) -> tuple[str | None, dict[str, str]]:
    """The name and DVC tags of a new training run: :func:`run_name` of the DVC experiment and
    the params that differ from the committed ``params_path``, and :func:`dvc_experiment_tags`.
    A params file git does not hold (a copy run by hand with ``--params``) is compared with the
    committed ``baseline`` (the repository's params.yaml) and named after its file name, e.g.
    ``wide.yaml: model.latent_dim=32``. None (MLflow's own random name) when neither is known."""
    tags = dvc_experiment_tags()
    committed, label = committed_params(params_path), tags.get("dvc.exp_name")
    if committed is None and baseline is not None:
        committed, label = committed_params(baseline), label or params_path.name
    if committed is None:  # an experiment's name alone, or MLflow's
        return tags.get("dvc.exp_name"), tags
    return run_name(changed_params(flat, committed), label), tags


def dvc_experiment_tags(env: dict[str, str] | None = None) -> dict[str, str]:
    """Tags that match a run to the DVC experiment that ran it (``dvc exp run`` exports its
    name and baseline commit to the stage): ``dvc.exp_name`` (as ``dvc exp show`` lists it),
    ``dvc.exp_baseline_rev`` and ``dvc.exp_ref``, the git ref DVC keeps the experiment under
    (``refs/exps/<sha[:2]>/<sha[2:]>/<name>``, ``git show <ref>``). Empty outside one."""
    env = os.environ if env is None else env
    name, rev = env.get("DVC_EXP_NAME"), env.get("DVC_EXP_BASELINE_REV")
    if not name:
        return {}
    tags = {"dvc.exp_name": name}
    if rev:
        tags["dvc.exp_baseline_rev"] = rev
        tags["dvc.exp_ref"] = f"refs/exps/{rev[:2]}/{rev[2:]}/{name}"
    return tags


RUN_NAME_LIMIT = 120  # characters; MLflow's run list shows about this much


# What a researcher varies between runs comes first in a run name; the set-up (which data,
# where things go) last: an uncommitted dataset block must not hide the one param a run changed.
NAME_ORDER = ("model", "train", "evaluate", "preprocess", "data", "ingest", "demo", "cluster")


def run_name(changed: dict[str, Any], experiment: str | None = None) -> str:
    """A run name that says what the run is: the DVC experiment's name (when there is one),
    then the params that differ from the committed params.yaml (``key=value``; by group in
    :data:`NAME_ORDER`, then by key), or ``defaults`` when none do. Within RUN_NAME_LIMIT, as
    many as fit, in that order (a long one is passed over for shorter ones after it), then the
    count of those left out."""

    def order(key: str) -> tuple[int, str]:
        group = key.split(".")[0]
        return (NAME_ORDER.index(group) if group in NAME_ORDER else len(NAME_ORDER), key)

    prefix = f"{experiment[: RUN_NAME_LIMIT // 2]}: " if experiment else ""
    limit = RUN_NAME_LIMIT - len(prefix)
    parts = [f"{k}={_param_value(changed[k])}" for k in sorted(changed, key=order)]
    name = " ".join(parts) or "defaults"
    if len(name) > limit:
        budget = limit - len(f" (+{len(parts)} more)")  # room for the count
        kept: list[str] = []
        for part in parts:
            if len(" ".join([*kept, part])) <= budget:
                kept.append(part)
        kept = kept or [parts[0][: budget - 1] + "…"]  # one long value: its start, not nothing
        left = len(parts) - len(kept)
        name = " ".join([*kept, f"(+{left} more)"] if left else kept)
    return prefix + name


def changed_params(flat: dict[str, Any], committed: dict[str, Any] | None) -> dict[str, Any]:
    """The entries of ``flat`` whose value differs from ``committed`` (both as
    :meth:`pipeline.params.Params.flat` gives them; None: nothing to compare with)."""
    if committed is None:
        return {}
    return {k: v for k, v in flat.items() if _param_value(committed.get(k)) != _param_value(v)}


def log_training_data(
    uri: str, run_id: str, source: str, data_hash: str, sizes: dict[str, int]
) -> None:
    """Log the processed arrays as the run's training dataset (MLflow's Datasets panel).

    An MLflow dataset named ``processed`` whose digest is the data hash (its first 36 hex
    digits, MLflow's limit; the full hash is the run tag ``data_hash``), whose source is the
    DVC-tracked folder ``source`` (as in params.yaml, relative to the repository), and whose
    profile holds the split sizes; context ``training``. Same effect as ``mlflow.log_input``,
    through the client, so a run in progress stays open.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entity = Dataset(
        name=DATASET_NAME,
        digest=data_hash[:36],
        source_type="local",  # as mlflow.data's LocalArtifactDatasetSource writes a local path
        source=json.dumps({"uri": source}),
        profile=json.dumps(sizes),
    )
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, DATASET_CONTEXT)]
    client(uri).log_inputs(run_id, datasets=[DatasetInput(entity, tags=tags)])
