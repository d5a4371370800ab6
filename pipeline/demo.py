"""``retina-vae demo``: write the built-in synthetic collection into ``paths.demo``.

Synthetic patients (``demo.patients``), two eyes each, ``demo.images_per_eye`` images per eye,
of modality ``ingest.modality``. Each eye has one class and a severity; its images vary around
it. An eye is written either as DICOM (share ``demo.dicom_fraction``: OCT as one multi-frame
Ophthalmic Tomography volume, fundus as Ophthalmic Photography files; uncompressed, RLE or
JPEG-compressed; fake but realistic names, IDs, birth dates, accession numbers and institutions
in the headers, so de-identification is exercised) or as JPEG/PNG files. ``labels.csv`` lists
``path,label,patient_id,eye,severity`` (a DICOM volume is one row). ``severity`` in [0, 1] is
the lesion size each image was drawn with (0 for a normal eye; an OCT volume: its frames'
mean): a continuous disease spectrum that evaluate's spectrum axis should recover. Seeded: the
same params give byte-identical files whatever ``demo.workers`` is.

When ``ingest.source`` is not ``demo`` the folder holds only a README line (the DVC output must
exist), and nothing is drawn.
"""

from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from pipeline import synth
from pipeline.io import atomic_path
from pipeline.parallel import parallel_map
from pipeline.params import Params
from pipeline.stage import run_stage

log = logging.getLogger("retina_vae.demo")

OCT_TOMOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
OPHTHALMIC_PHOTO_8 = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit
_FIRST = (
    "James",
    "Mary",
    "Ahmed",
    "Li",
    "Sofia",
    "Olga",
    "Kwame",
    "Priya",
    "Lucas",
    "Ana",
    "Hiroshi",
    "Fatima",
    "John",
    "Elena",
    "Mateo",
    "Aisha",
    "Pierre",
    "Ingrid",
    "Ravi",
)
_LAST = (
    "Smith",
    "Garcia",
    "Nguyen",
    "Okafor",
    "Muller",
    "Rossi",
    "Kowalski",
    "Tanaka",
    "Silva",
    "Haddad",
    "Johansson",
    "Patel",
    "Dubois",
    "Ivanova",
    "Brown",
    "Kim",
    "Novak",
    "Costa",
)
_INSTITUTIONS = ("St Lucia Eye Hospital", "Northfield Retina Clinic", "Lakeside Medical Centre")


def _fake_patient(rng: np.random.Generator) -> dict[str, str]:
    year, month, day = rng.integers(1935, 1996), rng.integers(1, 13), rng.integers(1, 29)
    return {
        "name": f"{rng.choice(_LAST)}^{rng.choice(_FIRST)}",
        "id": str(rng.integers(1_000_000, 9_999_999)),
        "birth": f"{year:04d}{month:02d}{day:02d}",
        "accession": f"A{rng.integers(10**7, 10**8)}",
        "institution": str(rng.choice(_INSTITUTIONS)),
        "sex": str(rng.choice(["F", "M"])),
    }


def _jpeg_bytes(img: np.ndarray, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    # 4:2:2 chroma subsampling matches DICOM's YBR_FULL_422 photometric interpretation
    Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=1)
    return buf.getvalue()


def write_dicom(
    path: Path,
    frames: np.ndarray,
    sop_class: str,
    patient: dict,
    eye: str,
    syntax: str,
    uid_key: str,
) -> None:
    """Write (F, H, W) or (F, H, W, 3) uint8 ``frames`` as one DICOM file.

    ``syntax``: "explicit" (uncompressed), "rle" or "jpeg" (baseline, Pillow-encoded and
    encapsulated: pydicom has no JPEG encoder). UIDs derive from ``uid_key`` (deterministic).
    """
    n, h, w = frames.shape[:3]
    rgb = frames.ndim == 4
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[uid_key, "sop"])
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[patient["id"], "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid_key, "series"])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = (
        patient["name"],
        patient["id"],
        patient["birth"],
    )
    ds.PatientSex, ds.AccessionNumber = patient["sex"], patient["accession"]
    ds.InstitutionName, ds.ReferringPhysicianName = patient["institution"], "Demo^Referrer"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = (
        "20240105",
        "101500",
        "1",
        1,
        1,
    )
    ds.Modality = "OPT" if sop_class == OCT_TOMOGRAPHY else "OP"
    ds.Laterality = ds.ImageLaterality = eye
    ds.Rows, ds.Columns, ds.SamplesPerPixel = h, w, 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if n > 1:
        ds.NumberOfFrames = n
    ds.PixelData = frames.tobytes()
    if syntax == "rle":
        # keep the deterministic UID: compress() would draw a random new SOPInstanceUID
        ds.compress(RLELossless, generate_instance_uid=False)
    elif syntax == "jpeg":
        ds.PixelData = encapsulate([_jpeg_bytes(f) for f in frames])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        if rgb:
            ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.save_as(path, enforce_file_format=True)


