"""retina-vae exps: DVC's experiment table cut to what matters, in 120 columns."""

from __future__ import annotations

import subprocess
import sys

from pipeline import exps


def _row(rev: str, params: dict, train: dict | None, evaluation: dict | None, **extra) -> dict:
    metrics = {}
    if train is not None:
        metrics["metrics/train.json"] = {"data": train}
    if evaluation is not None:
        metrics["metrics/eval.json"] = {"data": evaluation}
    data = {"rev": rev, "params": {"params.yaml": {"data": params}}, "metrics": metrics}
    return {"rev": rev, "data": data, **extra}


BASE = {"model": {"latent_dim": 16, "widths": [32, 64]}, "train": {"beta": 1.0}}
EVAL = {"test_iwae": -612.34, "test_active_units": 12.0, "test_probe_auc": 0.9,
        "test_probe_auc_vs_pca": 0.0251, "test_kl_dim_0": 3.0}  # fmt: skip
LONG = {f"k{i:02d}": i for i in range(40)}  # an experiment that changed many params


def _exp(name: str, params: dict, train: dict | None, evaluation: dict | None) -> dict:
    return {"name": name, "revs": [_row("f" * 40, params, train, evaluation, name=name)]}


SHOW = [
    _row("workspace", {**BASE, "train": {"beta": 4.0}}, {"val": {"neg_elbo": 700.0}}, EVAL),
    _row("a" * 40, BASE, {"val": {"neg_elbo": 650.5}}, EVAL, name="main", experiments=[
        _exp("sober-goat", {**BASE, "model": {"latent_dim": 8, "widths": [16, 32]}},
             {"val": {"neg_elbo": 640.125}}, {**EVAL, "test_probe_auc": float("nan")}),
        _exp("failed-one", BASE, None, None),
        _exp("many", {**BASE, "demo": LONG}, {"val": {"neg_elbo": 1.0}}, EVAL),
    ]),
]  # fmt: skip


def test_one_line_per_row_with_the_changed_params_and_headline_metrics():
    lines = exps.table(SHOW).splitlines()
    assert lines[0].split() == ["experiment", "val", "-ELBO", "test", "IWAE", "active",
                                "probe", "AUC", "vs", "PCA", "params", "changed"]  # fmt: skip
    assert set(lines[1]) == {"-"}
    rows = {line.split()[0] if not line.startswith("└") else line.split()[1]: line.split()
            for line in lines[2:]}  # fmt: skip
    assert rows["workspace"] == ["workspace", "700.00", "-612.3", "12", "0.900", "+0.025",
                                 "train.beta=4.0"]  # fmt: skip
    assert rows["main"] == ["main", "650.50", "-612.3", "12", "0.900", "+0.025"]
    assert rows["sober-goat"] == ["└", "sober-goat", "640.12", "-612.3", "12", "nan", "+0.025",
                                  "model.latent_dim=8", "model.widths=[16,32]"]  # fmt: skip
    assert rows["failed-one"] == ["└", "failed-one", "-", "-", "-", "-", "-"]
    assert all(len(line) <= exps.WIDTH for line in lines)
    assert rows["many"][-1].endswith("…")  # cut to fit, never wrapped


def test_the_param_that_tells_variants_apart_survives_the_cut():
    """Quick variants all carry the same quick settings (`-S demo.patients=20 ...`, which sort
    first); the one param each changed on top must still be on its 120-column line."""
    quick = {**BASE, "demo": {"images_per_eye": 4, "patients": 20}, "evaluate": {"iwae_k": 10},
             "train": {"beta": 1.0, "epochs": 3}}  # fmt: skip
    show = [_row("a" * 40, BASE, None, None, name="main", experiments=[
        _exp("quick", quick, None, None),
        _exp("quick-z8", {**quick, "model": {**BASE["model"], "latent_dim": 8}}, None, None),
        _exp("quick-beta", {**quick, "train": {"beta": 0.5, "epochs": 3}}, None, None),
    ])]  # fmt: skip
    lines = exps.table(show).splitlines()
    rows = {line.split()[1]: line for line in lines if line.startswith("└")}
    assert "model.latent_dim=8" in rows["quick-z8"] and "latent_dim" not in rows["quick"]
    assert "train.beta=0.5" in rows["quick-beta"]
    assert all(len(line) <= exps.WIDTH for line in lines)


def test_secrets_an_old_experiment_holds_are_never_shown():
    """Experiments made before a salt or a URI password was refused in params keep them in
    their commits: the table says that they changed, never what to."""
    held = {**BASE, "ingest": {"salt": "TOPSECRET-KEY-42"},
            "tracking": {"uri": "http://alice:s3cret@mlflow.clinic:5000"}}  # fmt: skip
    show = [_row("a" * 40, BASE, None, None, name="main", experiments=[
        _exp("old", held, None, None)])]  # fmt: skip
    text = exps.table(show)
    assert "TOPSECRET" not in text and "s3cret" not in text
    assert exps.changes(exps.flatten(held), exps.flatten(BASE)) == [
        "ingest.salt=<redacted>", "tracking.uri=http://alice:<redacted>@mlflow.clinic:5000"
    ]  # fmt: skip


def test_flatten_names_nested_keys_as_dvc_does():
    assert exps.flatten({"val": {"neg_elbo": 1.0}, "epochs": 3}) == {
        "val.neg_elbo": 1.0,
        "epochs": 3,
    }


def test_compares_experiments_while_params_yaml_holds_a_bad_value(tmp_path, monkeypatch, capsys):
    """After a failed ``dvc exp run -S train.epochs=-1`` DVC leaves the bad value in params.yaml;
    the real ``dvc exp show`` in a real repository still gives the table (no params read)."""
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    monkeypatch.chdir(tmp_path)
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], check=True)
    (tmp_path / "params.yaml").write_text("train:\n  epochs: -1\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "bad params"], check=True)
    assert exps.main([]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("experiment") and "workspace" in out.out
    assert "error" not in out.err
