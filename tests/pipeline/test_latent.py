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


def test_features_probe_reads_the_labels_the_bottleneck_lost():
    """The bottleneck diagnostic: features that carry the labels score high while a mu that
    lost them scores at chance; unlabelled rows are left out of both alike."""
    rng = np.random.default_rng(1)
    y_train = pd.Series(["A", "B"] * 50 + [None] * 4)
    y_test = pd.Series(["A", "B"] * 20 + [None] * 2)

    def carrying(y: pd.Series) -> np.ndarray:
        sign = np.where((y == "A").to_numpy()[:, None], 2.0, -2.0)
        return sign + rng.normal(size=(len(y), 8))

    lost_train, lost_test = rng.normal(size=(104, 2)), rng.normal(size=(42, 2))
    report = label_metrics(
        lost_train, y_train, lost_test, y_test, 3, features=(carrying(y_train), carrying(y_test))
    )
    m = report.metrics
    assert m["features_probe_accuracy"] == 1.0 and m["features_probe_auc"] == 1.0
    assert m["probe_accuracy"] < 0.75
    assert (
        "features_probe_accuracy"
        not in label_metrics(lost_train, y_train, lost_test, y_test, 3).metrics
    )


# ----------------------------------------------------------------------------- intervals


def test_bootstrap_interval_of_a_mean_matches_scipy():
    """A percentile interval of the mean: the same as scipy.stats.bootstrap's (its own draws)."""
    from scipy.stats import bootstrap

    x = np.random.default_rng(0).exponential(1.0, 200)
    low, high = latent.bootstrap_ci(lambda rows: np.array([x[rows].mean()]), len(x), 4000, seed=1)
    ref = bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=2)
    assert low[0] == pytest.approx(ref.confidence_interval.low, abs=0.02)
    assert high[0] == pytest.approx(ref.confidence_interval.high, abs=0.02)
    assert low[0] < x.mean() < high[0]


def test_bootstrap_interval_narrows_as_the_test_split_grows():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 200, 800):
        x = rng.normal(0.0, 1.0, n)
        low, high = latent.bootstrap_ci(lambda rows, x=x: np.array([x[rows].mean()]), n, 500)
        widths.append(high[0] - low[0])
    # the width of a mean's interval shrinks as 1/sqrt(n): about half for 4x the images
    assert widths[0] > 1.6 * widths[1] > 1.6**2 * widths[2]


def test_margin_interval_contains_the_margin_and_excludes_zero_when_clear():
    """A latent that reads the labels, a baseline that guesses: the margin is clearly > 0."""
    train_z, train_y = _clusters(40, 0.5, seed=0)
    test_z, test_y = _clusters(40, 0.5, seed=1)
    noise = np.random.default_rng(2)
    baseline = (noise.standard_normal((160, 3)), noise.standard_normal((160, 3)))
    m = label_metrics(
        train_z, train_y, test_z, test_y, knn_k=5, baseline=baseline, bootstrap=300
    ).metrics
    for key in ("accuracy", "auc"):
        low, high = m[f"probe_{key}_vs_pca_ci_low"], m[f"probe_{key}_vs_pca_ci_high"]
        assert 0 < low <= m[f"probe_{key}_vs_pca"] <= high


@pytest.mark.parametrize("n_classes", [2, 4])
def test_auc_matches_sklearn_with_ties(n_classes):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(n_classes)
    classes = CLASSES[:n_classes]
    y = rng.choice(classes, 300)
    proba = rng.dirichlet(np.ones(n_classes), 300).round(1)  # rounded: many ties
    proba /= proba.sum(1, keepdims=True)  # rows sum to 1 again (rows alike stay tied)
    pred = classes[proba.argmax(1)]
    if n_classes == 2:
        want = roc_auc_score(y == classes[1], proba[:, 1])
    else:
        want = roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=classes)
    assert latent.probe_scores(y, pred, proba, classes)["probe_auc"] == pytest.approx(
        want, abs=1e-12
    )


def test_auc_of_a_resample_missing_a_class_is_nan_not_an_error():
    classes = np.array(["a", "b", "c"])
    proba = np.full((4, 3), 1 / 3)
    scores = latent.probe_scores(
        np.array(["a", "b", "a", "b"]), classes[[0, 1, 0, 1]], proba, classes
    )
    assert scores["probe_accuracy"] == 1.0 and np.isnan(scores["probe_auc"])


