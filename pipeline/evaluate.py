"""``retina-vae evaluate``: test likelihood, latent embeddings, disease-spectrum metrics and maps.

Reads the trained checkpoint (``paths.model``) and the processed arrays (``paths.processed``),
writes ``paths.evaluation/`` and ``paths.eval_metrics``, and logs all of it into the MLflow run
that trained the model (its id is in the checkpoint), so one run page holds the whole story:

    evaluation/embeddings.parquet     mu_j, sigma_j of q(z|x) for every image of every split
                                      (and spectrum_position, with a spectrum axis)
    evaluation/latent_map.html        interactive map (Plotly, self-contained): a header naming
                                      the run, latent size and key metrics; t-SNE, PCA and
                                      spectrum layouts; colour by any column (continuous ones on
                                      a colour scale); hover for the image; search by id; click
                                      for nearest neighbours; lasso to export ids
    evaluation/maps/                  {pca,tsne}_{split}.png: 2-D maps of mu coloured by label,
                                      with the k-means ARI and silhouette of mu printed under
                                      them; layout.json + map_points.parquet for `encode --map`
    evaluation/traversals/            kl_rank{r}_dim{j}.png: decodes along the highest-KL dims
    evaluation/spectrum/              spectrum.png: decoded and nearest test images along the
                                      spectrum direction
    evaluation/grids/                 reconstructions beside originals, prior samples
    evaluation/plots/                 training curves, KL and mu variance per latent dim
    evaluation/tables/                cluster-by-label composition, KL per dim, confounds
    evaluation/probe.json             the label probe on mu (for `encode --map`)
    evaluation/notes.txt              metrics skipped and why (no labels, one class, ...)

Metrics (MLflow metrics and the flat JSON ``paths.eval_metrics``), all on the test split:
  test_neg_elbo          negative ELBO, nats per image (seed eq. 43, KL weight 1, one z sample)
  test_recon, test_kl    its parts: E_q log p(x|z) and KL(q(z|x) || p(z)) (eq. 40 summed over J)
  test_neg_elbo_bpd      test_neg_elbo / (C*H*W*ln 2), bits per dimension (not with the
                         bernoulli likelihood: not a density, see below)
  test_iwae              IWAE lower bound on log p(x) with evaluate.iwae_k samples (>= -neg ELBO)
  test_iwae_bpd          -test_iwae in bits per dimension (not with bernoulli)
  test_kl_dim_<j>        mean KL of latent dim j; test_active_units: dims with Var_x(mu_j) > 0.01
  test_probe_accuracy, test_probe_auc   logistic regression on mu, fit on train (macro AUC)
  test_pca_probe_accuracy, test_pca_probe_auc   the same probe on the first J principal
                         components of the pixels (J = latent size): the baseline to beat
  test_probe_accuracy_vs_pca, test_probe_auc_vs_pca   latent minus PCA (> 0: the latent wins)
  test_features_probe_accuracy, test_features_probe_auc   the same probe on the encoder's last
                         feature map averaged over space (what the bottleneck reads): well
                         above the mu probe means the labels reach the encoder and are lost at
                         the bottleneck
  test_probe_*_vs_pca_ci_low, _ci_high   its 95% percentile bootstrap interval over the test
                         images (evaluate.bootstrap resamples; both probes stay fit on train)
  test_spectrum_spearman Spearman correlation on test of a linear fit (on train) of the spectrum
                         target on mu: a severity column, labels in evaluate.label_order, or
                         integer grades; test_pca_spectrum_spearman: the same fit on pixel
                         PCA; test_spectrum_spearman_vs_pca (+ _ci_low, _ci_high) their difference
  test_knn_accuracy      k-NN vote (evaluate.knn_k) from train mu
  test_majority_accuracy always answering the commonest train label: the floor to beat
  test_silhouette, test_kmeans_ari, test_kmeans_nmi   label clusters in mu; k-means k = #labels
  test_confound_<attr>, test_confound_<attr>_majority   the same linear probe predicting a
                         metadata attribute (eye, source_folder, size_class, manufacturer...)
                         against the majority rate; a warning when the latent reads an
                         acquisition attribute better than the label (tables/confounds.csv)
  eval_images_<split>    images embedded per split
Likelihood units: with ``model.likelihood: logistic`` (discretised logistic) p(x|z) is a true
probability of the 8-bit images, so test_iwae_bpd (NLL / (D ln 2), D = C*H*W) is the bits/dim
figure the literature reports. With ``gaussian`` the figures are nats of a true density of
the images scaled to [0, 1]. With ``bernoulli`` (continuous BCE on grey levels) p(x|z) is not a
normalised density over [0, 1]-valued images: the figures rank models with the same likelihood
but are not comparable with published nats or bits/dim.

MLflow: if the checkpoint names no run, or its run is not in the tracking store (another
``mlflow.db``, a deleted run), a new run is created in ``tracking.experiment`` with tags
``retina_vae.checkpoint`` and ``retina_vae.trained_run_id`` pointing back at the model, and a
warning says so: the evaluation is never lost, and the tags tell where it came from. A training
run whose ``evaluate.*`` params are not this evaluation's (a DVC experiment that changed only
those re-uses the trained model) keeps its own evaluation: this one gets a run of its own, named
after the experiment, with the training's params and curves (``retina_vae.trained_run_id``).
The outputs are written before anything is logged: when logging fails (store unreachable,
read-only...) the stage still succeeds with one warning, and ``retina-vae evaluate --log-only``
logs them later.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from pipeline import figures, html_map, latent, processed, tracking
from pipeline.errors import UserError
from pipeline.io import atomic_path, write_json
from pipeline.latent import (
    LAYOUT_FILE,
    MAP_POINTS,
    PROBE_FILE,
    LabelReport,
    label_metrics,
    pixel_pca,
)
from pipeline.model_io import batches, encode_images, encoder_features, load_model
from pipeline.params import EvaluateParams, Params
from pipeline.processed import SPLITS
from pipeline.stage import run_stage
from vae_core.elbo import elbo_terms, iwae_bound
from vae_core.model import ConvVAE, VAEConfig
from vae_core.training import ACTIVE_UNIT_THRESHOLD

REPO = Path(__file__).resolve().parents[1]

log = logging.getLogger("retina_vae.evaluate")

IWAE_DECODE_FACTOR = 4  # IWAE decodes at most this many x evaluate.batch_size images at once
ARTIFACT_DIR = "evaluation"  # the folder of the MLflow run that holds everything below
METHOD_NAMES = {"pca": "PCA", "tsne": "t-SNE"}
CONFOUND_TABLE = "confounds.csv"  # tables/: probe on mu for each metadata attribute
# continuous per-image columns the map can be coloured by, when the tables or manifest have them
NUMERIC_COLUMNS = (*latent.SEVERITY_COLUMNS, "age", "frame", "width", "height")


# ----------------------------------------------------------------------------- inputs


def load_split(folder: Path, split: str, model: ConvVAE) -> tuple[np.ndarray, pd.DataFrame]:
    """One split's images (N,C,H,W) uint8 (memory-mapped) and its metadata rows."""
    npy, table = processed.images_path(folder, split), processed.table_path(folder, split)
    for path in (npy, table):  # one .npy, or the Ray Data engine's shard folder
        if not path.exists():
            raise UserError(f"{path}: not found (run `retina-vae preprocess` first)")
    images = processed.open_path(npy)
    meta = pd.read_parquet(table)
    cfg = model.config
    want = (cfg.in_channels, cfg.height, cfg.width)
    if images.ndim != 4 or images.dtype != np.uint8 or tuple(images.shape[1:]) != want:
        raise UserError(
            f"{npy}: images are {images.dtype} {tuple(images.shape)} but the model expects uint8 "
            f"(N, {want[0]}, {want[1]}, {want[2]}); re-run train after preprocess"
        )
    if len(meta) != len(images):
        raise UserError(f"{table}: {len(meta)} rows but {npy.name} holds {len(images)} images")
    return images, meta


