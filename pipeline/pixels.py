"""Training pixels from decoded images: the one preparation every stage uses.

ingest (from its own decode, :mod:`pipeline.pixel_cache`), preprocess (local and Ray Data
engines) and ``retina-vae encode`` all make an image's training pixels here, so the same file
gives the same bytes everywhere:

- fundus: cropped to the circular field of view (dark border thresholded away), padded to the
  target aspect, resized; optionally illumination-normalised; RGB, 3 channels;
- OCT: grayscale, padded or cropped to the target aspect (``preprocess.oct_aspect``), resized;
  1 channel;
- rows of an .npz source (MedMNIST) are already cropped: no field-of-view crop.

JPEGs are decoded at the smallest DCT scale that still covers the target size
(:func:`draft_size`, Pillow ``draft``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from skimage import exposure

from pipeline import readers

FOV_THRESHOLD = 0.08  # share of the brightest channel's maximum that counts as "inside the field"


def crop_fov(img: np.ndarray) -> np.ndarray:
    """Crop an (H, W, 3) fundus photo to the bounding box of its bright circular field."""
    mask = fov_mask(img)  # (H, W)
    rows = np.flatnonzero(np.count_nonzero(mask, axis=1) > 0.01 * mask.shape[1])
    cols = np.flatnonzero(np.count_nonzero(mask, axis=0) > 0.01 * mask.shape[0])
    if len(rows) < 8 or len(cols) < 8:  # no clear field (dark or odd image): keep it whole
        return img
    return img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def fit_aspect(img: np.ndarray, height: int, width: int, mode: str) -> np.ndarray:
    """Pad (black, centred) or centre-crop ``img`` (H, W[, 3]) to the aspect ``width/height``."""
    h, w = img.shape[:2]
    if h * width == w * height:
        return img
    too_wide = w * height > h * width
    if mode == "crop":
        if too_wide:
            new_w = max(1, round(h * width / height))
            x0 = (w - new_w) // 2
            return img[:, x0 : x0 + new_w]
        new_h = max(1, round(w * height / width))
        y0 = (h - new_h) // 2
        return img[y0 : y0 + new_h]
    new_h, new_w = (round(w * height / width), w) if too_wide else (h, round(h * width / height))
    out = np.zeros((new_h, new_w, *img.shape[2:]), np.uint8)
    y0, x0 = (new_h - h) // 2, (new_w - w) // 2
    out[y0 : y0 + h, x0 : x0 + w] = img
    return out


def fov_mask(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) fundus -> (H, W) bool: inside the bright field of view."""
    red = img[..., 0]  # red is the brightest channel of a fundus, up to the field's rim
    return red > max(8, FOV_THRESHOLD * int(red.max()))


def graham_normalise(img: np.ndarray) -> np.ndarray:
    """Subtract the local mean colour (Graham 2015): (H, W, 3) uint8 -> (H, W, 3) uint8.

    out = 128 + 4 (I - G * I), G a Gaussian of sigma = width / 30, averaged inside the field of
    view only (G*(I M) / G*M), so the black border does not bleed a bright ring into the rim.
    Camera colour, exposure and vignetting go; vessels, lesions and the disc stay. Outside the
    field stays black.
    """
    mask = fov_mask(img)
    sigma = max(1.0, img.shape[1] / 30.0)
    m = mask.astype(np.float32)
    weight = gaussian_filter(m, sigma)  # (H, W)
    local = gaussian_filter(img.astype(np.float32) * m[..., None], (sigma, sigma, 0))
    local /= np.maximum(weight, 1e-6)[..., None]  # (H, W, 3) local mean colour inside the field
    out = np.clip(128.0 + 4.0 * (img - local), 0, 255)
    return np.where(mask[..., None], out, 0).astype(np.uint8)


def clahe_normalise(img: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of luminance: (H, W, 3) uint8 -> same.

    scikit-image equalises the HSV value channel and keeps hue and saturation.
    """
    out = exposure.equalize_adapthist(img, clip_limit=0.01)  # float in [0, 1]
    return np.round(out * 255.0).astype(np.uint8)


ILLUMINATION = {"none": None, "graham": graham_normalise, "clahe": clahe_normalise}


def prepare_pixels(
    px: np.ndarray,
    modality: str,
    image_size: tuple[int, int],
    oct_aspect: str,
    fov_crop: bool = True,
    illumination: str = "none",
) -> np.ndarray:
    """One decoded frame (H, W) or (H, W, 3) uint8 -> training pixels (C, H', W') uint8.

    ``fov_crop=False`` keeps a fundus image's framing (arrays from an .npz are already cropped).
    ``illumination`` (fundus only) normalises the resized photo: none, graham or clahe.
    """
    height, width = image_size
    if modality == "fundus":
        rgb = px if px.ndim == 3 else np.repeat(px[..., None], 3, axis=2)  # (H, W) -> (H, W, 3)
        img = fit_aspect(crop_fov(rgb) if fov_crop else rgb, height, width, "pad")
    else:
        gray = px if px.ndim == 2 else np.asarray(Image.fromarray(px).convert("L"))
        img = fit_aspect(gray, height, width, oct_aspect)
    out = np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.LANCZOS))
    if modality == "fundus" and ILLUMINATION[illumination] is not None:
        out = ILLUMINATION[illumination](out)
    return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)  # (H, W[, 3]) -> (C, H, W)


def prepare_npz_row(
    px: np.ndarray,
    modality: str,
    image_size: tuple[int, int],
    oct_aspect: str,
    illumination: str = "none",
) -> np.ndarray:
    """One row of an .npz array, (H, W), (H, W, 1) or (H, W, 3) uint8 -> (C, H', W') uint8:
    already cropped, so no field-of-view crop."""
    return prepare_pixels(px.squeeze(), modality, image_size, oct_aspect, False, illumination)


def draft_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """JPEG draft bound (width, height): every side stays >= the target's larger side."""
    side = max(image_size)
    return (side, side)


def prepare_file(
    path: str | Path,
    modality: str,
    image_size: tuple[int, int],
    oct_aspect: str,
    oct_frames: str,
    *,
    min_size: int = 1,
    max_pixels: int | None = None,
    illumination: str = "none",
    allow_burned_in: bool = False,
) -> list[np.ndarray]:
    """Decode any accepted image file exactly as the pipeline does -> list of (C, H, W) uint8.

    One array per frame kept (``oct_frames`` "all" or "central" for a multi-frame OCT file).
    Raises :class:`~pipeline.errors.UserError` (a ``BadImage``) with a one-line reason.
    """
    central = modality == "oct" and oct_frames == "central"
    d = readers.read_image(
        path,
        min_size=min_size,
        max_pixels=max_pixels,
        draft=draft_size(image_size),
        oct_central=central,
        allow_burned_in=allow_burned_in,
    )
    return [
        prepare_pixels(px, modality, image_size, oct_aspect, illumination=illumination)
        for _, px in d.frames
    ]


def prepare_frames(task: tuple) -> list[np.ndarray] | str:
    """Worker: the listed frames of one file -> (C, H, W) uint8 arrays, or the one-line reason
    it failed. ``task``: (path, frames, modality, image_size, oct_aspect, illumination,
    allow_burned_in)."""
    path, frames, modality, image_size, oct_aspect, illumination, burned_in = task
    try:
        d = readers.read_image(
            path, draft=draft_size(image_size), frames=frames, allow_burned_in=burned_in
        )
    except readers.BadImage as exc:
        return str(exc)
    return [
        prepare_pixels(px, modality, image_size, oct_aspect, illumination=illumination)
        for _, px in d.frames
    ]
