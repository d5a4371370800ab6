"""Disease-spectrum metrics on the latent means: how well do the labels separate in mu?

All functions take plain numpy arrays (mu of shape (N, J), labels as strings) and return plain
floats, so they are tested on synthetic latents with known structure. Label metrics follow one
protocol: fit on the train split, score on the test split (probe, k-NN); clustering and
silhouette are measured on the test split alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import rankdata, spearmanr
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_score,
)
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger("retina_vae.evaluate")

# silhouette is O(N^2) in memory and time; above this many points it is estimated on a sample
SILHOUETTE_MAX_POINTS = 5000
# the pixel-PCA baseline is fit on at most this many train images (a seeded sample): 2,000
# fundus photos of 256 x 256 x 3 are 1.6 GB as float32, and the top J components are stable
PCA_FIT_MAX = 2000
CI_LEVEL = 0.95  # confidence intervals of every latent-vs-PCA comparison

# Files of an evaluation folder that `retina-vae encode --map` reads back (evaluate writes them)
PROBE_FILE = "probe.json"  # the label probe on mu, for `retina-vae encode`
LAYOUT_FILE = "maps/layout.json"  # the PCA layout of the maps, for `retina-vae encode`
MAP_POINTS = "maps/map_points.parquet"  # image_id and map coordinates of every point drawn


def fit_probe(train_z: np.ndarray, train_y: np.ndarray, seed: int = 0) -> Pipeline:
    """Multinomial logistic regression on standardised features (N,J), fit on train."""
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    return clf.fit(train_z, train_y)


def probe_scores(
    test_y: np.ndarray, pred: np.ndarray, proba: np.ndarray, classes: np.ndarray
) -> dict[str, float]:
    """``probe_accuracy`` and ``probe_auc`` of predictions (M,) and probabilities (M,K).

    AUC is macro one-vs-rest ROC AUC (binary: the usual AUC); it is left out when ``test_y``
    holds fewer than two classes, and NaN when it misses one of ``classes`` (a bootstrap
    resample of a small test split can).
    """
    out = {"probe_accuracy": float(np.mean(pred == test_y))}
    present = np.unique(test_y)
    if len(present) < 2:
        return out
    if len(classes) == 2:
        out["probe_auc"] = binary_auc(test_y == classes[1], proba[:, 1])
    elif len(np.intersect1d(present, classes)) < len(classes):
        out["probe_auc"] = float("nan")
    else:  # macro one-vs-rest: the mean of each class's AUC against the rest
        out["probe_auc"] = float(
            np.mean([binary_auc(test_y == c, proba[:, k]) for k, c in enumerate(classes)])
        )
    return out


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of ``score`` (N,) for the ``positive`` (N,) bool rows: the Mann-Whitney U of the
    positives' scores over the negatives' (from mid-ranks: ties count one half) / (n_pos n_neg).

    The same value as sklearn's roc_auc_score, about 30x faster on a few hundred rows, which
    the bootstrap (thousands of AUCs) needs.
    """
    n_pos = int(positive.sum())
    n_neg = len(score) - n_pos
    u = rankdata(score)[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def linear_probe(
    train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """:func:`fit_probe` on train, :func:`probe_scores` on test."""
    clf = fit_probe(train_z, train_y, seed)
    return probe_scores(test_y, clf.predict(test_z), clf.predict_proba(test_z), clf.classes_)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    resamples: int,
    seed: int = 0,
    level: float = CI_LEVEL,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval over the n test images (resampled with replacement).

    ``statistic(rows)`` takes (n,) row indices and returns (K,) floats; returns the (K,)
    lower and upper ends of the ``level`` interval. A resample giving a non-finite value (an
    AUC without every class) is left out; an end is NaN when fewer than half are left.
    """
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(resamples)])  # (B,K)
    values = values.reshape(resamples, -1)
    tail = 50.0 * (1.0 - level)
    low, high = np.full(values.shape[1], np.nan), np.full(values.shape[1], np.nan)
    for k, column in enumerate(values.T):
        finite = column[np.isfinite(column)]
        if len(finite) >= resamples / 2:
            low[k], high[k] = np.percentile(finite, [tail, 100.0 - tail])
    return low, high


def probe_json(clf: Pipeline) -> dict:
    """A probe from :func:`fit_probe` as plain JSON: classes, the scaler and the weights."""
    scaler, lr = clf[0], clf[-1]
    return {
        "classes": [str(c) for c in lr.classes_],
        "mean": scaler.mean_.tolist(),
        "scale": scaler.scale_.tolist(),
        "coef": lr.coef_.tolist(),  # (K,J), or (1,J) for two classes
        "intercept": lr.intercept_.tolist(),
    }


def probe_predict(probe: dict, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The predicted class (N,) of each row of z (N,J) under a :func:`probe_json` probe, and
    its probability (N,): softmax of the class scores (two classes: the logistic of one)."""
    x = (z - np.asarray(probe["mean"])) / np.asarray(probe["scale"])  # (N,J) standardised
    scores = x @ np.asarray(probe["coef"]).T + np.asarray(probe["intercept"])  # (N,K) or (N,1)
    if scores.shape[1] == 1:
        scores = np.concatenate([np.zeros_like(scores), scores], axis=1)  # logistic = softmax
    scores = scores - scores.max(1, keepdims=True)
    proba = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)  # (N,K)
    return np.asarray(probe["classes"])[proba.argmax(1)], proba.max(1)


def pixel_pca(
    train_images: np.ndarray, test_images: np.ndarray, n_components: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """First J principal components of the pixels: (N,C,H,W), (M,C,H,W) uint8 -> (N,J), (M,J).

    The baseline a latent space has to beat: a linear summary of the same arrays with the same
    dimension. Fit on at most PCA_FIT_MAX train images (seeded sample, randomised SVD);
    pixels are read in chunks, so memory-mapped splits of any size fit.
    """
    n = len(train_images)
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(n, PCA_FIT_MAX, replace=False)) if n > PCA_FIT_MAX else None
    fit_x = flat_pixels(train_images if fit_rows is None else train_images[fit_rows])  # (n',D)
    k = min(n_components, *fit_x.shape)
    pca = PCA(n_components=k, svd_solver="randomized", random_state=seed).fit(fit_x)

    def project(images: np.ndarray) -> np.ndarray:
        chunks = (images[i : i + 256] for i in range(0, len(images), 256))
        parts = [pca.transform(flat_pixels(chunk)) for chunk in chunks]
        return np.concatenate(parts) if parts else np.zeros((0, k), np.float32)

    return project(train_images), project(test_images)


def flat_pixels(images: np.ndarray) -> np.ndarray:
    """(N,C,H,W) uint8 -> (N, C*H*W) float32 in [0, 1]."""
    return np.asarray(images, dtype=np.float32).reshape(len(images), -1) / 255.0


def knn_accuracy(
    train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray, k: int
) -> float:
    """Accuracy of a k-nearest-neighbour vote (Euclidean in mu) from train onto test."""
    k = min(k, len(train_z))  # a tiny train split cannot offer more neighbours than it has
    clf = KNeighborsClassifier(n_neighbors=k).fit(train_z, train_y)
    return float(np.mean(clf.predict(test_z) == test_y))


def label_silhouette(z: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Mean silhouette of the label groups in mu (-1..1; >0 means labels form clusters)."""
    sample = min(len(z), SILHOUETTE_MAX_POINTS)
    return float(silhouette_score(z, y, sample_size=sample, random_state=seed))


def kmeans_clusters(z: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k-means cluster index (N,) of each row of mu, with k fixed to the number of labels."""
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)


def composition_table(clusters: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """Cluster-by-label counts: one row per cluster, one column per label, plus ``total``."""
    table = pd.crosstab(pd.Series(clusters, name="cluster"), pd.Series(y, name="label"))
    table.columns = [str(c) for c in table.columns]
    table["total"] = table.sum(axis=1)
    return table.reset_index()


@dataclass
class LabelReport:
    """Label metrics (flat name -> float), the composition table and why anything was skipped."""

    metrics: dict[str, float] = field(default_factory=dict)
    composition: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    probe: Pipeline | None = None  # the probe on mu, fit on train (for `retina-vae encode`)


def _labelled(z: np.ndarray, labels: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Rows of mu that carry a label, and those labels as strings."""
    keep = labels.notna().to_numpy()
    return z[keep], labels[keep].astype(str).to_numpy()


def label_metrics(
    train_z: np.ndarray,
    train_labels: pd.Series,
    test_z: np.ndarray,
    test_labels: pd.Series,
    knn_k: int,
    seed: int = 0,
    baseline: tuple[np.ndarray, np.ndarray] | None = None,
    bootstrap: int = 0,
    features: tuple[np.ndarray, np.ndarray] | None = None,
) -> LabelReport:
    """Every disease-spectrum metric on mu, or a note saying why it cannot be computed.

    ``baseline`` (train (N,K), test (M,K) features of the same rows, e.g. :func:`pixel_pca`)
    gets the same probe as mu: ``pca_probe_accuracy``/``_auc``, and ``probe_*_vs_pca`` is the
    latent's margin over it (positive: the latent reads the labels better than the pixels do),
    with its ``CI_LEVEL`` interval from ``bootstrap`` resamples of the test images
    (``probe_*_vs_pca_ci_low``/``_high``; 0: no interval). ``features`` (train (N,F), test
    (M,F), e.g. the encoder's pooled last feature map) gets the same probe too:
    ``features_probe_accuracy``/``_auc``, the bottleneck diagnostic.

    Unlabelled rows are left out. Metrics need >= 2 classes among the labelled train images
    (probe, k-NN) or test images (silhouette, k-means); otherwise they are skipped with a note
    rather than reported as NaN. Test rows whose label never occurs in train are left out of the
    probe and k-NN (no classifier can predict them) and that is noted too.
    """
    report = LabelReport()
    zr, yr = _labelled(train_z, train_labels)
    zt, yt = _labelled(test_z, test_labels)
    if len(yt) == 0:
        report.notes.append("no labelled test images: label metrics skipped")
        return report

    test_classes = np.unique(yt)
    if len(test_classes) >= 2 and len(yt) > len(test_classes):
        clusters = kmeans_clusters(zt, len(test_classes), seed)
        report.metrics["kmeans_ari"] = float(adjusted_rand_score(yt, clusters))
        report.metrics["kmeans_nmi"] = float(normalized_mutual_info_score(yt, clusters))
        report.metrics["silhouette"] = label_silhouette(zt, yt, seed)
        report.composition = composition_table(clusters, yt)
    else:
        report.notes.append(
            f"test split has {len(test_classes)} label(s) on {len(yt)} images: "
            "silhouette and k-means skipped"
        )

    train_classes = np.unique(yr)
    if len(train_classes) < 2:
        report.notes.append(
            f"train split has {len(train_classes)} label(s): linear probe and k-NN skipped"
        )
        return report
    seen = np.isin(yt, train_classes)
    if not seen.all():
        unseen = sorted(set(yt[~seen]))
        report.notes.append(
            f"{int((~seen).sum())} test images with labels unseen in train left "
            f"out of probe and k-NN: {unseen}"
        )
    if seen.any():
        # the accuracy of always answering the most common train label: the floor to beat
        values, counts = np.unique(yr, return_counts=True)
        report.metrics["majority_accuracy"] = float(np.mean(yt[seen] == values[counts.argmax()]))
        report.probe = fit_probe(zr, yr, seed)
        latent_out = _predictions(report.probe, zt[seen])
        report.metrics.update(probe_scores(yt[seen], *latent_out))
        report.metrics["knn_accuracy"] = knn_accuracy(zr, yr, zt[seen], yt[seen], knn_k)
        if baseline is not None:
            br, _ = _labelled(baseline[0], train_labels)
            bt, _ = _labelled(baseline[1], test_labels)
            pca_out = _predictions(fit_probe(br, yr, seed), bt[seen])
            scores = probe_scores(yt[seen], *pca_out)
            report.metrics.update({f"pca_{k}": v for k, v in scores.items()})
            for key in ("accuracy", "auc"):
                if f"pca_probe_{key}" in report.metrics and f"probe_{key}" in report.metrics:
                    margin = report.metrics[f"probe_{key}"] - report.metrics[f"pca_probe_{key}"]
                    report.metrics[f"probe_{key}_vs_pca"] = margin
            if bootstrap:
                report.metrics.update(margin_ci(yt[seen], latent_out, pca_out, bootstrap, seed))
        if features is not None:
            fr, _ = _labelled(features[0], train_labels)
            ft, _ = _labelled(features[1], test_labels)
            scores = linear_probe(fr, yr, ft[seen], yt[seen], seed)
            report.metrics.update({f"features_{k}": v for k, v in scores.items()})
    return report


def _predictions(clf: Pipeline, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fitted probe's predicted labels (M,), probabilities (M,K) and its K classes."""
    return clf.predict(z), clf.predict_proba(z), clf.classes_


def margin_ci(
    test_y: np.ndarray,
    latent: tuple[np.ndarray, np.ndarray, np.ndarray],
    baseline: tuple[np.ndarray, np.ndarray, np.ndarray],
    resamples: int,
    seed: int = 0,
) -> dict[str, float]:
    """Bootstrap interval (:func:`bootstrap_ci`) of the latent-minus-baseline probe margins.

    ``latent``, ``baseline``: each probe's predictions (M,), probabilities (M,K) and classes on
    the same M test images. Both probes stay fit on train: the interval is the test-sampling
    uncertainty of the comparison. Returns ``probe_{accuracy,auc}_vs_pca_ci_{low,high}``.
    """
    keys = ("accuracy", "auc")

    def margins(rows: np.ndarray) -> np.ndarray:
        a = probe_scores(test_y[rows], latent[0][rows], latent[1][rows], latent[2])
        b = probe_scores(test_y[rows], baseline[0][rows], baseline[1][rows], baseline[2])
        return np.array([a.get(f"probe_{k}", np.nan) - b.get(f"probe_{k}", np.nan) for k in keys])

    low, high = bootstrap_ci(margins, len(test_y), resamples, seed)
    out = {}
    for key, lo, hi in zip(keys, low, high, strict=True):
        if np.isfinite(lo) and np.isfinite(hi):
            out[f"probe_{key}_vs_pca_ci_low"], out[f"probe_{key}_vs_pca_ci_high"] = lo, hi
    return out


# ----------------------------------------------------------------------------- confounds
# Does the latent space encode how an image was acquired (camera, site, size) rather than the
# disease? A linear probe on mu predicts each metadata attribute, against the majority rate.

UNKNOWN_VALUE = "(unknown)"
# attributes that describe acquisition (where or how an image was taken), not the eye itself
ACQUISITION = ("source_folder", "manufacturer", "site", "device", "size_class")
# optional metadata columns copied as they are when a table has them
DEVICE_COLUMNS = ("manufacturer", "site", "device")
SIZE_CLASSES_MAX = 12  # more distinct image sizes than this are binned by the longer side
SOURCE_FOLDERS_MAX = 40  # more top-level folders than this are not sites or devices
# a warning needs the latent to read the attribute at least this well (skill, below)
CONFOUND_MIN_SKILL = 0.2


def metadata_attributes(meta: pd.DataFrame) -> pd.DataFrame:
    """The metadata attributes of each image that a latent space should not need to encode.

    From a processed table (or the manifest): ``eye``; ``source_folder``, the first folder of
    the ``source`` path (a site, a device export, a format folder) as a code, ``folder 1`` ...
    ``folder k`` in the sorted order of the names (:func:`folder_codes`: a folder's name may be
    a patient identifier, and no heuristic tells which; paths without a folder and .npz rows
    give none; left out when the folders look like one per patient - each holding a single
    ``subject_id``, or more than SOURCE_FOLDERS_MAX of them - since a per-patient attribute
    says nothing about acquisition); any of ``DEVICE_COLUMNS`` present (e.g. a DICOM manufacturer);
    ``size_class``, the original ``width`` x ``height`` (binned by the longer side when there
    are more than SIZE_CLASSES_MAX sizes). Missing values are ``UNKNOWN_VALUE``; attributes the
    table cannot give are left out. Same row order and index as ``meta``.
    """
    out = pd.DataFrame(index=meta.index)
    if "eye" in meta:
        out["eye"] = meta["eye"]
    if "source" in meta:
        parts = meta["source"].astype(str).str.replace("\\", "/", regex=False).str.split("/")
        folder = parts.map(lambda p: p[0] if len(p) > 1 and p[0] not in ("", ".") else None)
        if folder.notna().any() and not _per_patient(folder, meta):
            out["source_folder"] = folder_codes(folder)
    for col in DEVICE_COLUMNS:
        if col in meta:
            out[col] = meta[col]
    if {"width", "height"} <= set(meta.columns):
        w = pd.to_numeric(meta["width"], errors="coerce")
        h = pd.to_numeric(meta["height"], errors="coerce")
        sizes = w.astype("Int64").astype(str) + "x" + h.astype("Int64").astype(str)
        sizes = sizes.where(w.notna() & h.notna())
        if sizes.nunique() > SIZE_CLASSES_MAX:
            side = np.fmax(w.to_numpy(float), h.to_numpy(float))
            bins = [0, 256, 512, 1024, 2048, np.inf]
            names = ["<256 px", "256-511 px", "512-1023 px", "1024-2047 px", ">=2048 px"]
            sizes = pd.Series(
                pd.cut(side, bins, right=False, labels=names).astype(object), index=meta.index
            ).where(w.notna() & h.notna())
        out["size_class"] = sizes
    return out.astype(object).where(out.notna(), UNKNOWN_VALUE).astype(str)


def folder_codes(folder: pd.Series) -> pd.Series:
    """Top-level folder names -> ``folder 1`` ... ``folder k``, numbered in the sorted order of
    the distinct names (None stays None). Outputs, logs and MLflow show the codes only: the
    ingest manifest, which stays with the source data, maps them back to the paths."""
    number = {name: k for k, name in enumerate(sorted(folder.dropna().unique()), start=1)}
    return folder.map(number).map(lambda k: f"folder {int(k)}", na_action="ignore")


def _per_patient(folder: pd.Series, meta: pd.DataFrame) -> bool:
    """Whether top-level folders look like one per patient: more than SOURCE_FOLDERS_MAX, or
    each holding a single ``subject_id``."""
    if folder.nunique() > SOURCE_FOLDERS_MAX:
        return True
    if "subject_id" not in meta:
        return False
    subjects = meta["subject_id"][folder.notna()].groupby(folder.dropna()).nunique()
    return bool((subjects == 1).all())


def attribute_probe(
    train_z: np.ndarray,
    train_values: pd.Series,
    test_z: np.ndarray,
    test_values: pd.Series,
    seed: int = 0,
) -> tuple[dict[str, float], str | None]:
    """How well mu predicts one attribute: ``linear_probe`` fit on train, scored on test.

    Returns ``({"accuracy", "majority", "skill", "classes", "test_images"}, None)`` or
    ``({}, reason)`` when it cannot be measured. Rows whose value is missing (NaN or
    ``UNKNOWN_VALUE``) are left out, and so are test rows with a value unseen in train.
    ``majority`` is the accuracy of always answering the commonest train value; ``skill`` =
    (accuracy - majority) / (1 - majority): 0 at the majority rate, 1 when perfect.
    """
    keep_r = train_values.notna().to_numpy() & (train_values.astype(str) != UNKNOWN_VALUE)
    keep_t = test_values.notna().to_numpy() & (test_values.astype(str) != UNKNOWN_VALUE)
    zr, yr = train_z[keep_r], train_values[keep_r].astype(str).to_numpy()
    zt, yt = test_z[keep_t], test_values[keep_t].astype(str).to_numpy()
    classes, counts = np.unique(yr, return_counts=True)
    if len(classes) < 2:
        return {}, f"{len(classes)} value(s) among the train images"
    seen = np.isin(yt, classes)
    if not seen.any():
        return {}, "no test image has a value seen in train"
    majority = float(np.mean(yt[seen] == classes[counts.argmax()]))
    accuracy = linear_probe(zr, yr, zt[seen], yt[seen], seed)["probe_accuracy"]
    skill = (accuracy - majority) / (1.0 - majority) if majority < 1.0 else 0.0
    return {
        "accuracy": accuracy,
        "majority": majority,
        "skill": float(skill),
        "classes": float(len(classes)),
        "test_images": float(seen.sum()),
    }, None


@dataclass
class ConfoundReport:
    """``confound_<attr>`` (probe accuracy) and ``confound_<attr>_majority`` metrics, one table
    row per attribute (and one for the label, to compare), notes and warning lines."""

    metrics: dict[str, float] = field(default_factory=dict)
    table: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def confound_report(
    train_z: np.ndarray,
    train_meta: pd.DataFrame,
    test_z: np.ndarray,
    test_meta: pd.DataFrame,
    seed: int = 0,
    acquisition: tuple[str, ...] = ACQUISITION,
    min_skill: float = CONFOUND_MIN_SKILL,
) -> ConfoundReport:
    """Probe mu for every column of ``train_meta`` / ``test_meta`` (e.g. from
    :func:`metadata_attributes`) besides ``label``, which, when present, is probed the same way
    for comparison.

    A warning is raised for each acquisition attribute (``acquisition``) that the latent reads
    better than the label: a higher skill than the label's, and at least ``min_skill``, so a
    map of mu is likely to group images by camera or site rather than by disease. Without
    labels, an acquisition attribute read with skill >= ``min_skill`` gives a note.
    """
    report = ConfoundReport()
    rows = []
    label = None
    if "label" in train_meta and "label" in test_meta:
        label, why = attribute_probe(train_z, train_meta["label"], test_z, test_meta["label"], seed)
        rows.append({"attribute": "label", "kind": "label", **label, "note": why or ""})
        label = label or None
    for attr in [c for c in train_meta.columns if c != "label" and c in test_meta]:
        kind = "acquisition" if attr in acquisition else "other"
        result, why = attribute_probe(train_z, train_meta[attr], test_z, test_meta[attr], seed)
        rows.append({"attribute": attr, "kind": kind, **result, "note": why or ""})
        if why:
            report.notes.append(f"confound {attr}: not measured ({why})")
            continue
        report.metrics[f"confound_{attr}"] = result["accuracy"]
        report.metrics[f"confound_{attr}_majority"] = result["majority"]
        if kind != "acquisition" or result["skill"] < min_skill:
            continue
        read = (
            f"probe accuracy {result['accuracy']:.3f} vs majority {result['majority']:.3f}, "
            f"skill {result['skill']:.2f}"
        )
        if label is None:
            report.notes.append(f"the latent encodes {attr} ({read}); no labels to compare")
        elif result["skill"] > label["skill"]:
            report.warnings.append(
                f"the latent reads {attr} better than the label ({read}; label: accuracy "
                f"{label['accuracy']:.3f} vs majority {label['majority']:.3f}, skill "
                f"{label['skill']:.2f}): the map may group images by acquisition, not disease"
            )
    columns = ["attribute", "kind", "classes", "test_images", "accuracy", "majority", "skill"]
    report.table = pd.DataFrame(rows).reindex(columns=[*columns, "note"])
    return report


# ----------------------------------------------------------------------------- spectrum
# Is there a direction in mu along which the disease gets worse? A linear fit of an ordinal
# target (a severity, or labels in a known order) on mu over train gives it; its rank
# correlation on test says how well the direction orders unseen images.

SEVERITY_COLUMNS = ("severity",)  # numeric per-image columns that are a disease spectrum
MIN_SPECTRUM_LEVELS = 3  # a target needs this many distinct train values to be a spectrum


def spectrum_target(
    labels: pd.Series, numeric: pd.DataFrame, label_order: tuple[str, ...] | None
) -> tuple[np.ndarray, str] | None:
    """The ordinal value (N,) float (NaN: unknown) of each image, and its name; or None.

    In order of preference: the rank of each label in ``label_order`` (labels outside it
    unknown); a ``SEVERITY_COLUMNS`` column of ``numeric``; labels that are all integers
    (e.g. DR grades 0-4) with at least ``MIN_SPECTRUM_LEVELS`` values.
    """
    if label_order:
        rank = {name: float(i) for i, name in enumerate(label_order)}
        values = labels.map(lambda v: rank.get(str(v), np.nan) if pd.notna(v) else np.nan)
        return values.to_numpy(float), "label order " + " < ".join(label_order)
    for col in SEVERITY_COLUMNS:
        if col in numeric and numeric[col].notna().any():
            return pd.to_numeric(numeric[col], errors="coerce").to_numpy(float), col
    known = labels.dropna().astype(str)
    grades = pd.to_numeric(known, errors="coerce")
    whole = grades.notna().all() and (grades == grades.round()).all()
    if len(known) and whole and grades.nunique() >= MIN_SPECTRUM_LEVELS:
        return pd.to_numeric(labels, errors="coerce").to_numpy(float), "label (ordinal grade)"
    return None


@dataclass
class Spectrum:
    """The latent direction that orders a target: ``score = mu @ direction`` (latent units),
    predicted target = ``slope * score + intercept``; ``spectrum_*`` metrics."""

    name: str
    direction: np.ndarray  # (J,) unit vector
    slope: float
    intercept: float
    metrics: dict[str, float] = field(default_factory=dict)


def fit_direction(train_z: np.ndarray, train_t: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Least-squares fit ``t ~ z w + b`` over train: (unit direction (J,), |w|, b)."""
    reg = LinearRegression().fit(train_z, train_t)
    norm = float(np.linalg.norm(reg.coef_))
    direction = reg.coef_ / norm if norm > 0 else np.zeros_like(reg.coef_)
    return direction, norm, float(reg.intercept_)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (scipy; ties get mean ranks); NaN when either is constant."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def spectrum_report(
    train_z: np.ndarray,
    train_t: np.ndarray,
    test_z: np.ndarray,
    test_t: np.ndarray,
    name: str,
    baseline: tuple[np.ndarray, np.ndarray] | None = None,
    bootstrap: int = 0,
    seed: int = 0,
) -> tuple[Spectrum | None, list[str]]:
    """Fit the direction on train (rows with a known target), score it on test.

    Metrics: ``spectrum_spearman`` (test Spearman of the fitted values against the target),
    ``pca_spectrum_spearman`` (the same fit on ``baseline`` features, e.g. pixel PCA),
    ``spectrum_spearman_vs_pca`` (their difference) and its interval
    ``spectrum_spearman_vs_pca_ci_{low,high}`` from ``bootstrap`` test resamples. Returns
    (None, [note]) when the target cannot be fit (fewer than ``MIN_SPECTRUM_LEVELS`` train
    values, or a constant test target).
    """
    fr, ft = np.isfinite(train_t), np.isfinite(test_t)
    if len(np.unique(train_t[fr])) < MIN_SPECTRUM_LEVELS or len(np.unique(test_t[ft])) < 2:
        why = f"{name}: too few distinct values among train or test images"
        return None, [f"spectrum axis skipped ({why})"]
    direction, slope, intercept = fit_direction(train_z[fr], train_t[fr])
    out = Spectrum(name, direction, slope, intercept)
    yt, latent_fit = test_t[ft], test_z[ft] @ direction
    out.metrics["spectrum_spearman"] = spearman(latent_fit, yt)
    if baseline is not None:
        w, _, _ = fit_direction(baseline[0][fr], train_t[fr])
        pca_fit = baseline[1][ft] @ w
        out.metrics["pca_spectrum_spearman"] = spearman(pca_fit, yt)
        out.metrics["spectrum_spearman_vs_pca"] = (
            out.metrics["spectrum_spearman"] - out.metrics["pca_spectrum_spearman"]
        )
        if bootstrap:

            def margin(rows: np.ndarray) -> np.ndarray:
                return np.array(
                    [spearman(latent_fit[rows], yt[rows]) - spearman(pca_fit[rows], yt[rows])]
                )

            low, high = bootstrap_ci(margin, len(yt), bootstrap, seed)
            if np.isfinite(low[0]) and np.isfinite(high[0]):
                out.metrics["spectrum_spearman_vs_pca_ci_low"] = float(low[0])
                out.metrics["spectrum_spearman_vs_pca_ci_high"] = float(high[0])
    return out, []