# ----------------------------------------------------------------------------- model passes


@torch.no_grad()
def likelihood(
    model: ConvVAE, images: np.ndarray, ev: EvaluateParams, device: torch.device
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Test-set ELBO terms, IWAE bound, KL per dim and active units; also mu, logvar (N,J).

    Per-image figures are averaged over the images. The ELBO uses one z sample per image
    (eq. 42 with L = 1); its expectation does not depend on L, and averaging over the test
    images keeps the estimate's noise small.
    """
    sums = {"neg_elbo": 0.0, "recon": 0.0, "kl": 0.0, "iwae": 0.0}
    kl_dims, mus, logvars = [], [], []
    for x in batches(images, ev.batch_size, device, f"test ELBO + IWAE (k={ev.iwae_k})"):
        terms = elbo_terms(model, x, n_samples=1)
        # IWAE decodes chunk * B images at once; the chunk keeps that under the memory budget
        chunk = max(1, IWAE_DECODE_FACTOR * ev.batch_size // len(x))
        iwae = iwae_bound(model, x, ev.iwae_k, chunk_size=chunk)  # (B,)
        for key, value in (
            ("neg_elbo", terms.neg_elbo),
            ("recon", terms.recon),
            ("kl", terms.kl),
            ("iwae", iwae),
        ):
            sums[key] += value.double().sum().item()
        kl_dims.append(terms.kl_per_dim.double().sum(0).cpu())
        mus.append(terms.mu.cpu())
        logvars.append(terms.logvar.cpu())
    n = len(images)
    mu = torch.cat(mus).numpy()
    cfg = model.config
    dims_ln2 = cfg.in_channels * cfg.height * cfg.width * math.log(2.0)  # nats -> bits/dim
    metrics = {f"test_{k}": v / n for k, v in sums.items()}
    if cfg.likelihood != "bernoulli":  # continuous BCE is no density: bits/dim would mislead
        metrics["test_neg_elbo_bpd"] = metrics["test_neg_elbo"] / dims_ln2
        metrics["test_iwae_bpd"] = -metrics["test_iwae"] / dims_ln2
    kl_per_dim = (torch.stack(kl_dims).sum(0) / n).numpy()  # (J,)
    metrics.update({f"test_kl_dim_{j}": float(v) for j, v in enumerate(kl_per_dim)})
    # Burda et al.: unit j is active when Var_x(E_q[z_j]) = Var_x(mu_j) exceeds 0.01
    metrics["test_active_units"] = float((mu.var(0) > ACTIVE_UNIT_THRESHOLD).sum())
    metrics["test_images"] = float(n)
    return metrics, mu, torch.cat(logvars).numpy()


# ----------------------------------------------------------------------------- outputs


def embeddings_table(
    meta: pd.DataFrame, split: str, mu: np.ndarray, logvar: np.ndarray
) -> pd.DataFrame:
    """One row per image: image_id, split, label, subject_id, mu_0..mu_{J-1}, sigma_0.."""
    table = pd.DataFrame(
        {
            "image_id": meta["image_id"].to_numpy(),
            "split": split,
            "label": meta["label"].to_numpy(),
            "subject_id": meta["subject_id"].to_numpy(),
        }
    )
    sigma = np.exp(0.5 * logvar)  # (N,J): the posterior standard deviation
    latent = {f"mu_{j}": mu[:, j] for j in range(mu.shape[1])}
    latent.update({f"sigma_{j}": sigma[:, j] for j in range(mu.shape[1])})
    return pd.concat([table, pd.DataFrame(latent)], axis=1)


def map_sample(table: pd.DataFrame, limit: int, seed: int) -> np.ndarray:
    """Row indices of ``table`` kept for maps: at most ``limit`` per split, seeded, in order."""
    rng = np.random.default_rng(seed)
    keep = []
    for _, rows in table.groupby("split", sort=False):
        idx = rows.index.to_numpy()
        keep.append(np.sort(rng.choice(idx, limit, replace=False)) if len(idx) > limit else idx)
    return np.concatenate(keep)


@dataclass
class Results:
    """What evaluate computes, before anything is written."""

    table: pd.DataFrame  # the embeddings table (plus ``row``: position within its split)
    attributes: pd.DataFrame  # metadata attributes per row (eye, source folder, ...)
    numeric: pd.DataFrame  # continuous per-row columns (severity, age), may have no columns
    report: LabelReport
    confound: latent.ConfoundReport
    spectrum: latent.Spectrum | None = None
    target: np.ndarray | None = None  # (N,) the spectrum's target per row (NaN: unknown)


def mu_of(table: pd.DataFrame) -> np.ndarray:
    """The latent means (N,J) of an embeddings table."""
    return table.filter(regex=r"^mu_\d+$").to_numpy()


def map_layouts(
    mu: np.ndarray, keep: np.ndarray, results: Results, ev: EvaluateParams
) -> tuple[dict[str, tuple[np.ndarray, list[str]]], PCA]:
    """The 2-D layouts of the kept rows: t-SNE (with ``map_method: tsne``), PCA fit on the
    train split (so every split and a later ``encode`` share its axes) and, with a spectrum,
    its axis against the target; and that PCA."""
    train = mu[(results.table["split"] == "train").to_numpy()]
    pca = figures.pca_layout(train if len(train) >= 2 else mu)
    layouts = {"PCA": (pca.transform(mu[keep]), figures.pca_axes(pca))}
    if ev.map_method == "tsne" and len(keep) >= 5:
        log.info("t-SNE of %d latent means (scikit-learn shows no progress)", len(keep))
        layouts = {"t-SNE": figures.tsne_2d(mu[keep], ev.seed), **layouts}
    if results.spectrum is not None:
        sp = results.spectrum
        xy = np.stack([mu[keep] @ sp.direction, results.target[keep]], axis=1)  # (n,2)
        axes = [f"position along the {sp.name} direction (latent units)", sp.name]
        layouts["spectrum"] = (xy, axes)
    return layouts, pca


def cluster_note(metrics: dict[str, float]) -> str:
    """The clustering scores a 2-D map must be read against (they are measured in mu)."""
    if "test_kmeans_ari" not in metrics:
        return ""
    return (
        f"in the latent space (test): k-means ARI {metrics['test_kmeans_ari']:.2f}, "
        f"silhouette {metrics['test_silhouette']:.2f} "
        "(1: labels form separate clusters; 0: no cluster structure)"
    )


def write_maps(
    out: Path,
    results: Results,
    images: dict[str, np.ndarray],
    ev: EvaluateParams,
    header: list[str],
    metrics: dict[str, float],
) -> None:
    """PCA (and t-SNE) PNG maps per split, and the interactive HTML map of all kept images,
    which can be coloured by label, split, every attribute, continuous column and latent
    dimension, and laid out by t-SNE, PCA or the spectrum axis; ``maps/map_points.parquet``
    and ``maps/layout.json`` let ``retina-vae encode`` place new images on the same map."""
    (out / "maps").mkdir()
    table = results.table
    mu = mu_of(table)  # (N,J)
    keep = map_sample(table, ev.map_points, ev.seed)
    kept = table.loc[keep].reset_index(drop=True)
    names = figures.label_names(kept["label"])
    layouts, pca = map_layouts(mu, keep, results, ev)
    note = cluster_note(metrics)
    for name, (xy, axes) in layouts.items():
        if name == "spectrum":
            continue
        for split in SPLITS:
            rows = (kept["split"] == split).to_numpy()
            if rows.any():
                title = f"{name} of latent means, {split} split"
                png = out / "maps" / f"{name.lower().replace('-', '')}_{split}.png"
                figures.plot_map(xy[rows], names[rows], axes, title, png, note)
    write_layout(out, pca, kept, layouts, results.spectrum)
    points, colour_by = map_columns(kept, keep, names, results)
    thumbs = np.stack([images[s][i] for s, i in zip(kept["split"], kept["row"], strict=True)])
    k = min(ev.knn_k, len(keep) - 1)
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(mu[keep]).kneighbors(mu[keep])[1][:, 1:]
    title = f"Latent means ({next(iter(layouts))}): hover a point for its image"
    size = html_map.latent_map(
        points,
        thumbs,
        layouts,
        title,
        out / "latent_map.html",
        colour_by,
        header + [note],
        neighbours,
    )
    log.info("interactive map: %d images, %.1f MB", len(points), size / 1e6)


def map_columns(
    kept: pd.DataFrame, keep: np.ndarray, names: np.ndarray, results: Results
) -> tuple[pd.DataFrame, list[str]]:
    """The HTML map's per-point columns and the colour-by choices, in drop-down order:
    label, split, attributes, continuous columns, the spectrum position, mu_j, sigma_j."""
    points = kept[["split", "image_id"]].assign(label=names)
    extra = [c for c in results.attributes if c not in points]
    # ids are pseudonymous image ids; attributes never hold a patient identifier
    points = points.join(results.attributes.loc[keep, extra].reset_index(drop=True))
    numeric = results.numeric.loc[keep].reset_index(drop=True)
    points = points.join(numeric)
    if results.spectrum is not None:
        points["spectrum_position"] = mu_of(kept) @ results.spectrum.direction
    latent_cols = [c for c in kept if c.startswith(("mu_", "sigma_"))]
    points = points.join(kept[latent_cols].astype(float))
    colour_by = ["label", "split", *extra, *numeric.columns]
    colour_by += ["spectrum_position"] * (results.spectrum is not None) + latent_cols
    return points, colour_by


def write_layout(
    out: Path,
    pca: PCA,
    kept: pd.DataFrame,
    layouts: dict[str, tuple[np.ndarray, list[str]]],
    spectrum: latent.Spectrum | None,
) -> None:
    """``maps/layout.json`` (the map's PCA of the train mu: mean (J,), components (2,J); the
    spectrum direction) and ``maps/map_points.parquet`` (image_id and the coordinates of every
    drawn point)."""
    layout = {
        "pca_mean": pca.mean_.tolist(),
        "pca_components": pca.components_.tolist(),
        "axes": {name: axes for name, (_, axes) in layouts.items()},
    }
    if spectrum is not None:
        layout["spectrum"] = {
            "name": spectrum.name,
            "direction": spectrum.direction.tolist(),
            "slope": spectrum.slope,
            "intercept": spectrum.intercept,
        }
    write_json(out / LAYOUT_FILE, layout)
    coords = {"image_id": kept["image_id"].to_numpy()}
    for name, (xy, _) in layouts.items():
        coords[f"{name}_x"], coords[f"{name}_y"] = xy[:, 0], xy[:, 1]
    pd.DataFrame(coords).to_parquet(out / MAP_POINTS, index=False)


def _with_manifest(meta: pd.DataFrame, wanted: list[str], manifest: Path) -> pd.DataFrame:
    """``meta`` plus the columns of ``wanted`` it lacks, from the ingest manifest joined on the
    pseudonymous ``image_id`` (those the manifest has; none when it is missing)."""
    missing = [c for c in wanted if c not in meta]
    if missing and manifest.is_file():
        have = [c for c in missing if c in pq.read_schema(manifest).names]
        if have:
            extra = pd.read_parquet(manifest, columns=["image_id", *have])
            extra = extra.drop_duplicates("image_id").set_index("image_id")
            meta = meta.join(extra, on="image_id")
    return meta


def metadata_table(
    data: dict[str, tuple[np.ndarray, pd.DataFrame]], manifest: Path
) -> pd.DataFrame:
    """Metadata attributes (:func:`pipeline.latent.metadata_attributes`) of every image, rows
    in the embeddings table's order (splits in SPLITS order).

    The processed tables give the eye; the source path (for its first folder), the original
    image size (and a device column such as ``manufacturer``, when ingest records one) come from
    the ingest manifest ``manifest``, joined on the pseudonymous ``image_id``: the processed
    tables carry no path, which may hold an identifier.
    """
    meta = pd.concat([data[s][1] for s in SPLITS], ignore_index=True)
    meta = _with_manifest(meta, ["source", "width", "height", *latent.DEVICE_COLUMNS], manifest)
    return latent.metadata_attributes(meta)


def numeric_table(data: dict[str, tuple[np.ndarray, pd.DataFrame]], manifest: Path) -> pd.DataFrame:
    """The numeric per-image columns of ``NUMERIC_COLUMNS`` the data has (a severity from the
    labels CSV, an age), as floats (NaN: unknown); rows as :func:`metadata_table`'s."""
    meta = pd.concat([data[s][1] for s in SPLITS], ignore_index=True)
    meta = _with_manifest(meta, list(NUMERIC_COLUMNS), manifest)
    out = pd.DataFrame(index=meta.index)
    for col in NUMERIC_COLUMNS:
        if col in meta:
            values = pd.to_numeric(meta[col], errors="coerce").astype(float)
            if values.notna().any():
                out[col] = values
    return out


def confounds(
    mu: np.ndarray, table: pd.DataFrame, attributes: pd.DataFrame, seed: int
) -> latent.ConfoundReport:
    """The confound report on the test split (probes fit on train); warnings are logged."""
    is_train = (table["split"] == "train").to_numpy()
    is_test = (table["split"] == "test").to_numpy()
    meta = attributes.assign(label=table["label"].to_numpy())
    report = latent.confound_report(mu[is_train], meta[is_train], mu[is_test], meta[is_test], seed)
    for warning in report.warnings:
        log.warning("confound: %s", warning)
    return report


def traversal_rows(test: pd.DataFrame, limit: int = 8) -> tuple[np.ndarray, list[str]]:
    """Test rows to traverse from: the first image of each label (or the first few), and names."""
    labelled = test[test["label"].notna()]
    if labelled.empty:
        rows = test.index[: min(4, len(test))].to_numpy()
        return rows, [f"image {i}" for i in range(len(rows))]
    first = labelled.groupby(labelled["label"].astype(str), sort=True).head(1).iloc[:limit]
    first = first.sort_values("label", key=lambda s: s.astype(str))
    return first.index.to_numpy(), first["label"].astype(str).tolist()


def write_grids(
    out: Path,
    model: ConvVAE,
    test_images: np.ndarray,
    test_meta: pd.DataFrame,
    mu: np.ndarray,
    kl_per_dim: np.ndarray,
    ev: EvaluateParams,
    device: torch.device,
) -> None:
    """Traversals along the highest-KL dims, reconstructions beside originals, prior samples."""
    (out / "traversals").mkdir()
    (out / "grids").mkdir()
    rows, names = traversal_rows(test_meta.reset_index(drop=True))
    base = torch.from_numpy(mu[rows]).to(device)  # (R,J)
    values = np.linspace(-figures.TRAVERSAL_SPAN, figures.TRAVERSAL_SPAN, ev.traversal_steps)
    cols = ["source", *(f"{v:+.1f}σ" for v in values)]
    sources = np.asarray(test_images[rows])  # (R,C,H,W) uint8
    for rank, dim in enumerate(figures.top_kl_dims(kl_per_dim, ev.traversal_dims), start=1):
        grid = figures.traversal_grid(model, base, dim, ev.traversal_steps, sources)
        title = f"z_{dim} swept (KL rank {rank}: {kl_per_dim[dim]:.2f} nats)"
        xlabel = (
            f"z_{dim} set to -3..+3 prior standard deviations (σ)\n"
            "other dims at the source image's mu; first column: the source test image"
        )
        path = out / "traversals" / f"kl_rank{rank}_dim{dim:02d}.png"
        figures.save_labelled_grid(grid, names, cols, title, path, xlabel)

    n = min(32, len(test_images))
    originals = np.asarray(test_images[:n])
    recons = model.reconstruct(next(batches(originals, n, device))).cpu().numpy()
    ncol = min(8, n)
    grid = figures.reconstruction_grid(originals, recons, ncol=ncol)
    pairs = (n - n % ncol or n) // ncol
    figures.save_labelled_grid(
        grid,
        [
            f"{kind} {i * ncol + 1}-{(i + 1) * ncol}"
            for i in range(pairs)
            for kind in ("test", "recon")
        ],
        [""] * ncol,
        "Test images (odd rows) and their reconstructions (the decoded mean, even rows)",
        out / "grids" / "reconstructions_test.png",
    )
    scale = max(1, 64 // model.config.width)  # tiles drawn at least ~64 px wide
    generator = torch.Generator().manual_seed(ev.seed)
    samples = model.sample(64, generator=generator).cpu().numpy()
    figures.save_png(
        figures.image_grid(samples, ncol=8), out / "grids" / "prior_samples.png", scale
    )


@torch.no_grad()
def write_spectrum(
    out: Path,
    model: ConvVAE,
    results: Results,
    test_images: np.ndarray,
    ev: EvaluateParams,
    device: torch.device,
) -> None:
    """spectrum/spectrum.png: the images along the spectrum direction, decoded (from the train
    mean, moved to each train quantile 5%..95% of the position) and the nearest real test
    image to each position; each column titled with the fitted target there."""
    sp, table = results.spectrum, results.table
    mu = mu_of(table)
    train = mu[(table["split"] == "train").to_numpy()]
    test = mu[(table["split"] == "test").to_numpy()]
    steps = np.quantile(train @ sp.direction, np.linspace(0.05, 0.95, ev.traversal_steps))  # (S,)
    centre = train.mean(0)
    z = centre + (steps - centre @ sp.direction)[:, None] * sp.direction  # (S,J)
    decoded = model.likelihood.mean(model.decode(torch.from_numpy(z).float().to(device)))
    nearest = np.abs((test @ sp.direction)[None, :] - steps[:, None]).argmin(1)  # (S,)
    real = np.asarray(test_images[nearest])  # (S,C,H,W) uint8
    both = np.concatenate([decoded.cpu().numpy(), real.astype(np.float32) / 255.0])
    grid = figures.image_grid(both, ncol=len(steps))
    (out / "spectrum").mkdir()
    m = sp.metrics
    title = f"Spectrum axis of {sp.name}: test Spearman {m['spectrum_spearman']:.2f}"
    if "pca_spectrum_spearman" in m:
        title += f" (pixel PCA {m['pca_spectrum_spearman']:.2f})"
    figures.save_labelled_grid(
        grid,
        ["decoded", "nearest test image"],
        [f"{sp.slope * v + sp.intercept:.2f}" for v in steps],
        title,
        out / "spectrum" / "spectrum.png",
        f"fitted {sp.name} (linear fit on train) at the train 5%..95% quantiles of the position",
    )


def write_tables(
    out: Path, report: LabelReport, kl_per_dim: np.ndarray, mu_test: np.ndarray
) -> None:
    """tables/cluster_composition.csv (when labels allow) and tables/kl_per_dim.csv."""
    (out / "tables").mkdir()
    if report.composition is not None:
        report.composition.to_csv(out / "tables" / "cluster_composition.csv", index=False)
    variance = mu_test.var(0)
    pd.DataFrame(
        {
            "dim": np.arange(len(kl_per_dim)),
            "kl": kl_per_dim,
            "mu_variance": variance,
            "active": variance > ACTIVE_UNIT_THRESHOLD,
        }
    ).to_csv(out / "tables" / "kl_per_dim.csv", index=False, float_format="%.4g")


def confound_table(table: pd.DataFrame) -> pd.DataFrame:
    """The confound report as written: the note beside the attribute (it explains a row
    without figures), counts as integers, rates to 3 decimals."""
    first = ["attribute", "kind", "note"]
    out = table[first + [c for c in table if c not in first]].copy()
    for col in ("classes", "test_images"):
        out[col] = out[col].astype("Int64")
    return out.round({"accuracy": 3, "majority": 3, "skill": 3})


def write_plots(
    out: Path, history_path: Path, kl_per_dim: np.ndarray, mu_test: np.ndarray, notes: list[str]
) -> None:
    """plots/kl_per_dim.png and, when the train history exists, plots/training_history.png."""
    (out / "plots").mkdir()
    figures.kl_figure(
        kl_per_dim, mu_test.var(0), ACTIVE_UNIT_THRESHOLD, out / "plots" / "kl_per_dim.png"
    )
    if history_path.is_file():
        figures.history_figure(pd.read_csv(history_path), out / "plots" / "training_history.png")
    else:
        notes.append(f"{history_path}: not found, training curves not drawn")


# ----------------------------------------------------------------------------- MLflow


def log_to_mlflow(
    params: Params, extra: dict, out: Path, metrics: dict[str, float], params_path: Path
) -> str:
    """Log metrics, the whole evaluation folder ``out`` and its tables (as MLflow tables) into
    the training run (or a new one, named after the DVC experiment and what ``params_path``
    changes: :func:`pipeline.tracking.evaluation_run`); returns its id."""
    uri = tracking.resolve_tracking_uri(params.tracking)
    flat = params.flat()
    run_id = tracking.evaluation_run(
        uri,
        extra.get("mlflow_run_id"),
        params.paths.model,
        params.tracking.experiment,
        flat,
        tracking.run_labels(flat, params_path, REPO / "params.yaml"),
        tracking.lineage_tags(REPO, "evaluate", tracking.pipeline_files(params, params_path)),
    )
    tables = [f"tables/{CONFOUND_TABLE}", "tables/cluster_composition.csv"]
    tracking.log_evaluation(uri, run_id, out, metrics, ARTIFACT_DIR, tables)
    return run_id


def publish(
    params: Params, extra: dict, metrics: dict[str, float], retry: str, params_path: Path
) -> str | None:
    """Log the written evaluation to MLflow; returns the run id, or None after one warning line
    with the ``retry`` command when logging fails (the outputs on disk are kept)."""
    uri = tracking.resolve_tracking_uri(params.tracking)
    try:
        problem = tracking.uri_problem(uri)  # seconds, not MLflow's retries for minutes
        why = tracking.probe(uri) if problem is None else None
        if why is not None:
            problem = f"no MLflow tracking server answers at {tracking.without_user(uri)}: {why}"
        if problem is not None:
            raise ConnectionError(problem)
        with tracking.one_try():  # and one that dies while logging: one try per request
            return log_to_mlflow(params, extra, Path(params.paths.evaluation), metrics, params_path)
    except Exception as exc:  # any tracking failure: the finished evaluation must survive it
        log.warning(
            "MLflow logging failed (%s); the evaluation is in %s and %s: log it with `%s`",
            tracking.failure_line(uri, exc),
            params.paths.evaluation,
            params.paths.eval_metrics,
            retry,
        )
        return None


def saved_evaluation(params: Params) -> tuple[dict[str, float], dict]:
    """The metrics and checkpoint ``extra`` of an evaluation already written to disk."""
    path = Path(params.paths.eval_metrics)
    if not path.is_file() or not Path(params.paths.evaluation).is_dir():
        raise UserError(f"{path}: no evaluation to log (run `retina-vae evaluate` first)")
    _, extra = load_model(params.paths.model, torch.device("cpu"))
    return json.loads(path.read_text()), extra


# ----------------------------------------------------------------------------- the stage


def evaluate(params: Params) -> tuple[dict[str, float], dict]:
    """Run the whole evaluation and write its outputs; returns the metrics and the checkpoint's
    ``extra`` (the MLflow run it belongs to)."""
    ev, paths = params.evaluate, params.paths
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(ev.seed)  # the ELBO and IWAE samples: reruns give the same figures
    model, extra = load_model(paths.model, device)
    data = {s: load_split(Path(paths.processed), s, model) for s in SPLITS}
    test_images = data["test"][0]
    if len(test_images) == 0:
        raise UserError(
            f"{paths.processed}: the test split is empty (raise preprocess.test_fraction)"
        )
    log.info("test likelihood on %d images (IWAE k=%d)", len(test_images), ev.iwae_k)
    metrics, mu_test, logvar_test = likelihood(model, test_images, ev, device)
    table = embed_splits(model, data, (mu_test, logvar_test), ev.batch_size, device)
    metrics.update({f"eval_images_{s}": float(len(data[s][1])) for s in SPLITS})
    manifest = Path(paths.manifest)
    results = latent_reports(
        table, data, metadata_table(data, manifest), numeric_table(data, manifest), model, ev
    )
    found = {**results.report.metrics, **results.confound.metrics}
    if results.spectrum is not None:
        found.update(results.spectrum.metrics)
    metrics.update({f"test_{k}": v for k, v in found.items()})
    results.report.notes.extend(results.confound.notes)
    write_evaluation(params, model, data, results, metrics, device, extra)
    for note in results.report.notes:  # after write_plots: it adds the missing-history note
        log.info("note: %s", note)
    return metrics, extra


def embed_splits(
    model: ConvVAE,
    data: dict[str, tuple[np.ndarray, pd.DataFrame]],
    test_q: tuple[np.ndarray, np.ndarray],
    batch_size: int,
    device: torch.device,
) -> pd.DataFrame:
    """The embeddings table of every split (``row``: position within its split); the test
    split's (mu, logvar) (N,J) come from the likelihood pass, the others are encoded here."""
    parts = []
    for split in SPLITS:
        images, meta = data[split]
        if split == "test":
            q = test_q
        else:
            q = encode_images(model, images, batch_size, device, f"encoding {split}")
        parts.append(embeddings_table(meta, split, *q).assign(row=np.arange(len(meta))))
    return pd.concat(parts, ignore_index=True)


def latent_reports(
    table: pd.DataFrame,
    data: dict[str, tuple[np.ndarray, pd.DataFrame]],
    attributes: pd.DataFrame,
    numeric: pd.DataFrame,
    model: ConvVAE,
    ev: EvaluateParams,
) -> Results:
    """Label metrics on test mu (probe fit on train, beside the pixel-PCA baseline, with
    bootstrap intervals), the acquisition-confound report and the spectrum axis."""
    mu_all = mu_of(table)  # (N,J)
    is_train, is_test = (
        (table["split"] == "train").to_numpy(),
        (table["split"] == "test").to_numpy(),
    )
    baseline = pixel_pca(data["train"][0], data["test"][0], model.config.latent_dim, ev.seed)
    device = next(model.parameters()).device
    features = tuple(
        encoder_features(model, data[s][0], ev.batch_size, device) for s in ("train", "test")
    )  # 2 x (N, widths[-1])
    report = label_metrics(
        mu_all[is_train],
        table.loc[is_train, "label"],
        mu_all[is_test],
        table.loc[is_test, "label"],
        ev.knn_k,
        ev.seed,
        baseline=baseline,
        bootstrap=ev.bootstrap,
        features=features,
    )
    results = Results(
        table, attributes, numeric, report, confounds(mu_all, table, attributes, ev.seed)
    )
    target = latent.spectrum_target(table["label"], numeric, ev.label_order)
    if target is None:
        report.notes.append(
            "spectrum axis skipped: no severity column, no evaluate.label_order and the labels "
            "are not integer grades"
        )
        return results
    values, name = target
    spectrum, notes = latent.spectrum_report(
        mu_all[is_train], values[is_train], mu_all[is_test], values[is_test], name,
        baseline, ev.bootstrap, ev.seed,
    )  # fmt: skip
    report.notes.extend(notes)
    results.spectrum, results.target = spectrum, values
    return results


def map_header(
    params: Params, extra: dict, config: VAEConfig, metrics: dict[str, float]
) -> list[str]:
    """The lines that tell one map from another: run, model, key metrics."""
    run = extra.get("mlflow_run_id") or "no MLflow run"
    lines = [
        f"retina-vae latent map: MLflow run {run}, model {params.paths.model}",
        f"latent size J = {config.latent_dim}, {config.likelihood} likelihood, "
        f"{config.height}x{config.width} px, widths {list(config.widths)}",
    ]
    keys = [
        ("test_neg_elbo", "neg ELBO {:.1f} nats"),
        ("test_active_units", "active units {:.0f}"),
        ("test_probe_accuracy", "probe accuracy {:.3f}"),
        ("test_pca_probe_accuracy", "pixel-PCA probe {:.3f}"),
        ("test_spectrum_spearman", "spectrum Spearman {:.2f}"),
    ]
    shown = [fmt.format(metrics[k]) for k, fmt in keys if k in metrics]
    if shown:
        lines.append("test: " + ", ".join(shown))
    return lines


def write_evaluation(
    params: Params,
    model: ConvVAE,
    data: dict[str, tuple[np.ndarray, pd.DataFrame]],
    results: Results,
    metrics: dict[str, float],
    device: torch.device,
    extra: dict,
) -> None:
    """Every local output, atomically: the evaluation folder, then ``eval_metrics``."""
    ev, paths = params.evaluate, params.paths
    table, report = results.table, results.report
    (test_images, test_meta), is_test = data["test"], table["split"] == "test"
    mu_test = mu_of(table.loc[is_test])  # (N_test,J)
    kl_per_dim = np.array([metrics[f"test_kl_dim_{j}"] for j in range(model.config.latent_dim)])
    header = map_header(params, extra, model.config, metrics)
    with atomic_path(paths.evaluation) as out:
        out.mkdir()
        embeddings = table.drop(columns="row")
        if results.spectrum is not None:
            embeddings["spectrum_position"] = mu_of(table) @ results.spectrum.direction
        embeddings.to_parquet(out / "embeddings.parquet", index=False)
        write_maps(out, results, {s: data[s][0] for s in SPLITS}, ev, header, metrics)
        write_grids(out, model, test_images, test_meta, mu_test, kl_per_dim, ev, device)
        if results.spectrum is not None:
            write_spectrum(out, model, results, test_images, ev, device)
        write_tables(out, report, kl_per_dim, mu_test)
        confound_table(results.confound.table).to_csv(out / "tables" / CONFOUND_TABLE, index=False)
        if report.probe is not None:
            write_json(out / PROBE_FILE, latent.probe_json(report.probe))
        write_plots(out, Path(paths.train_history), kl_per_dim, mu_test, report.notes)
        write_json(out / "evaluate_params.json", asdict(ev))
        (out / "notes.txt").write_text("".join(f"{n}\n" for n in report.notes) or "none\n")
    write_json(paths.eval_metrics, metrics)


SUMMARY = (  # the stage's last line: (metric, how it is printed)
    ("test_neg_elbo", "neg ELBO {:.1f}"),
    ("test_iwae", "neg IWAE {:.1f} nats"),  # printed as -test_iwae: both bounds on -log p(x)
    ("test_active_units", "active units {:.0f}"),
    ("test_probe_accuracy", "probe accuracy {:.3f}"),
    ("test_pca_probe_accuracy", "pixel PCA {:.3f}"),
    ("test_probe_accuracy_vs_pca", "margin {:+.3f}"),
    ("test_features_probe_accuracy", "encoder features {:.3f}"),
    ("test_spectrum_spearman", "spectrum Spearman {:.3f}"),
    ("test_pca_spectrum_spearman", "pixel PCA {:.3f}"),
    ("test_spectrum_spearman_vs_pca", "margin {:+.3f}"),
)


def summary(metrics: dict[str, float]) -> str:
    """One line of the key test figures, -log p(x) bounds both positive, margins with their
    intervals."""
    parts = []
    for key, fmt in SUMMARY:
        if key in metrics:
            value = -metrics[key] if key == "test_iwae" else metrics[key]
            text = fmt.format(value)
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            if low is not None and high is not None:
                text += f" (95% CI {low:+.3f} to {high:+.3f})"
            parts.append(text)
    return ", ".join(parts)


def _body(params: Params, args: argparse.Namespace) -> None:
    metrics, extra = saved_evaluation(params) if args.log_only else evaluate(params)
    retry = f"retina-vae evaluate --log-only --params {args.params}"
    run_id = publish(params, extra, metrics, retry, Path(args.params))
    log.info(
        "test: %s; %s",
        summary(metrics),
        f"logged to MLflow run {run_id}" if run_id else "not logged",
    )


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-only",
        action="store_true",
        help="log the evaluation already on disk to MLflow (after a failed log), compute nothing",
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", argv, _body, _add_args, description=__doc__.splitlines()[0])
