"""Benchmark: the whole pipeline on RetinaMNIST (real fundus photos, 5 DR grades, official splits).

    .venv/bin/python bench/eval_retinamnist.py \
        --npz ../shared/datasets/retinamnist/retinamnist.npz \
        [--epochs 30] [--work DIR] [--set group.key=value ...]

Runs ingest -> preprocess -> train -> evaluate through the stages' own ``main`` functions with a
temporary params file (``ingest.source: <npz>``, ``ingest.modality: fundus``, 28 x 28 images,
``ingest.min_size: 28``, every path and the MLflow store in the work folder), then prints the
test negative ELBO, IWAE, active units and the linear probe beside:
  - the published supervised reference for this split (MedMNIST v2, ResNet-18 at 28 px:
    accuracy 0.524, AUC 0.717; a supervised network, the ceiling to approach),
  - baselines measured here on the same arrays with the same probe: always the commonest train
    grade, a linear probe on the raw pixels, and on the first J principal components of the
    pixels (J = the latent size: same dimension as mu).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.decomposition import PCA

from pipeline import evaluate, ingest, preprocess, train
from pipeline.latent import linear_probe

REPO = Path(__file__).resolve().parents[1]
REFERENCE = {"probe_accuracy": 0.524, "probe_auc": 0.717}  # MedMNIST v2, ResNet-18 (28)


def write_params(npz: Path, work: Path, epochs: int, overrides: list[str]) -> Path:
    """The repository's params.yaml with the RetinaMNIST source and every path in ``work``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["paths"] = {k: str(work / v) for k, v in raw["paths"].items()}
    # 28 px images: below the default ingest.min_size, which would quarantine them all
    raw["ingest"].update(source=str(npz.resolve()), modality="fundus", labels=None, min_size=28)
    raw["preprocess"]["image_size"] = [28, 28]
    raw["train"]["epochs"] = epochs
    raw["tracking"]["uri"] = f"sqlite:///{work / 'mlflow.db'}"
    for item in overrides:  # --set model.latent_dim=32
        key, _, value = item.partition("=")
        group, _, name = key.partition(".")
        if group not in raw or name not in raw[group]:
            raise SystemExit(f"--set {item}: unknown key {key}")
        raw[group][name] = yaml.safe_load(value)
    path = work / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def pixel_baselines(processed: Path, latent_dim: int) -> dict[str, dict[str, float]]:
    """Probe accuracy/AUC on raw pixels and on their first ``latent_dim`` PCs; majority class."""
    data = {}
    for split in ("train", "test"):
        x = np.load(processed / f"{split}_images.npy").reshape(-1, 28 * 28 * 3) / 255.0  # (N,D)
        data[split] = (x, pd.read_parquet(processed / f"{split}.parquet")["label"].to_numpy())
    (xr, yr), (xt, yt) = data["train"], data["test"]
    values, counts = np.unique(yr, return_counts=True)
    pca = PCA(n_components=latent_dim, random_state=0).fit(xr)
    return {
        "majority grade": {"probe_accuracy": float(np.mean(yt == values[counts.argmax()]))},
        "raw pixels (2352-d)": linear_probe(xr, yr, xt, yt),
        f"pixel PCA ({latent_dim}-d)": linear_probe(pca.transform(xr), yr, pca.transform(xt), yt),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--npz", type=Path, required=True, help="retinamnist.npz")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--work", type=Path, help="keep outputs here (default: a temp folder)")
    parser.add_argument("--set", action="append", default=[], metavar="GROUP.KEY=VALUE")
    args = parser.parse_args()
    if not args.npz.is_file():
        raise SystemExit(f"{args.npz}: not found")
    with tempfile.TemporaryDirectory(prefix="retinamnist-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        params = write_params(args.npz, work, args.epochs, args.set)
        seconds = {}
        for stage in (ingest, preprocess, train, evaluate):
            start = time.perf_counter()
            if stage.main(["--params", str(params)]) != 0:
                raise SystemExit(f"{stage.__name__} failed")
            seconds[stage.__name__.split(".")[-1]] = time.perf_counter() - start
        raw = yaml.safe_load(params.read_text())
        metrics = json.loads(Path(raw["paths"]["eval_metrics"]).read_text())
        baselines = pixel_baselines(Path(raw["paths"]["processed"]), raw["model"]["latent_dim"])
    report(metrics, baselines, raw, seconds)


def report(metrics: dict, baselines: dict, raw: dict, seconds: dict[str, float]) -> None:
    m, j, epochs = raw["model"], raw["model"]["latent_dim"], raw["train"]["epochs"]
    print(f"\nRetinaMNIST test split ({int(metrics['test_images'])} images, 28x28x3), "
          f"VAE J={j} widths={m['widths']} {m['likelihood']}, {epochs} epochs")  # fmt: skip
    print(f"  negative ELBO     {metrics['test_neg_elbo']:9.2f} nats/image "
          f"({metrics['test_neg_elbo_bpd']:.4f} bits/dim)")  # fmt: skip
    print(f"  IWAE (k={raw['evaluate']['iwae_k']:<4})     {metrics['test_iwae']:9.2f} nats/image "
          f"(log p(x) >= this; {metrics['test_iwae_bpd']:.4f} bits/dim)")  # fmt: skip
    print(f"  reconstruction    {metrics['test_recon']:9.2f}   KL {metrics['test_kl']:.2f}")
    print(f"  active units      {int(metrics['test_active_units'])} of {j}")
    print(f"\n  {'linear probe on':<28}{'accuracy':>10}{'macro AUC':>11}")
    rows = {f"VAE latent means ({j}-d)": {k: metrics.get(f"test_{k}") for k in REFERENCE}}
    rows.update(baselines)
    rows["ResNet-18 28px (published)"] = REFERENCE
    for name, row in rows.items():
        acc, auc = row.get("probe_accuracy"), row.get("probe_auc")
        print(f"  {name:<28}{acc:>10.3f}" + (f"{auc:>11.3f}" if auc is not None else f"{'-':>11}"))
    print(f"\n  k-NN accuracy {metrics['test_knn_accuracy']:.3f}, k-means ARI "
          f"{metrics['test_kmeans_ari']:.3f}, NMI {metrics['test_kmeans_nmi']:.3f}")  # fmt: skip
    print("  stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
