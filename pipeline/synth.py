"""Synthetic retinal images for the demo collection and benchmarks (numpy + Pillow only).

Two drawers, each ``f(rng, label, severity, size) -> uint8 array``:

- :func:`oct_bscan`: a layered retina in cross-section (nerve fibre layer, plexiform and
  nuclear layers, bright RPE band, choroid, foveal pit) with multiplicative speckle.
  NORMAL; DRUSEN (dome-shaped RPE elevations); CNV (an elevated hyper-reflective lesion with a
  broken RPE and subretinal fluid); DME (thickened retina full of dark fluid cysts).
- :func:`fundus_photo`: an orange-red fundus in a black circular field of view with optic disc,
  cup, macula and branching vessels. normal; diabetic_retinopathy (microaneurysms,
  haemorrhages, hard exudates); glaucoma (large pale cup).

Each disease signature is large-scale on purpose: it must survive downsampling to 64x64 so a
VAE's latent space can separate the classes, while position, tilt, thickness, brightness and
speckle vary within a class. ``severity`` in [0, 1] scales the lesions continuously.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OCT_CLASSES = ("NORMAL", "DRUSEN", "CNV", "DME")
FUNDUS_CLASSES = ("normal", "diabetic_retinopathy", "glaucoma")
NORMAL_CLASSES = ("NORMAL", "normal")  # the classes whose drawing ignores severity

# Reflectivity by normalised depth between the inner limiting membrane (0) and the RPE (1):
# bright nerve fibre layer, alternating plexiform (bright) and nuclear (dark) layers.
_LAYER_DEPTH = np.array([0.0, 0.08, 0.14, 0.24, 0.34, 0.44, 0.52, 0.62, 0.86, 0.93, 1.0])
_LAYER_VALUE = np.array([0.85, 0.70, 0.40, 0.55, 0.30, 0.50, 0.22, 0.18, 0.20, 0.45, 0.55])


def _ellipse_mask(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float):
    """Boolean mask of an axis-aligned ellipse on the (H, W) grids ``yy, xx``."""
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def oct_bscan(rng: np.random.Generator, label: str, severity: float, height: int, width: int):
    """One OCT B-scan of class ``label`` (one of :data:`OCT_CLASSES`) -> (H, W) uint8."""
    if label not in OCT_CLASSES:
        raise ValueError(f"unknown OCT class {label!r}")
    h, w = height, width
    x = np.arange(w, dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Retinal geometry per column: a tilted, slightly curved RPE and the ILM above it.
    tilt = rng.uniform(-0.06, 0.06) * h / w
    curve = rng.uniform(-0.05, 0.15) * h
    u = (x - w / 2) / (w / 2)  # -1..1 across the scan
    rpe = h * rng.uniform(0.6, 0.66) + tilt * (x - w / 2) - curve * (1 - u**2) * 0.3
    thickness = h * rng.uniform(0.22, 0.28)
    fovea_x = w * rng.uniform(0.45, 0.55)
    pit = np.exp(-(((x - fovea_x) / (w * rng.uniform(0.07, 0.1))) ** 2))
    pit_depth = rng.uniform(0.5, 0.7)
    elevation = np.zeros(w, np.float32)  # RPE raised by drusen / lesions (pixels)

    if label == "DME":
        thickness *= 1.45 + 0.6 * severity
        pit_depth *= 0.15  # the foveal pit fills with fluid
    if label == "DRUSEN":
        for _ in range(int(rng.integers(2, 4) + round(2 * severity))):
            cx = fovea_x + rng.uniform(-0.3, 0.3) * w  # drusen cluster around the macula
            width_px = w * rng.uniform(0.05, 0.09)
            elevation += h * (0.05 + 0.07 * severity) * np.exp(-(((x - cx) / width_px) ** 2))
    ilm = rpe - elevation - thickness * (1 - pit_depth * pit)
    rpe_top = rpe - elevation

    depth = (yy - ilm[None, :]) / np.maximum(rpe_top - ilm, 1.0)[None, :]  # (H, W)
    img = np.interp(depth, _LAYER_DEPTH, _LAYER_VALUE).astype(np.float32)
    img[depth < 0] = 0.04  # vitreous
    band = h * 0.03
    below = yy - rpe_top[None, :]
    img = np.where(below >= 0, 1.0 * np.exp(-np.maximum(below - band, 0) / (h * 0.09)), img)
    img = np.where((below >= 0) & (below < band), 1.0, img)  # bright RPE band
    choroid = (below >= band) & (yy < rpe[None, :] + band)
    img[choroid & (elevation[None, :] > 1)] = 0.55  # drusen material under the raised RPE

    if label == "CNV":
        cx = fovea_x + w * rng.uniform(-0.08, 0.08)  # subfoveal lesion
        rx = w * (0.14 + 0.08 * severity)
        ry = h * (0.06 + 0.06 * severity)
        cy = float(np.interp(cx, x, rpe_top)) - 0.6 * ry
        lesion = _ellipse_mask(yy, xx, cy, cx, ry, rx)
        fluid = _ellipse_mask(yy, xx, cy - ry * 1.1, cx, ry * 0.7, rx * 0.8) & ~lesion
        img[fluid & (depth > 0.3)] = 0.05  # subretinal fluid above the lesion
        img[lesion] = 0.95
        gap = (np.abs(xx - cx) < rx * 0.5) & (below >= 0) & (below < band * 2)
        img[gap] = 0.25  # disrupted RPE under the lesion
    if label == "DME":
        for _ in range(int(rng.integers(3, 5) + round(4 * severity))):
            cx = fovea_x + rng.uniform(-0.25, 0.25) * w  # macular oedema
            d = rng.uniform(0.3, 0.75)
            cy = float(np.interp(cx, x, ilm + d * (rpe_top - ilm)))
            r = h * rng.uniform(0.035, 0.06 + 0.04 * severity)
            img[_ellipse_mask(yy, xx, cy, cx, r, r * rng.uniform(1.0, 1.6))] = 0.03

    # Speckle (multiplicative, gamma-distributed) and instrument gain.
    img *= rng.gamma(4.0, 0.25, size=img.shape).astype(np.float32)
    img = img * rng.uniform(0.75, 1.05) + rng.uniform(0.0, 0.05)
    return (np.clip(img, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _vessels(draw: ImageDraw.ImageDraw, rng: np.random.Generator, disc, size: int) -> None:
    """Draw branching vessel arcs leaving the disc (value 255 on an 'L' mask)."""
    dx, dy = disc
    for k in range(8):
        angle = rng.uniform(0, 2 * np.pi) if k >= 4 else (k * np.pi / 2 + rng.uniform(-0.4, 0.4))
        bend = rng.uniform(-1.2, 1.2)
        length = size * rng.uniform(0.35, 0.6)
        width = max(1, round(size * rng.uniform(0.006, 0.012)))
        t = np.linspace(0, 1, 24)
        a = angle + bend * t
        px = dx + np.cumsum(np.cos(a)) * length / len(t)
        py = dy + np.cumsum(np.sin(a)) * length / len(t)
        draw.line(list(zip(px.tolist(), py.tolist(), strict=True)), fill=255, width=width)
        j = int(rng.integers(8, 16))  # one side branch, thinner
        b = a[j] + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0) + bend * t * 0.5
        qx = px[j] + np.cumsum(np.cos(b)) * length * 0.5 / len(t)
        qy = py[j] + np.cumsum(np.sin(b)) * length * 0.5 / len(t)
        draw.line(
            list(zip(qx.tolist(), qy.tolist(), strict=True)), fill=255, width=max(1, width - 1)
        )


def fundus_photo(rng: np.random.Generator, label: str, severity: float, size: int, eye: str = "R"):
    """One colour fundus photo of class ``label`` (:data:`FUNDUS_CLASSES`) -> (S, S, 3) uint8.

    Drawn at up to 1024 px and enlarged with bicubic resampling above that (fine detail of a
    2000 px photo is not needed; drawing cost then stays bounded).
    """
    if label not in FUNDUS_CLASSES:
        raise ValueError(f"unknown fundus class {label!r}")
    s = min(size, 1024)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    c = s / 2 + rng.uniform(-0.02, 0.02, size=2) * s
    fov_r = s * rng.uniform(0.44, 0.48)
    r = np.hypot(yy - c[1], xx - c[0]) / fov_r  # 0 at centre, 1 at the field edge

    # Orange-red background: vignetting plus low-frequency texture.
    base = np.array([0.82, 0.38, 0.16]) * rng.uniform(0.8, 1.1)
    noise = rng.normal(0, 1, (8, 8)).astype(np.float32)
    tex = np.asarray(Image.fromarray(noise).resize((s, s), Image.Resampling.BICUBIC))
    shade = (1 - 0.35 * r**2 + 0.04 * tex)[..., None]  # (S, S, 1)
    img = base[None, None, :] * shade

    side = 1 if eye == "R" else -1  # disc on the nasal side
    disc = (c[0] + side * s * rng.uniform(0.18, 0.24), c[1] + s * rng.uniform(-0.05, 0.05))
    disc_r = s * rng.uniform(0.085, 0.1)
    macula = (c[0] - side * s * 0.08, disc[1] + s * 0.02)
    dm = np.hypot(yy - macula[1], xx - macula[0]) / (s * 0.09)
    img *= (1 - 0.35 * np.exp(-(dm**2)))[..., None]  # darker macula

    mask = Image.new("L", (s, s), 0)
    _vessels(ImageDraw.Draw(mask), rng, disc, s)
    vessels = np.asarray(mask.filter(ImageFilter.GaussianBlur(s / 400)), np.float32)[..., None]
    img = img * (1 - 0.55 * vessels / 255) + np.array([0.45, 0.05, 0.03]) * 0.55 * vessels / 255

    dd = np.hypot(yy - disc[1], xx - disc[0]) / disc_r
    cdr = rng.uniform(0.2, 0.4) if label != "glaucoma" else 0.65 + 0.25 * severity
    disc_col = np.array([0.98, 0.78, 0.5])
    img = np.where((dd < 1)[..., None], disc_col, img)
    img = np.where((dd < cdr)[..., None], np.array([1.0, 0.97, 0.85]), img)  # pale cup

    if label == "diabetic_retinopathy":
        lesions = Image.new("RGB", (s, s), 0)
        draw = ImageDraw.Draw(lesions)
        n_haem = int(10 + 14 * severity)
        n_exu = int(14 + 25 * severity)
        for n, colour, rad in (
            (n_haem, (1, 0, 0), (0.014, 0.03)),
            (n_exu, (0, 1, 0), (0.01, 0.02)),
        ):
            for _ in range(n):
                # posterior pole: lesions cluster around the macula
                ang, rr = rng.uniform(0, 2 * np.pi), fov_r * np.sqrt(rng.uniform(0.0, 0.3))
                px, py = macula[0] + rr * np.cos(ang), macula[1] + rr * np.sin(ang)
                rad_px = s * rng.uniform(*rad)
                fill = tuple(255 * v for v in colour)
                draw.ellipse([px - rad_px, py - rad_px, px + rad_px, py + rad_px], fill=fill)
        for _ in range(int(10 + 20 * severity)):  # microaneurysms: tiny red dots
            px, py = c + rng.uniform(-0.6, 0.6, 2) * fov_r
            rad_px = max(1.0, s * 0.005)
            draw.ellipse([px - rad_px, py - rad_px, px + rad_px, py + rad_px], fill=(255, 0, 0))
        les = np.asarray(lesions, np.float32) / 255
        img = np.where(les[..., :1] > 0.5, np.array([0.35, 0.03, 0.02]), img)  # haemorrhages
        img = np.where(les[..., 1:2] > 0.5, np.array([1.0, 0.95, 0.45]), img)  # hard exudates

    img = img * rng.uniform(0.85, 1.1) + rng.normal(0, 0.015, img.shape)
    img[r > 1] = 0.0  # black outside the circular field of view
    out = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if size != s:
        out = np.asarray(Image.fromarray(out).resize((size, size), Image.Resampling.BICUBIC))
    return out
