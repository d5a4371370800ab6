"""Disease-spectrum metrics on the latent means: how well do the labels separate in mu?

All functions take plain numpy arrays (mu of shape (N, J), labels as strings) and return plain
floats, so they are tested on synthetic latents with known structure. Label metrics follow one
protocol: fit on the train split, score on the test split (probe, k-NN); clustering and
silhouette are measured on the test split alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    roc_auc_score,
    silhouette_score,
)
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

log = logging.getLogger("retina_vae.evaluate")

# silhouette is O(N^2) in memory and time; above this many points it is estimated on a sample
SILHOUETTE_MAX_POINTS = 5000


def linear_probe(
    train_z: np.ndarray, train_y: np.ndarray, test_z: np.ndarray, test_y: np.ndarray, seed: int = 0
) -> dict[str, float]:
    """Multinomial logistic regression on standardised mu, fit on train and scored on test.

    Returns ``probe_accuracy`` and ``probe_auc`` (macro one-vs-rest ROC AUC; binary: the usual
    AUC). AUC is left out when the test split holds fewer than two classes (it is undefined).
    """
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed))
    clf.fit(train_z, train_y)
    out = {"probe_accuracy": float(np.mean(clf.predict(test_z) == test_y))}
    if len(np.unique(test_y)) >= 2:
        proba = clf.predict_proba(test_z)  # (N, K), columns in clf.classes_ order
        classes = clf.classes_
        if len(classes) == 2:
            out["probe_auc"] = float(roc_auc_score(test_y == classes[1], proba[:, 1]))
        else:
            out["probe_auc"] = float(
                roc_auc_score(test_y, proba, multi_class="ovr", average="macro", labels=classes)
            )
    return out


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
) -> LabelReport:
    """Every disease-spectrum metric on mu, or a note saying why it cannot be computed.

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
        report.metrics.update(linear_probe(zr, yr, zt[seen], yt[seen], seed))
        report.metrics["knn_accuracy"] = knn_accuracy(zr, yr, zt[seen], yt[seen], knn_k)
    return report