def _draw(modality: str, rng: np.random.Generator, label: str, severity: float, d, eye: str):
    if modality == "oct":
        return synth.oct_bscan(rng, label, severity, d.oct_height, d.oct_width)
    return synth.fundus_photo(rng, label, severity, d.fundus_size, eye)


def _patient(task: tuple) -> list[dict]:
    """Draw and write one patient's images (runs in a worker); return their labels.csv rows."""
    index, root, modality, d = task
    root = Path(root)
    rng = np.random.default_rng([d.seed, index])  # per patient: independent of worker count
    patient = _fake_patient(rng)
    classes = synth.OCT_CLASSES if modality == "oct" else synth.FUNDUS_CLASSES
    rows = []
    for eye in ("R", "L"):
        label = str(rng.choice(classes))
        severity = rng.uniform(0.0, 1.0)
        as_dicom = rng.random() < d.dicom_fraction
        stem = f"p{index:04d}_{eye}"
        severities, images = [], []
        for _ in range(d.images_per_eye):  # one draw after the other: the seeded stream
            severities.append(float(np.clip(severity + rng.normal(0, 0.1), 0, 1)))
            images.append(_draw(modality, rng, label, severities[-1], d, eye))
        if label in synth.NORMAL_CLASSES:  # a normal eye has no lesion: its severity is 0
            severities = [0.0] * len(severities)
        if as_dicom and modality == "oct":
            syntax = str(rng.choice(["explicit", "rle", "jpeg"]))
            # half the volumes without a suffix, like many clinical exports
            rel = f"dicom/{stem}.dcm" if rng.random() < 0.5 else f"dicom/IM{index:04d}{eye}"
            write_dicom(root / rel, np.stack(images), OCT_TOMOGRAPHY, patient, eye, syntax, rel)
            rels, severities = [rel], [float(np.mean(severities))]  # one row per volume
        elif as_dicom:
            syntax = str(rng.choice(["explicit", "jpeg"]))
            rels = [f"dicom/{stem}_{k:02d}.dcm" for k in range(len(images))]
            for rel, img in zip(rels, images, strict=True):
                write_dicom(root / rel, img[None], OPHTHALMIC_PHOTO_8, patient, eye, syntax, rel)
        else:
            ext = "png" if rng.random() < 0.3 else "jpeg"
            rels = [f"images/{stem}_{k:02d}.{ext}" for k in range(len(images))]
            for rel, img in zip(rels, images, strict=True):
                if ext == "png":
                    Image.fromarray(img).save(root / rel, "PNG")
                else:
                    Image.fromarray(img).save(root / rel, "JPEG", quality=92)
        rows += [
            {"path": r, "label": label, "patient_id": patient["id"], "eye": eye, "severity": sev}
            for r, sev in zip(rels, severities, strict=True)
        ]
    return rows


def write_demo(out: Path, modality: str, d, workers: int) -> pd.DataFrame:
    """Write the demo collection into the (new) folder ``out``; return the labels table."""
    (out / "dicom").mkdir(parents=True)
    (out / "images").mkdir()
    tasks = [(i, str(out), modality, d) for i in range(d.patients)]
    rows = [r for rs in parallel_map(_patient, tasks, workers, desc="demo") for r in rs]
    labels = pd.DataFrame(rows, columns=["path", "label", "patient_id", "eye", "severity"])
    labels.to_csv(out / "labels.csv", index=False, float_format="%.4f")
    return labels


def _body(params: Params, args: argparse.Namespace) -> None:
    with atomic_path(params.paths.demo) as tmp:
        tmp.mkdir()
        if params.ingest.source != "demo":
            (tmp / "README.txt").write_text(
                f"Demo collection unused: ingest.source is {params.ingest.source!r}.\n"
            )
            log.info("ingest.source is not 'demo': wrote an empty %s", params.paths.demo)
            return
        labels = write_demo(tmp, params.ingest.modality, params.demo, params.demo.workers)
    counts = labels.groupby("label").size().to_dict()
    log.info(
        "wrote %d %s files for %d patients into %s (labels per file: %s)",
        len(labels),
        params.ingest.modality,
        params.demo.patients,
        params.paths.demo,
        counts,
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("demo", argv, _body, description=__doc__.splitlines()[0])