def test_probe_json_predicts_as_sklearn():
    for n_classes in (2, 4):
        train_z, train_y = _clusters(30, 3.0, seed=0)
        keep = train_y.isin(CLASSES[:n_classes]).to_numpy()
        clf = latent.fit_probe(train_z[keep], train_y[keep].to_numpy())
        test_z, _ = _clusters(10, 3.0, seed=1)
        pred, p = latent.probe_predict(latent.probe_json(clf), test_z)
        np.testing.assert_array_equal(pred, clf.predict(test_z))
        np.testing.assert_allclose(p, clf.predict_proba(test_z).max(1), rtol=1e-9)


# ----------------------------------------------------------------------------- spectrum


def _spectrum_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """mu (N,6) whose direction (1, 1, 0, ...) / sqrt 2 carries a severity in [0, 1]."""
    rng = np.random.default_rng(seed)
    severity = rng.uniform(0, 1, n)
    z = rng.standard_normal((n, 6)) * 0.3
    z[:, :2] += 3.0 * severity[:, None]
    return z, severity


def test_spectrum_finds_the_direction_and_its_rank_correlation():
    train_z, train_t = _spectrum_data(300, 0)
    test_z, test_t = _spectrum_data(100, 1)
    rng = np.random.default_rng(3)
    baseline = (rng.standard_normal((300, 4)), rng.standard_normal((100, 4)))  # carries nothing
    spectrum, notes = latent.spectrum_report(
        train_z, train_t, test_z, test_t, "severity", baseline, bootstrap=300
    )
    assert notes == []
    true = np.array([1, 1, 0, 0, 0, 0]) / np.sqrt(2)
    assert spectrum.direction @ true > 0.95 and np.linalg.norm(spectrum.direction) == pytest.approx(
        1
    )
    # the reported rank correlation is the one of the fitted values (independent reference:
    # pandas' Spearman, a rank-then-Pearson of its own)
    fitted = test_z @ spectrum.direction * spectrum.slope + spectrum.intercept
    ref = pd.Series(fitted).corr(pd.Series(test_t), method="spearman")
    m = spectrum.metrics
    assert m["spectrum_spearman"] == pytest.approx(ref, abs=1e-12)
    assert m["spectrum_spearman"] > 0.9 and abs(m["pca_spectrum_spearman"]) < 0.3
    assert 0 < m["spectrum_spearman_vs_pca_ci_low"] <= m["spectrum_spearman_vs_pca"]
    assert m["spectrum_spearman_vs_pca"] <= m["spectrum_spearman_vs_pca_ci_high"]


def test_spearman_on_known_ranks():
    # ranks 1..5 against 5,6,7,8,7 -> ranks 1,2,3.5,5,3.5: rho = 0.8207826816681233 (scipy)
    from scipy.stats import spearmanr

    a, b = np.arange(5.0), np.array([5.0, 6.0, 7.0, 8.0, 7.0])
    assert latent.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert latent.spearman(a, b) == pytest.approx(0.8207826816681233)
    assert np.isnan(latent.spearman(a, np.ones(5)))


@pytest.mark.parametrize(
    ("labels", "numeric", "order", "want_name", "want"),
    [
        (["0", "2", "4", None], {}, None, "label (ordinal grade)", [0, 2, 4, np.nan]),
        (["a", "b", "c", "a"], {}, ("c", "b"), "label order c < b", [np.nan, 1, 0, np.nan]),
        (["a", "b", "c", "a"], {"severity": [0.1, 0.2, np.nan, 0.4]}, None, "severity",
         [0.1, 0.2, np.nan, 0.4]),
        (["a", "b", "c", "a"], {}, None, None, None),
        (["0", "1", "0", "1"], {}, None, None, None),  # two grades: not a spectrum
    ],
)  # fmt: skip
def test_spectrum_target(labels, numeric, order, want_name, want):
    found = latent.spectrum_target(pd.Series(labels), pd.DataFrame(numeric), order)
    if want is None:
        assert found is None
        return
    values, name = found
    assert name == want_name
    np.testing.assert_array_equal(values, np.array(want, dtype=float))


def test_spectrum_with_too_few_levels_is_skipped_with_a_note():
    z = np.random.default_rng(0).standard_normal((20, 3))
    t = np.array([0.0, 1.0] * 10)
    spectrum, notes = latent.spectrum_report(z, t, z, t, "grade")
    assert spectrum is None and "too few distinct values" in notes[0]
