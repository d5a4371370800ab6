"""``retina-vae encode``: latent means of new images with a trained model.

    retina-vae encode --model models/vae.pt [--params params.yaml] [--out latents.csv] PATH...

PATHs are image files or folders (searched recursively, skipping the sidecars ingest skips) in
any format ingest accepts: JPEG, PNG, TIFF, BMP, DICOM (multi-frame too) and MedMNIST-style
``.npz`` files. Each image is preprocessed exactly as for training (``ingest.modality``,
``preprocess.oct_aspect``, ``ingest.oct_frames``; the size comes from the checkpoint). Writes
one row per image or frame: ``path, frame, mu_0..mu_{J-1}`` (CSV, or parquet by suffix).
``frame`` is the index among the frames kept (the frame number with ``oct_frames: all``; the
row of an ``.npz`` array, whose path is written ``file.npz:test_images``). Files that cannot be
read are listed one per line; the good ones are still written, and the command then exits 1.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import readers
from pipeline.errors import UserError
from pipeline.io import write_table
from pipeline.model_io import encode_images, load_model
from pipeline.params import Params
from pipeline.pixels import prepare_file, prepare_npz_row
from pipeline.processed import CHANNELS
from pipeline.stage import run_stage

log = logging.getLogger("retina_vae.encode")

OUT_SUFFIXES = (".csv", ".tsv", ".parquet")


def expand(paths: list[str]) -> list[Path]:
    """Files named, plus every candidate file under the folders named (sorted, recursive)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and readers.is_candidate(p))
            if not found:
                log.warning("%s: no image files in this folder", path)
            files += found
        else:
            files.append(path)  # a missing file is reported when read, with the others
    return files


def npz_frames(
    path: Path, modality: str, size: tuple[int, int], oct_aspect: str, illumination: str = "none"
) -> Iterator[tuple[str, int, np.ndarray]]:
    """Every row of each ``*_images`` array of a MedMNIST-style .npz -> (name, row, (C,H,W)),
    prepared exactly as preprocess prepares an .npz row (same aspect rule and illumination)."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"not a readable .npz file ({type(exc).__name__})") from None
    with data:
        keys = [k for k in data.files if k.endswith("_images")]
        if not keys:
            raise UserError("no *_images arrays in this .npz")
        for key in keys:
            arr = data[key]
            if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
                raise UserError(f"{key} must be uint8 (N, H, W[, C]), got {arr.dtype} {arr.shape}")
            for i in range(len(arr)):
                yield (
                    f"{path}:{key}",
                    i,
                    prepare_npz_row(arr[i], modality, size, oct_aspect, illumination),
                )


def frames(path: Path, params: Params, size: tuple[int, int]) -> list[tuple[str, int, np.ndarray]]:
    """All (path, frame, (C,H,W) uint8) of one input file, preprocessed; UserError if unusable."""
    if not path.exists():
        raise UserError("file not found")
    modality = params.ingest.modality
    if path.suffix.lower() == ".npz":
        pp = params.preprocess
        return list(npz_frames(path, modality, size, pp.oct_aspect, pp.illumination))
    arrays = prepare_file(
        path,
        modality,
        size,
        params.preprocess.oct_aspect,
        params.ingest.oct_frames,
        min_size=params.ingest.min_size,
        max_pixels=params.ingest.max_pixels,
        illumination=params.preprocess.illumination,
    )
    return [(str(path), i, arr) for i, arr in enumerate(arrays)]


def encode(params: Params, model_path: str, inputs: list[str], out: Path) -> tuple[int, list[str]]:
    """Encode every input; write ``out``; return (rows written, one-line failures)."""
    if out.suffix not in OUT_SUFFIXES:
        raise UserError(f"{out}: output must end in {', '.join(OUT_SUFFIXES)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(model_path, device)
    cfg = model.config
    modality = params.ingest.modality
    if CHANNELS[modality] != cfg.in_channels:
        raise UserError(
            f"ingest.modality: {modality} images have {CHANNELS[modality]} channel(s) but "
            f"{model_path} was trained on {cfg.in_channels}"
        )
    rows: list[tuple[str, int]] = []
    images: list[np.ndarray] = []
    failures: list[str] = []
    files = expand(inputs)
    for path in files:
        try:
            found = frames(path, params, (cfg.height, cfg.width))
        except UserError as exc:
            failures.append(f"{path}: {exc}")
            log.error("%s: %s", path, exc)
            continue
        rows += [(name, frame) for name, frame, _ in found]
        images += [arr for _, _, arr in found]
    if not images:
        raise UserError(
            f"no image could be encoded from {len(files)} file(s) ({', '.join(inputs)})"
        )
    mu, _ = encode_images(model, np.stack(images), params.evaluate.batch_size, device)  # (N,J)
    table = pd.DataFrame(rows, columns=["path", "frame"])
    table = pd.concat(
        [table, pd.DataFrame(mu, columns=[f"mu_{j}" for j in range(cfg.latent_dim)])], axis=1
    )
    write_table(out, table)
    return len(table), failures


def _add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    parser.add_argument("--model", help="trained checkpoint (default: paths.model)")
    parser.add_argument(
        "--out", default="latents.csv", help="output .csv/.tsv/.parquet (default: latents.csv)"
    )


def _body(params: Params, args: argparse.Namespace) -> None:
    out = Path(args.out)
    written, failures = encode(params, args.model or params.paths.model, args.paths, out)
    log.info("wrote %d latent rows to %s", written, out)
    if failures:
        raise UserError(
            f"{len(failures)} file(s) could not be encoded (listed above); the rest are in {out}"
        )


def main(argv: list[str] | None = None) -> int:
    return run_stage("encode", argv, _body, _add_args, description=__doc__.splitlines()[0])
