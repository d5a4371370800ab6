"""params.yaml -> typed, frozen params; every bad value is a one-line error naming the key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline import deid
from pipeline.params import ParamsError, load_params, redact_uri

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, patch: dict, drop: tuple[str, str] | None = None) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for group, values in patch.items():
        raw.setdefault(group, {}).update(values)
    if drop:
        del raw[drop[0]][drop[1]]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repository_params_load_into_frozen_typed_groups():
    params = load_params(REPO / "params.yaml")
    assert params.preprocess.image_size == (64, 64)
    assert isinstance(params.model.widths, tuple)
    assert params.cluster.address is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.epochs = 1  # type: ignore[misc]


def test_flat_has_one_entry_per_key():
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    flat = params.flat()
    assert len(flat) == sum(len(v) for v in raw.values())
    assert flat["train.lr"] == raw["train"]["lr"]


@pytest.mark.parametrize(
    ("patch", "drop", "expected"),
    [
        ({"train": {"epochz": 3}}, None, "train.epochz: unknown key"),
        ({}, ("train", "epochs"), "train.epochs: missing key"),
        # a misspelt key is named first, with the key it was meant to be
        (
            {"train": {"epoch": 3}},
            ("train", "epochs"),
            "train.epoch: unknown key (did you mean train.epochs?)",
        ),
        (
            {"model": {"latent_dims": 8}},
            ("model", "latent_dim"),
            "model.latent_dims: unknown key (did you mean model.latent_dim?)",
        ),
        ({"train": {"epochs": "ten"}}, None, "train.epochs: Input should be a valid integer"),
        ({"train": {"epochs": -3}}, None, "train.epochs: Input should be greater than 0"),
        ({"train": {"use_gpu": 1}}, None, "train.use_gpu: Input should be a valid boolean"),
        ({"model": {"widths": [32, 0]}}, None, "model.widths.1: Input should be greater than 0"),
        ({"model": {"likelihood": "poisson"}}, None, "model.likelihood: Input should be"),
        ({"model": {"arch": "vit"}}, None, "model.arch: Input should be 'conv' or 'resnet'"),
        ({"model": {"blocks_per_stage": 0}}, None, "model.blocks_per_stage: Input should be"),
        ({"train": {"free_bits": -0.5}}, None, "train.free_bits: Input should be greater than"),
        ({"train": {"augment_jitter": 1.5}}, None, "train.augment_jitter: Input should be less"),
        ({"preprocess": {"illumination": "retinex"}}, None, "preprocess.illumination: Input"),
        ({"preprocess": {"val_fraction": 0}}, None, "preprocess.val_fraction: Input should be gr"),
        ({"preprocess": {"image_size": [16, 64]}}, None, "preprocess.image_size.0: Input should"),
        ({"ingest": {"patient_pattern": "("}}, None, "ingest.patient_pattern: not a regular"),
        ({"ingest": {"patient_pattern": "abc"}}, None, "ingest.patient_pattern: needs one capture"),
        ({"extra_group": {"a": 1}}, None, "extra_group: unknown param group"),
    ],
)
def test_bad_params_give_one_line_error_naming_file_and_key(tmp_path, patch, drop, expected):
    path = _write(tmp_path, patch, drop)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {expected}")
    assert "\n" not in message


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match=r"not valid YAML at line \d"):
        load_params(bad)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("postgresql://alice:s3cret@db.lab:5432/mlflow", "postgresql://alice:<redacted>@db.lab:5432/mlflow"),
        ("mysql+pymysql://u:s3cret@db/mlflow", "mysql+pymysql://u:<redacted>@db/mlflow"),
        ("http://bob:s3cr@t@mlflow.lab:5000", "http://bob:<redacted>@mlflow.lab:5000"),  # raw @
        ("https://mlflow.lab/?token=s3cret&x=1", "https://mlflow.lab/?token=<redacted>&x=1"),
        ("s3://b/ckpt?access_key=AK&secret_key=s3cret&region=eu",
         "s3://b/ckpt?access_key=<redacted>&secret_key=<redacted>&region=eu"),
        ("no http://u:s3cret@h/x and http://h2:80/", "no http://u:<redacted>@h/x and http://h2:80/"),
        ("http://bob@mlflow.lab:5000/a@b", "http://bob@mlflow.lab:5000/a@b"),  # no password
        ("http://mlflow.lab:5000/a@b", "http://mlflow.lab:5000/a@b"),  # no user info
        # SQLAlchemy reads a database URL's password up to the first @, / # ? included
        ("postgresql://alice:pa/ss@db.lab/mlflow", "postgresql://alice:<redacted>@db.lab/mlflow"),
        ("mysql://alice:p#w?x@db/mlflow", "mysql://alice:<redacted>@db/mlflow"),
        # the names of a key file or an auth method are no secrets
        ("postgresql://db/m?sslkey=/etc/k.pem&passfile=/h/.pgpass&password=s3cret",
         "postgresql://db/m?sslkey=/etc/k.pem&passfile=/h/.pgpass&password=<redacted>"),
        ("mongodb://db/m?authSource=admin", "mongodb://db/m?authSource=admin"),
        ("sqlite:////srv/x:y@z/mlflow.db", "sqlite:////srv/x:y@z/mlflow.db"),
        ("postgresql://alice:s3cret word@db/m", "postgresql://alice:<redacted>@db/m"),
        ("sqlite:///mlflow.db", "sqlite:///mlflow.db"),
        ("ray://10.0.0.1:10001", "ray://10.0.0.1:10001"),
        ("data/processed", "data/processed"),
    ],
)  # fmt: skip
def test_redact_uri_hides_passwords_and_tokens_only(uri, expected):
    assert redact_uri(uri) == expected


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://alice:s3cret@db.lab:5432/mlflow",
        "https://mlflow.lab/?token=s3cret",
        "postgresql://alice:s3cret word@db.lab/mlflow",  # SQLAlchemy takes the space too
    ],
)
def test_a_tracking_uri_holding_a_secret_is_refused_without_showing_it(tmp_path, uri):
    """DVC copies params into dvc.lock and every experiment, where no redaction reaches: the
    credential belongs in MLflow's variables, and the error says so without quoting it."""
    with pytest.raises(ParamsError) as info:
        load_params(_write(tmp_path, {"tracking": {"uri": uri}}))
    message = str(info.value)
    expected = f"{tmp_path / 'params.yaml'}: tracking.uri: holds a password or token"
    assert message.startswith(expected)
    assert "MLFLOW_TRACKING_PASSWORD" in message and "s3cret" not in message
    assert redact_uri(uri)[:20] in message  # the address, told apart, redacted


def test_flat_redacts_the_password_of_an_object_store_uri(tmp_path):
    uri = "s3://bucket/ckpt?access_key=AK&secret_key=s3cret"
    params = load_params(_write(tmp_path, {"paths": {"checkpoints": uri}}))
    assert params.paths.checkpoints == uri  # the stage still connects with it
    assert (
        params.flat()["paths.checkpoints"]
        == "s3://bucket/ckpt?access_key=<redacted>&secret_key=<redacted>"
    )


@pytest.mark.parametrize("salt", ["s3cret-key", 982451653, 3.14159, ["s3cret", "key"], True])
def test_a_salt_in_params_is_refused_naming_the_variable_never_the_value(tmp_path, salt):
    """DVC would copy it into dvc.lock and every experiment (and `exps` print it); a number or
    a list is no more a key than a text (the old message quoted it: 'ingest.salt: Input should
    be a valid string (got 982451653)')."""
    with pytest.raises(ParamsError) as info:
        load_params(_write(tmp_path, {"ingest": {"salt": salt}}))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'params.yaml'}: ingest.salt: a key written here is ")
    assert deid.SALT_ENV in message and "\n" not in message
    assert str(salt) not in message and "s3cret" not in message and "314159" not in message
