"""Shared by the representation benchmarks: run the real stages on a real labelled set, then
put the latent probe beside pixel baselines fit with the same probe on the same arrays.

A benchmark run: a params file (the repository's params.yaml, every path and the MLflow store
in a work folder, the caller's overrides), ingest -> preprocess -> train -> evaluate through
the stages' own ``main`` functions, then a table for one split:
  - ``--split val`` for choosing settings (probe fit on train, scored on val: test untouched);
  - ``--split test`` to report the chosen settings once.
The baselines: always the commonest train label; the probe on the raw pixels; on the first J
principal components of the pixels (J = latent size, as evaluate reports); on the first 64.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from sklearn.model_selection import StratifiedKFold

from pipeline import evaluate, ingest, preprocess, processed, train
from pipeline.latent import flat_pixels, linear_probe, pixel_pca
from pipeline.model_io import encoder_features, load_model

REPO = Path(__file__).resolve().parents[1]
STAGES = (ingest, preprocess, train, evaluate)
PROBE_KEYS = ("probe_accuracy", "probe_auc", "cv_probe_accuracy", "cv_probe_auc")
HEADERS = dict(zip(PROBE_KEYS, ("accuracy", "macro AUC", "5-fold acc", "5-fold AUC"), strict=True))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed values")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--work", type=Path, required=True, help="outputs go here")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE")
    parser.add_argument(
        "--split-seeds",
        type=int,
        nargs="+",
        default=None,
        help="preprocess.seed values: repeat everything on these subject splits and report the "
        "latent - pixel PCA difference per split (one split's val/test of ~60 images is noisy)",
    )


def write_params(work: Path, updates: dict[str, dict], overrides: list[str]) -> Path:
    """The repository's params.yaml with ``updates``, ``overrides`` and every path in ``work``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["paths"] = {k: str(work / v) for k, v in raw["paths"].items()}
    raw["tracking"]["uri"] = f"sqlite:///{work / 'mlflow.db'}"
    # a benchmark needs the probe, not the figures: cheaper maps and IWAE
    raw["evaluate"].update(map_method="pca", map_points=500, iwae_k=20)
    for group, values in updates.items():
        raw[group].update(values)
    for item in overrides:  # --set model.latent_dim=32
        key, _, value = item.partition("=")
        group, _, name = key.partition(".")
        if group not in raw or name not in raw[group]:
            raise SystemExit(f"--set {item}: unknown key {key}")
        raw[group][name] = yaml.safe_load(value)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_stages(params: Path, stages=STAGES) -> dict[str, float]:
    """Each stage's ``main`` on ``params``; seconds per stage. SystemExit if one fails."""
    seconds = {}
    for stage in stages:
        start = time.perf_counter()
        if stage.main(["--params", str(params)]) != 0:
            raise SystemExit(f"{stage.__name__} failed")
        seconds[stage.__name__.split(".")[-1]] = time.perf_counter() - start
    return seconds


def latent_probe(raw: dict, split: str) -> dict[str, float]:
    """The evaluate stage's probe on mu (train -> ``split``), read from embeddings.parquet.

    With ``split == "val"`` also ``cv_*``: the same probe, 5-fold over train + val (val alone
    is small, its figures noisy; test stays untouched either way).
    """
    table = pd.read_parquet(Path(raw["paths"]["evaluation"]) / "embeddings.parquet")
    mu = {s: table[table["split"] == s].filter(regex=r"^mu_\d+$").to_numpy() for s in (
        "train", split)}  # fmt: skip
    return split_probe(mu, raw, split)


def features_probe(raw: dict, split: str) -> dict[str, float]:
    """The same probe on the encoder's pooled last feature map (the bottleneck diagnostic)."""
    model, _ = load_model(raw["paths"]["model"], torch.device("cpu"))
    folder = Path(raw["paths"]["processed"])
    feats = {
        s: encoder_features(model, processed.open_images(folder, s), 256, torch.device("cpu"))
        for s in ("train", split)
    }
    return split_probe(feats, raw, split)


