"""Typed settings: ``params.yaml`` read once into frozen, validated dataclasses.

Each stage calls :func:`load_params` once at start and passes the groups (or plain values) down.
Validation is pydantic's (strict types, ``extra="forbid"``); any problem becomes a one-line
:class:`ParamsError` that names the file and the dotted key.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator
from pydantic.dataclasses import dataclass

from pipeline.errors import UserError

_STRICT = ConfigDict(extra="forbid", strict=True)
Pos = Annotated[int, Field(gt=0)]
NonNeg = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]


REDACTED = "<redacted>"
# Keys whose value is a secret: shown as REDACTED in every error message, log line and MLflow.
SECRETS = frozenset({"ingest.salt"})
# Secrets inside a URI (a tracking server's or database's address, an object store's): the
# password of its user info (postgresql://user:PASSWORD@host/db, http://user:PASSWORD@host)
# and the value of a query parameter named like a credential (?access_key=..., ?token=...).
# A web address's user info ends at its last @ before the first / ? # (RFC 3986, as requests
# reads it); a database URL's password at its first @, whatever it holds (SQLAlchemy's URL
# grammar: postgresql://alice:pa/ss@db/mlflow has the password pa/ss).
_WEB = r"(?:https?|wss?|ftps?)://"
_URI_PASSWORD = re.compile(rf"(?i)\b({_WEB}[^/?#@:\s]*):[^/?#\s]*@")
_DB_PASSWORD = re.compile(rf"(?i)\b((?!{_WEB})[a-z][a-z0-9+.-]*://[^:/@\s]*):[^@\s]*@")
_URI_SECRET_QUERY = re.compile(
    r"(?i)([?&;](?!(?:sslkey|ssl_key|sslcert|ssl_cert|passfile|authsource|authmechanism)=)"
    r"[^=&;#\s]*(?:pass|secret|token|key|sig|credential|auth)[^=&;#\s]*=)"
    r"""[^&;#\s)'"<>]*"""  # the value, up to the next parameter or a closing bracket
)  # not the names of a key file or an auth method (libpq's sslkey, passfile; MongoDB's)


def redact_uri(text: str) -> str:
    """``text`` with every URI's password and credential-named query values replaced by
    REDACTED (``postgresql://alice:pw@db/mlflow`` -> ``postgresql://alice:<redacted>@db/mlflow``);
    the user name, host, path and other parameters stay, so the address can still be told apart.
    Text without such secrets is returned unchanged."""
    text = _URI_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    text = _DB_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    if " " in text and _database_password(text):  # one database URL, a space in its password
        text = re.sub(r"^([^:/@]+://[^:/@]*):[^@]*@", rf"\1:{REDACTED}@", text, count=1)
    return _URI_SECRET_QUERY.sub(rf"\1{REDACTED}", text)


def _database_password(uri: str) -> bool:
    """Whether SQLAlchemy, which opens MLflow's database stores, reads a password in ``uri``
    (it takes any text up to the @, spaces too, which a scan of log text cannot)."""
    if re.match(rf"(?i){_WEB}", uri) or not re.match(r"(?i)[a-z][a-z0-9+.-]*://", uri):
        return False
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return bool(make_url(uri).password)
    except (ArgumentError, ValueError):
        return False


