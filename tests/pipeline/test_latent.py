"""Disease-spectrum metrics on synthetic latents whose structure is known by construction."""

import numpy as np
import pandas as pd
import pytest

from pipeline import latent
from pipeline.latent import (
    composition_table,
    knn_accuracy,
    label_metrics,
    linear_probe,
    pixel_pca,
)

CLASSES = np.array(["CNV", "DME", "DRUSEN", "NORMAL"])


def _clusters(n_per_class: int, spread: float, seed: int) -> tuple[np.ndarray, pd.Series]:
    """Four Gaussian blobs in 8-D, centres 10 apart, one class per blob."""
    rng = np.random.default_rng(seed)
    centres = 10.0 * np.eye(len(CLASSES), 8)  # (K, J)
    y = np.repeat(CLASSES, n_per_class)  # (N,)
    z = centres[np.repeat(np.arange(len(CLASSES)), n_per_class)]  # (N, J)
    return z + spread * rng.standard_normal(z.shape), pd.Series(y)


def test_separated_clusters_give_perfect_scores():
    train_z, train_y = _clusters(40, 0.5, seed=0)
    test_z, test_y = _clusters(20, 0.5, seed=1)
    report = label_metrics(train_z, train_y, test_z, test_y, knn_k=5)
    assert report.notes == []
    m = report.metrics
    assert m["probe_accuracy"] == 1.0
    assert m["probe_auc"] == pytest.approx(1.0)
    assert m["knn_accuracy"] == 1.0
    assert m["kmeans_ari"] == pytest.approx(1.0)
    assert m["kmeans_nmi"] == pytest.approx(1.0)
    assert m["silhouette"] > 0.8
    assert m["majority_accuracy"] == pytest.approx(0.25)
    # each k-means cluster holds exactly one class, 20 test images each
    table = report.composition.set_index("cluster")
    counts = table[list(CLASSES)].to_numpy()
    assert sorted(counts.max(axis=1)) == [20] * 4
    assert (counts > 0).sum() == 4
    assert table["total"].sum() == 80


def test_random_labels_score_at_chance():
    rng = np.random.default_rng(0)
    train_z, test_z = rng.standard_normal((800, 8)), rng.standard_normal((800, 8))
    train_y = pd.Series(rng.choice(CLASSES, 800))
    test_y = pd.Series(rng.choice(CLASSES, 800))
    m = label_metrics(train_z, train_y, test_z, test_y, knn_k=5).metrics
    # 4 balanced classes: chance accuracy 0.25, AUC 0.5, ARI and NMI ~0, silhouette ~0
    assert m["probe_accuracy"] == pytest.approx(0.25, abs=0.06)
    assert m["knn_accuracy"] == pytest.approx(0.25, abs=0.06)
    assert m["probe_auc"] == pytest.approx(0.5, abs=0.05)
    assert abs(m["kmeans_ari"]) < 0.02
    assert m["kmeans_nmi"] < 0.02
    assert abs(m["silhouette"]) < 0.05


def test_binary_auc_ranks_by_the_positive_class():
    # one informative dim: class "b" has larger z_0; a perfect ranking gives AUC 1
    z = np.linspace(-3, 3, 40)[:, None]  # (N, 1)
    y = np.where(z[:, 0] > 0, "b", "a")
    m = linear_probe(z, y, z, y)
    assert m["probe_accuracy"] == 1.0
    assert m["probe_auc"] == pytest.approx(1.0)


def test_knn_on_a_train_split_smaller_than_k():
    z = np.array([[0.0], [10.0]])  # (2, 1)
    y = np.array(["a", "b"])
    assert knn_accuracy(z, y, np.array([[0.5], [9.0]]), y, k=5) == 0.5  # k capped at 2: a tie


def test_no_labels_skips_cleanly():
    z, _ = _clusters(10, 0.5, seed=0)
    none = pd.Series([None] * len(z), dtype=object)
    report = label_metrics(z, none, z, none, knn_k=5)
    assert report.metrics == {}
    assert report.composition is None
    assert report.notes == ["no labelled test images: label metrics skipped"]


def test_one_class_skips_every_label_metric_with_a_note():
    z, _ = _clusters(10, 0.5, seed=0)
    one = pd.Series(["NORMAL"] * len(z))
    report = label_metrics(z, one, z, one, knn_k=5)
    assert report.metrics == {}
    assert len(report.notes) == 2
    assert all("1 label(s)" in note for note in report.notes)


def test_unlabelled_rows_and_unseen_test_labels_are_left_out():
    train_z, train_y = _clusters(20, 0.5, seed=0)
    test_z, test_y = _clusters(10, 0.5, seed=1)
    train_y = train_y.where(train_y != "NORMAL", None)  # NORMAL never labelled in train
    test_y = test_y.copy()
    test_y.iloc[:3] = None
    report = label_metrics(train_z, train_y, test_z, test_y, knn_k=3)
    assert any("unseen in train" in note and "NORMAL" in note for note in report.notes)
    assert report.metrics["probe_accuracy"] == 1.0  # scored on the 3 seen classes only
    assert report.composition["total"].sum() == 37  # 40 test rows minus 3 unlabelled


def test_composition_table_counts():
    table = composition_table(np.array([0, 0, 1, 1, 1]), np.array(["a", "b", "b", "b", "a"]))
    assert table.to_dict("list") == {"cluster": [0, 1], "a": [1, 1], "b": [1, 2], "total": [2, 3]}


def _half_bright(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 8, 8) uint8 noise; class "B" images have a brighter left half."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 100, (n, 3, 8, 8)).astype(np.uint8)
    y = np.array(["A", "B"] * (n // 2))
    x[y == "B", :, :, :4] += 120
    return x, y


def test_pixel_pca_gives_j_components_that_carry_the_pixel_signal():
    (xr, yr), (xt, yt) = _half_bright(60, 0), _half_bright(40, 1)
    pr, pt = pixel_pca(xr, xt, 3)
    assert pr.shape == (60, 3) and pt.shape == (40, 3)
    assert linear_probe(pr, yr, pt, yt)["probe_accuracy"] == 1.0


def test_pixel_pca_fits_on_a_sample_of_a_large_train_split(monkeypatch):
    monkeypatch.setattr(latent, "PCA_FIT_MAX", 20)
    (xr, yr), (xt, yt) = _half_bright(200, 0), _half_bright(40, 1)
    pr, pt = pixel_pca(xr, xt, 2)
    assert pr.shape == (200, 2)  # every train image is still projected
    assert linear_probe(pr, yr, pt, yt)["probe_accuracy"] == 1.0


def test_baseline_margin_is_latent_minus_baseline():
    rng = np.random.default_rng(0)
    y_train = pd.Series(["A", "B"] * 50)
    y_test = pd.Series(["A", "B"] * 20)

    def separated(y: pd.Series) -> np.ndarray:
        return np.where((y == "A").to_numpy()[:, None], 3.0, -3.0) + rng.normal(size=(len(y), 2))

    noise_train, noise_test = rng.normal(size=(100, 2)), rng.normal(size=(40, 2))
    report = label_metrics(
        separated(y_train),
        y_train,
        separated(y_test),
        y_test,
        3,
        baseline=(noise_train, noise_test),
    )
    m = report.metrics
    assert m["probe_accuracy"] == 1.0 and m["pca_probe_accuracy"] < 0.8
    assert m["probe_accuracy_vs_pca"] == pytest.approx(1.0 - m["pca_probe_accuracy"])
    assert m["probe_auc_vs_pca"] == pytest.approx(m["probe_auc"] - m["pca_probe_auc"])