def split_probe(z: dict[str, np.ndarray], raw: dict, split: str) -> dict[str, float]:
    """Probe fit on ``z["train"]``, scored on ``z[split]`` (rows in the processed tables'
    order), plus the 5-fold ``cv_*`` over both when ``split == "val"``."""
    folder = Path(raw["paths"]["processed"])
    y = {s: pd.read_parquet(processed.table_path(folder, s))["label"] for s in ("train", split)}
    keep = {s: y[s].notna().to_numpy() for s in y}
    zr, yr = z["train"][keep["train"]], y["train"][keep["train"]].astype(str).to_numpy()
    zt, yt = z[split][keep[split]], y[split][keep[split]].astype(str).to_numpy()
    out = linear_probe(zr, yr, zt, yt)
    if split == "val":
        cv = cross_validated_probe(np.concatenate([zr, zt]), np.concatenate([yr, yt]))
        out.update({f"cv_{k}": v for k, v in cv.items()})
    return out


def cross_validated_probe(z: np.ndarray, y: np.ndarray, folds: int = 5) -> dict[str, float]:
    """Mean of the linear probe over stratified folds (seeded): less noisy than one small split."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    scores = [linear_probe(z[a], y[a], z[b], y[b]) for a, b in splitter.split(z, y)]
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


def pixel_baselines(folder: Path, split: str, latent_dim: int) -> dict[str, dict[str, float]]:
    """Majority label, raw-pixel probe, pixel-PCA probes (J and 64 components) on ``split``."""
    data = {}
    for s in ("train", split):
        images = processed.open_images(folder, s)
        labels = pd.read_parquet(processed.table_path(folder, s))["label"].astype(str).to_numpy()
        data[s] = (images, labels)
    (xr, yr), (xt, yt) = data["train"], data[split]
    values, counts = np.unique(yr, return_counts=True)
    flat_r, flat_t = flat_pixels(xr), flat_pixels(xt)
    rows = {
        "majority label": {"probe_accuracy": float(np.mean(yt == values[counts.argmax()]))},
        f"raw pixels ({flat_r.shape[1]}-d)": linear_probe(flat_r, yr, flat_t, yt),
    }
    for k in sorted({latent_dim, 64}):
        pr, pt = pixel_pca(xr, xt, k)
        rows[f"pixel PCA ({k}-d)"] = linear_probe(pr, yr, pt, yt)
        if split == "val":
            cv = cross_validated_probe(np.concatenate([pr, pt]), np.concatenate([yr, yt]))
            rows[f"pixel PCA ({k}-d)"].update({f"cv_{m}": v for m, v in cv.items()})
    return rows


def _hide_test_summary(record: logging.LogRecord) -> bool:
    """False for the evaluate stage's "test: ..." summary line (test figures)."""
    return not str(record.msg).startswith("test:")


def run(work: Path, updates: dict[str, dict], args: argparse.Namespace) -> dict:
    """Every seed through all stages (ingest/preprocess once); the figures on ``args.split``.

    With ``--split val`` the evaluate stage's test summary line is not shown: a choice made on
    val is made without a test figure in sight (test metrics still land in the work folder).
    """
    if args.split == "val":
        logging.getLogger("retina_vae.evaluate").addFilter(_hide_test_summary)
    runs = []
    for seed in args.seeds:
        overrides = [f"train.epochs={args.epochs}", *args.set, f"train.seed={seed}"]
        params = write_params(work, updates, overrides)
        seconds = run_stages(params, STAGES if not runs else (train, evaluate))
        raw = yaml.safe_load(params.read_text())
        metrics = json.loads(Path(raw["paths"]["eval_metrics"]).read_text())
        history = pd.read_csv(raw["paths"]["train_history"])
        runs.append(
            {
                "seed": seed,
                **latent_probe(raw, args.split),
                "features": features_probe(raw, args.split),
                "val_neg_elbo": float(history["val_neg_elbo"].iloc[-1]),
                "active_units": metrics["test_active_units"],
                "train_seconds": seconds["train"],
                "metrics": metrics,
            }
        )
    folder = Path(raw["paths"]["processed"])
    baselines = pixel_baselines(folder, args.split, raw["model"]["latent_dim"])
    return {"raw": raw, "runs": runs, "baselines": baselines}


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def report(title: str, result: dict, split: str, references: dict[str, dict]) -> None:
    """The latent probe (mean +- sd over seeds) beside baselines and published references."""
    raw, runs = result["raw"], result["runs"]
    m, j = raw["model"], raw["model"]["latent_dim"]
    c, (h, w) = (3 if raw["ingest"]["modality"] == "fundus" else 1), raw["preprocess"]["image_size"]
    dims_ln2 = c * h * w * np.log(2.0)
    seeds = [r["seed"] for r in runs]
    print(f"\n{title}: {split} split, {h}x{w}, VAE {m['arch']} widths={m['widths']} J={j} "
          f"{m['likelihood']}, {raw['train']['epochs']} epochs, seeds {seeds}")  # fmt: skip
    print(f"  val -ELBO {_mean_spread([r['val_neg_elbo'] / dims_ln2 for r in runs])} bits/dim, "
          f"active units {_mean_spread([r['active_units'] for r in runs])}, "
          f"train {_mean_spread([r['train_seconds'] for r in runs])} s")  # fmt: skip
    if split == "test" and all("test_iwae_bpd" in r["metrics"] for r in runs):
        iwae = [r["metrics"]["test_iwae_bpd"] for r in runs]
        print(f"  test IWAE (k={raw['evaluate']['iwae_k']}) {_mean_spread(iwae)} bits/dim")
    elif split == "test":  # bernoulli: no bits/dim (not a density), the bound in nats
        iwae = [-r["metrics"]["test_iwae"] for r in runs]
        print(f"  test -IWAE (k={raw['evaluate']['iwae_k']}) {_mean_spread(iwae)} nats")
    keys = PROBE_KEYS if split == "val" else PROBE_KEYS[:2]
    print(f"  {'linear probe on':<34}" + "".join(f"{HEADERS[k]:>20}" for k in keys))
    means = [_mean_spread([r.get(k, float("nan")) for r in runs]) for k in keys]
    print(f"  {f'VAE latent means ({j}-d)':<34}" + "".join(f"{c:>20}" for c in means))
    feats = [_mean_spread([r["features"].get(k, float("nan")) for r in runs]) for k in keys]
    name = f"VAE encoder features ({m['widths'][-1]}-d)"
    print(f"  {name:<34}" + "".join(f"{c:>20}" for c in feats))
    for name, row in {**result["baselines"], **references}.items():
        cells = [f"{row[k]:.3f}" if k in row else "-" for k in keys]
        print(f"  {name:<34}" + "".join(f"{c:>20}" for c in cells))