def repo_root(cwd: str | Path | None = None) -> Path:
    """The repository root: the current directory, or the real repository when the current
    directory is a DVC experiment's temporary copy (``<repo>/.dvc/tmp/exps/...``)."""
    path = Path(cwd or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def external_path(written: str, cwd: str | Path | None = None) -> Path:
    """A path the user points at their own data (``ingest.source``, ``ingest.labels``): ``~``
    expanded; an absolute one as written; a relative one as written in the workspace, and in a
    DVC experiment's temporary copy (``dvc exp run --temp``, a queued run) inside the copy when
    it is there (a file git tracks: the experiment's own snapshot of it), else at
    :func:`repo_root` (data git does not hold), so the experiment reads what ``dvc repro``
    would at its commit. (``paths.*`` are the repository's own outputs: they stay relative to
    where DVC runs the stage.)"""
    path, here = Path(written).expanduser(), Path(cwd or os.getcwd()).resolve()
    root = repo_root(here)
    if path.is_absolute() or root == here or os.path.lexists(here / path):
        return path
    return root / path


def shown_path(written: str, cwd: str | Path | None = None) -> str:
    """``written`` for a message, with what :func:`external_path` resolved it to where that
    differs (in a DVC experiment's temporary copy)."""
    path = external_path(written, cwd)
    return written if path == Path(written) else f"{written} (resolved to {path})"


class ParamsError(UserError):
    """A params file that cannot be used; the message is one line naming file and key."""


@dataclass(frozen=True, config=_STRICT)
class PathsParams:
    demo: str
    manifest: str
    quarantine: str
    duplicates: str
    ingest_report: str
    sources: str
    processed: str
    preprocess_report: str
    model: str
    checkpoints: str
    train_metrics: str
    train_history: str
    evaluation: str
    eval_metrics: str


@dataclass(frozen=True, config=_STRICT)
class DemoParams:
    seed: int
    patients: Pos
    images_per_eye: Pos
    oct_height: Annotated[int, Field(ge=32)]
    oct_width: Annotated[int, Field(ge=32)]
    fundus_size: Annotated[int, Field(ge=32)]
    dicom_fraction: Annotated[float, Field(ge=0.0, le=1.0)]
    workers: Pos


@dataclass(frozen=True, config=_STRICT)
class IngestParams:
    source: str
    labels: str | None
    path_column: Annotated[str, Field(min_length=1)]
    label_column: Annotated[str, Field(min_length=1)]
    patient_column: Annotated[str, Field(min_length=1)]
    eye_column: Annotated[str, Field(min_length=1)]
    split_column: Annotated[str, Field(min_length=1)] | None
    folder_labels: bool
    modality: Literal["oct", "fundus"]
    patient_pattern: str
    oct_frames: Literal["all", "central"]
    min_size: Pos
    max_pixels: Pos
    max_quarantine_fraction: Annotated[float, Field(ge=0.0, le=1.0)]
    allow_burned_in_annotation: bool
    salt: str | None
    workers: Pos

    @field_validator("patient_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            if re.compile(value).groups < 1:
                raise ValueError("needs one capture group for the patient ID")
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from None
        return value

    @field_validator("salt", mode="before")  # before the type check: a number is no key either
    @classmethod
    def _salt_not_here(cls, value: Any) -> None:
        # as for a URI's password: DVC copies every param into dvc.lock, its run cache and
        # each experiment's commit, and `dvc exp show` / `retina-vae exps` print it
        if value is not None:
            raise ValueError(
                "a key written here is copied by DVC into dvc.lock and every experiment: set it "
                "in the environment variable RETINA_VAE_SALT (deid.SALT_ENV) instead and leave "
                "ingest.salt null"
            )
        return value


@dataclass(frozen=True, config=_STRICT)
class PreprocessParams:
    image_size: tuple[Annotated[int, Field(ge=28)], Annotated[int, Field(ge=28)]]
    oct_aspect: Literal["pad", "crop"]
    illumination: Literal["none", "graham", "clahe"]
    val_fraction: Annotated[float, Field(gt=0.0, lt=1.0)]  # training reports on val
    test_fraction: Fraction
    seed: int
    workers: Pos


@dataclass(frozen=True, config=_STRICT)
class DataParams:
    engine: Literal["local", "ray"]
    shard_size: Pos


@dataclass(frozen=True, config=_STRICT)
class ModelParams:
    latent_dim: Pos
    widths: Annotated[tuple[Pos, ...], Field(min_length=1, max_length=6)]
    likelihood: Literal["bernoulli", "gaussian", "gaussian_optimal", "logistic"]
    arch: Literal["conv", "resnet"]
    blocks_per_stage: Pos


@dataclass(frozen=True, config=_STRICT)
class TrainParams:
    epochs: Pos
    batch_size: Pos
    lr: Annotated[float, Field(gt=0.0)]
    weight_decay: Annotated[float, Field(ge=0.0)]
    lr_schedule: Literal["cosine", "constant"]
    grad_clip: Annotated[float, Field(ge=0.0)]
    beta: Annotated[float, Field(ge=0.0)]
    kl_warmup_epochs: NonNeg
    free_bits: Annotated[float, Field(ge=0.0)]
    samples: Pos
    augment_rotation: Annotated[float, Field(ge=0.0, le=180.0)]
    augment_jitter: Annotated[float, Field(ge=0.0, lt=1.0)]
    augment_hflip: bool
    view_crop_scale: Annotated[float, Field(gt=0.0, le=1.0)]
    view_rotation: Annotated[float, Field(ge=0.0, le=180.0)]
    view_jitter: Annotated[float, Field(ge=0.0, lt=1.0)]
    view_noise: Annotated[float, Field(ge=0.0)]
    view_mask_ratio: Annotated[float, Field(ge=0.0, lt=1.0)]
    view_mask_patch: Pos
    consistency_weight: Annotated[float, Field(ge=0.0)]
    contrastive_weight: Annotated[float, Field(ge=0.0)]
    contrastive_temperature: Annotated[float, Field(gt=0.0)]
    seed: int
    num_workers: Pos
    cpus_per_worker: Annotated[float, Field(gt=0.0)]
    use_gpu: bool
    gpus_per_worker: Annotated[float, Field(gt=0.0)]
    bf16: bool
    channels_last: bool
    cpu_bf16: bool
    cpu_channels_last: bool
    compile: bool
    max_failures: Annotated[int, Field(ge=-1)]
    startup_timeout_s: Annotated[float, Field(gt=0.0)]
    image_every: Pos
    checkpoints_to_keep: Pos
    loader_workers: NonNeg


@dataclass(frozen=True, config=_STRICT)
class EvaluateParams:
    iwae_k: Pos
    batch_size: Pos
    map_method: Literal["tsne", "pca"]
    map_points: Pos
    knn_k: Pos
    traversal_dims: Pos
    traversal_steps: Annotated[int, Field(ge=3)]
    bootstrap: NonNeg
    label_order: Annotated[tuple[str, ...], Field(min_length=2)] | None
    seed: int


@dataclass(frozen=True, config=_STRICT)
class TrackingParams:
    uri: str
    experiment: Annotated[str, Field(min_length=1)]
    register_model: Annotated[str, Field(min_length=1)] | None

    @field_validator("uri")
    @classmethod
    def _no_secret(cls, value: str) -> str:
        # DVC copies every param into dvc.lock, its run cache and each experiment's commit,
        # where no redaction reaches: a credential goes in MLflow's own variables instead
        if redact_uri(value) != value:
            raise ValueError(
                "holds a password or token, which DVC would copy into dvc.lock and every "
                "experiment: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                "MLFLOW_TRACKING_TOKEN), or the whole URI in MLFLOW_TRACKING_URI, instead"
            )
        return value


@dataclass(frozen=True, config=_STRICT)
class ClusterParams:
    address: str | None
    ship_code: bool
    worker_env: dict[str, str]
    forward_env: tuple[str, ...]


@dataclass(frozen=True, config=_STRICT)
class Params:
    paths: PathsParams
    demo: DemoParams
    ingest: IngestParams
    preprocess: PreprocessParams
    data: DataParams
    model: ModelParams
    train: TrainParams
    evaluate: EvaluateParams
    tracking: TrackingParams
    cluster: ClusterParams

    def flat(self) -> dict[str, Any]:
        """All params as ``{"group.key": value}`` (for MLflow and hashing).

        Secrets are redacted: the pseudonymisation key (``ingest.salt``) would let anyone who
        can read the MLflow run re-link subject ids to guessed patient IDs, and the password or
        token inside any URI (:func:`redact_uri`: a tracking store's or object store's address).
        """
        flat = {
            f"{group}.{key}": value
            for group, values in asdict(self).items()
            for key, value in values.items()
        }
        for key, value in flat.items():
            if isinstance(value, str):
                flat[key] = redact_uri(value)
        for key in SECRETS:
            if flat[key] is not None:
                flat[key] = REDACTED
        return flat


def _tuples(node: Any) -> Any:
    """YAML lists -> tuples, so strict validation accepts them for tuple fields."""
    if isinstance(node, dict):
        return {k: _tuples(v) for k, v in node.items()}
    if isinstance(node, list):
        return tuple(_tuples(v) for v in node)
    return node


def _one_line(path: Path, group: str, exc: ValidationError) -> str:
    errors = exc.errors()
    # An unknown key first: a misspelt key is why the key it was meant to be is missing.
    err = next((e for e in errors if e["type"] == "unexpected_keyword_argument"), errors[0])
    key = ".".join([group, *(str(part) for part in err["loc"])])
    if err["type"] == "missing":
        detail = "missing key"
    elif err["type"] == "unexpected_keyword_argument":
        missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing"]
        close = difflib.get_close_matches(str(err["loc"][-1]), missing, n=1)
        detail = "unknown key" + (f" (did you mean {group}.{close[0]}?)" if close else "")
    else:
        value = err.get("input")
        shown = repr(redact_uri(value)) if isinstance(value, str) else redact_uri(repr(value))
        got = REDACTED if key in SECRETS else shown
        got = got if len(got) <= 60 else got[:57] + "..."
        detail = f"{err['msg'].removeprefix('Value error, ')} (got {got})"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{path}: {key}: {detail}{more}"


def _group(path: Path, name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ParamsError(f"{path}: {name}: expected a mapping of keys, got {values!r}")
    try:
        return cls(**_tuples(values))
    except ValidationError as exc:
        raise ParamsError(_one_line(path, name, exc)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file; raise :class:`ParamsError` with a one-line message."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ParamsError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of param groups at the top level")
    groups = {f.name: f.type for f in fields(Params)}
    unknown = sorted(set(raw) - set(groups))
    if unknown:
        raise ParamsError(f"{path}: {unknown[0]}: unknown param group")
    missing = [g for g in groups if g not in raw]
    if missing:
        raise ParamsError(
            f"{path}: {missing[0]}: missing param group (a params file holds every group of "
            "params.yaml: copy it and change what you need)"
        )
    types = get_type_hints(Params)
    return Params(**{g: _group(path, g, types[g], raw[g]) for g in groups})
