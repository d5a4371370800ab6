"""Training pixels (pipeline.pixels): field-of-view crop, aspect, illumination, whole files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline import pixels
from pipeline.errors import UserError
from tests.pipeline.dicom_factory import gradient


def _fundus_like(h: int, w: int, radius: float) -> np.ndarray:
    """A bright disc (the field of view) centred in a black frame: (H, W, 3) uint8."""
    yy, xx = np.mgrid[0:h, 0:w]
    inside = np.hypot(yy - h / 2, xx - w / 2) < radius
    img = np.zeros((h, w, 3), np.uint8)
    img[inside] = (200, 90, 40)
    return img


def test_fundus_cropped_to_field_and_squared():
    img = _fundus_like(300, 450, 100)  # wide photo, field 200 px across
    out = pixels.prepare_pixels(img, "fundus", (40, 40), "pad")
    assert out.shape == (3, 40, 40) and out.dtype == np.uint8
    assert out[0, 20, 1:39].min() > 150 and out[0, 1:39, 20].min() > 150  # field fills the frame
    assert out[:, :2, :2].max() < 30  # corners stay black (outside the circle)


@pytest.mark.parametrize("mode,shape", [("pad", (60, 60)), ("crop", (30, 30))])
def test_oct_aspect(mode, shape):
    img = np.full((30, 60), 200, np.uint8)
    assert pixels.fit_aspect(img, 32, 32, mode).shape == shape
    out = pixels.prepare_pixels(img, "oct", (32, 32), mode)
    assert out.shape == (1, 32, 32)
    if mode == "pad":  # black bands above and below the scan
        assert out[0, 0].max() < 10 and out[0, 16].min() > 190
    else:
        assert out.min() > 190


def test_prepare_file_matches_pipeline_and_rejects_bad(tmp_path):
    path = tmp_path / "scan.jpeg"
    Image.fromarray(gradient(400, 500)).save(path, quality=90)
    out = pixels.prepare_file(path, "oct", (32, 32), "crop", "all")
    assert len(out) == 1 and out[0].shape == (1, 32, 32) and out[0].dtype == np.uint8
    fundus = pixels.prepare_file(path, "fundus", (28, 28), "pad", "all")
    assert fundus[0].shape == (3, 28, 28)
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="undecodable"):
        pixels.prepare_file(bad, "oct", (32, 32), "crop", "all")


def _lit_fundus(
    size: int, tint: tuple[float, float, float], gradient_strength: float
) -> np.ndarray:
    """A disc with a dark vessel line, under a colour tint and a left-to-right light gradient."""
    yy, xx = np.mgrid[0:size, 0:size]
    inside = np.hypot(yy - size / 2, xx - size / 2) < size * 0.45
    light = 1.0 - gradient_strength * xx / size  # (H, W) vignetting-like falloff
    img = np.zeros((size, size, 3), np.float32)
    for c, t in enumerate(tint):
        img[..., c] = 180.0 * t * light
    img[size // 2 - 1 : size // 2 + 1, size // 4 : 3 * size // 4] *= 0.5  # the "vessel"
    img[~inside] = 0
    return img.astype(np.uint8)


def test_graham_evens_out_camera_colour_and_exposure():
    """Two photos of the same retina under different tint and lighting come out closer."""
    method = "graham"
    a = _lit_fundus(96, (1.0, 0.5, 0.25), 0.0)
    b = _lit_fundus(96, (0.7, 0.45, 0.35), 0.6)
    raw = [pixels.prepare_pixels(i, "fundus", (64, 64), "pad").astype(float) for i in (a, b)]
    out = [
        pixels.prepare_pixels(i, "fundus", (64, 64), "pad", illumination=method).astype(float)
        for i in (a, b)
    ]
    assert out[0].shape == (3, 64, 64)
    assert np.abs(out[0] - out[1]).mean() < 0.6 * np.abs(raw[0] - raw[1]).mean()
    if method == "graham":  # a flat field becomes mid-grey; the vessel stays darker than it
        centre = out[1][:, 24:40, 24:40]
        assert abs(np.median(centre) - 128) < 10
        assert out[1][:, 32, 24:40].mean() < out[1][:, 26, 24:40].mean() - 8
        assert out[1][:, :2, :2].max() == 0  # outside the field stays black


def test_clahe_evens_out_a_light_falloff():
    """CLAHE equalises luminance locally: the dim side of the field comes up towards the bright."""
    img = _lit_fundus(96, (1.0, 0.5, 0.25), 0.6).astype(float)
    texture = 1.0 + 0.15 * np.random.default_rng(0).standard_normal(img.shape[:2])  # (H, W)
    img = np.clip(img * texture[..., None], 0, 255).astype(np.uint8)  # real photos have texture

    def side_ratio(out: np.ndarray) -> float:
        lum = out.astype(float).mean(0)  # (H, W)
        return lum[24:40, 44:52].mean() / lum[24:40, 12:20].mean()  # right (dim) / left

    raw = pixels.prepare_pixels(img, "fundus", (64, 64), "pad")
    out = pixels.prepare_pixels(img, "fundus", (64, 64), "pad", illumination="clahe")
    assert side_ratio(raw) < 0.75
    assert side_ratio(out) > side_ratio(raw) + 0.1


def test_illumination_is_ignored_for_oct():
    img = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    plain = pixels.prepare_pixels(img, "oct", (32, 32), "pad")
    np.testing.assert_array_equal(
        pixels.prepare_pixels(img, "oct", (32, 32), "pad", illumination="graham"), plain
    )


# EXIF orientation -> the Pillow transpose that stores an upright picture so that a viewer
# applying that orientation shows it upright (EXIF 2.32 4.6.4 A; 5 and 7 mirrored)
STORE_FOR = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # viewed after turning 90 degrees clockwise
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", STORE_FOR)
@pytest.mark.parametrize("modality", ["fundus", "oct"])
def test_training_pixels_are_of_the_upright_picture(tmp_path, orientation, modality):
    """What preprocess (both engines) and ``retina-vae encode`` make of a photo stored turned
    or mirrored with its EXIF orientation equals what they make of the upright photo."""
    upright = Image.fromarray(_fundus_like(60, 90, 28) + gradient(60, 90, rgb=True) // 4)
    upright.save(tmp_path / "upright.png")
    op = STORE_FOR[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    (upright if op is None else upright.transpose(op)).save(tmp_path / "stored.png", exif=exif)
    args = (modality, (24, 40), "crop", "all")
    (want,) = pixels.prepare_file(tmp_path / "upright.png", *args)
    (got,) = pixels.prepare_file(tmp_path / "stored.png", *args)
    assert np.array_equal(got, want)