def run_splits(work: Path, updates: dict[str, dict], args: argparse.Namespace) -> list[dict]:
    """:func:`run` once per ``args.split_seeds`` value (``preprocess.seed``: another subject
    split, its own work folder), the same settings and training seeds on each."""
    results = []
    for k in args.split_seeds:
        split_args = argparse.Namespace(
            **{**vars(args), "set": [*args.set, f"preprocess.seed={k}"]}
        )
        results.append({"split_seed": k, **run(work / f"split{k}", updates, split_args)})
    return results


def report_splits(title: str, results: list[dict], split: str) -> None:
    """Per subject split: the latent probe (mean over training seeds) beside pixel PCA-J on the
    same images, and their difference; then mean +- sd over splits and how many splits the
    latent wins. The paired difference cancels what a split's images make easy or hard."""
    j = results[0]["raw"]["model"]["latent_dim"]
    pca = f"pixel PCA ({j}-d)"
    figures = "5-fold probe over train + val" if split == "val" else "test probe"
    print(f"\n{title}: {split} split over {len(results)} subject splits (preprocess.seed), "
          f"training seeds {[r['seed'] for r in results[0]['runs']]}, {figures}")  # fmt: skip
    heads = ("VAE acc", "PCA acc", "diff", "VAE AUC", "PCA AUC", "diff")
    print(f"  {'preprocess.seed':<16}{'images':>8}" + "".join(f"{h:>16}" for h in heads))
    rows = []
    # val: the 5-fold figures over train + val, the ones a choice is made on (val alone is a
    # few dozen images); test: the test split's own
    keys = PROBE_KEYS[2:] if split == "val" else PROBE_KEYS[:2]
    for r in results:
        vae = [statistics.mean(run[k] for run in r["runs"]) for k in keys]
        base = [r["baselines"][pca][k] for k in keys]
        rows.append((vae[0], base[0], vae[0] - base[0], vae[1], base[1], vae[1] - base[1]))
        size = len(
            pd.read_parquet(processed.table_path(Path(r["raw"]["paths"]["processed"]), split))
        )
        print(f"  {r['split_seed']:<16}{size:>8}" + "".join(f"{v:>16.3f}" for v in rows[-1]))
    cells = [_mean_spread([row[i] for row in rows]) for i in range(6)]
    print(f"  {'mean +- sd':<24}" + "".join(f"{c:>16}" for c in cells))
    wins = [sum(row[i] >= 0 for row in rows) for i in (2, 5)]
    print(f"  latent >= PCA on {wins[0]} of {len(rows)} splits (accuracy), {wins[1]} (AUC)")
