"""Synthetic images: shapes, determinism, and class signatures that survive 64x64."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from pipeline import synth


def _small(img: np.ndarray) -> np.ndarray:
    img = Image.fromarray(img).resize((32, 32), Image.Resampling.LANCZOS)
    return np.asarray(img, np.float32).ravel() / 255


def _linear_probe_accuracy(draw, classes, n: int) -> float:
    """Logistic regression on 32x32 pixels: fit on half of n images per class, score the rest."""
    rng = np.random.default_rng(1)
    x = np.array([_small(draw(rng, c, rng.uniform())) for c in classes for _ in range(n)])
    y = np.repeat(np.arange(len(classes)), n)
    order = rng.permutation(len(y))
    train, test = order[: len(y) // 2], order[len(y) // 2 :]
    probe = LogisticRegression(max_iter=2000, C=0.1).fit(x[train], y[train])
    return float(probe.score(x[test], y[test]))


def test_oct_shapes_and_determinism():
    a = synth.oct_bscan(np.random.default_rng(3), "DME", 0.5, 60, 80)
    b = synth.oct_bscan(np.random.default_rng(3), "DME", 0.5, 60, 80)
    assert a.shape == (60, 80) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert a.std() > 10  # not blank
    with pytest.raises(ValueError, match="unknown OCT class"):
        synth.oct_bscan(np.random.default_rng(0), "normal", 0.5, 60, 80)


def test_fundus_black_outside_field_of_view():
    img = synth.fundus_photo(np.random.default_rng(0), "glaucoma", 0.8, 128, "L")
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert img[:4, :4].max() == 0 and img[-4:, -4:].max() == 0  # corners outside the circle
    centre = img[48:80, 48:80].astype(float)
    assert centre[..., 0].mean() > centre[..., 2].mean() + 30  # orange-red fundus
    big = synth.fundus_photo(np.random.default_rng(0), "normal", 0.1, 1100)
    assert big.shape == (1100, 1100, 3)


def test_oct_classes_separable_at_64px():
    acc = _linear_probe_accuracy(
        lambda r, c, s: synth.oct_bscan(r, c, s, 124, 128), synth.OCT_CLASSES, n=40
    )
    assert acc >= 0.8  # chance is 0.25; a VAE's latents do better than raw pixels


def test_fundus_classes_separable_at_64px():
    acc = _linear_probe_accuracy(
        lambda r, c, s: synth.fundus_photo(r, c, s, 64), synth.FUNDUS_CLASSES, n=24
    )
    assert acc >= 0.5  # chance is 0.33
