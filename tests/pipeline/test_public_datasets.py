"""README "Public datasets as distributed": each block of params, exactly as written there,
ingests a tiny look-alike of that download through the real ingest stage.

A look-alike has generated images named as the real ones and a label sheet shaped as the real
one (column names, suffixes or none, line ends, Excel's empty rows and columns). Each builder
returns the truth: every image's label and patient, so the test checks the manifest row by row
and that the images of one patient, and only they, share a subject.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from pipeline import ingest
from pipeline.params import load_params
from tests.pipeline.dicom_factory import gradient, write_params

REPO = Path(__file__).resolve().parents[2]
Truth = dict[str, tuple[str | None, str]]  # manifest source -> (label, patient)


def _readme_blocks(heading: str) -> tuple[list[dict], list[str]]:
    """The yaml blocks (parsed) and python blocks under ``#### heading`` of the README section."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Public datasets as distributed\n", 1)[1].split("\n## ", 1)[0]
    body = section.split(f"#### {heading}\n", 1)[1].split("\n#### ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", body, re.DOTALL)
    return [yaml.safe_load(b) for b in blocks], re.findall(r"```python\n(.*?)```", body, re.DOTALL)


def _image(path: Path, seed: int, grey: bool = False) -> None:
    """A distinct small picture (no two seeds give duplicates), format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gradient(40, 48, rgb=not grey, seed=seed)).save(path)


def eyepacs(root: Path) -> Truth:
    truth, rows = {}, ["image,level"]
    for k, (patient, side) in enumerate(
        (p, s) for p in (10, 13, 15, 16) for s in ("left", "right")
    ):
        name, level = f"{patient}_{side}", str(k % 5)
        _image(root / "train" / f"{name}.jpeg", k)
        truth[f"{name}.jpeg"] = (level, str(patient))
        rows.append(f"{name},{level}")
    (root / "trainLabels.csv").write_text("\n".join(rows) + "\n")
    return truth


def aptos(root: Path) -> Truth:
    rng = np.random.default_rng(0)
    truth, rows = {}, ["id_code,diagnosis"]
    for k in range(6):
        code = "".join(rng.choice(list("0123456789abcdef"), 12))
        _image(root / "train_images" / f"{code}.png", k)
        truth[f"{code}.png"] = (str(k % 5), f"own:{code}")
        rows.append(f"{code},{k % 5}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return truth


def idrid(root: Path) -> Truth:
    top = root / "B. Disease Grading"
    truth = {}
    lines = ["Image name,Retinopathy grade,Risk of macular edema ,,,,,,,,,"]
    for k in range(1, 7):
        name = f"IDRiD_{k:03d}"
        _image(top / "1. Original Images" / "a. Training Set" / f"{name}.jpg", k)
        truth[f"{name}.jpg"] = (str(k % 5), f"own:{name}")
        lines.append(f"{name},{k % 5},{k % 3},,,,,,,,,")
    lines += [",,,,,,,,,,,"] * 3  # rows Excel leaves at the end
    sheet = top / "2. Groundtruths" / "a. IDRiD_Disease Grading_Training Labels.csv"
    sheet.parent.mkdir(parents=True)
    sheet.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return truth


def messidor2(root: Path) -> Truth:
    names = [f"20051020_4{k}808_0100_PP.png" for k in range(4)] + ["IM002385.JPG", "IM004176.JPG"]
    truth, rows = {}, ["image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable"]
    for k, name in enumerate(names):
        _image(root / "IMAGES" / name, k)
        gradable = k != 2  # an ungradable image: no grade
        grade = str(k % 4) if gradable else ""
        truth[name] = (grade or None, f"own:{name}")
        rows.append(f"{name},{grade},{k % 2 if gradable else ''},{int(gradable)}")
    (root / "messidor_data.csv").write_text("\n".join(rows) + "\n")
    return truth


ODIR_KEYWORDS = [
    "normal fundus",
    "moderate non proliferative retinopathy\uff0chypertensive retinopathy",
    "pathological myopia",
    "cataract\uff0cnormal fundus",
]


def odir(root: Path) -> Truth:
    truth, rows = {}, []
    for k, patient in enumerate((0, 1, 3, 4)):
        row = {"ID": patient, "Patient Age": 50 + k, "Patient Sex": "Female"}
        for j, side in enumerate(("Left", "Right")):
            name = f"{patient}_{side.lower()}.jpg"
            keywords = ODIR_KEYWORDS[(k + j) % 4]
            _image(root / "ODIR-5K_Training_Dataset" / name, 2 * k + j)
            row |= {f"{side}-Fundus": name, f"{side}-Diagnostic Keywords": keywords}
            truth[name] = (keywords, str(patient))
        rows.append(row | dict.fromkeys(["N", "D", "G", "C", "A", "H", "M", "O"], 0))
    columns = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus"]
    columns += ["Left-Diagnostic Keywords", "Right-Diagnostic Keywords", *"NDGCAHMO"]
    sheet = root / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx"
    pd.DataFrame(rows, columns=columns).to_excel(sheet, index=False)
    return truth


RFMID_DISEASES = "DR,ARMD,MH,DN,MYA,BRVO,TSLN,ERM,LS,MS,CSR,ODC,CRVO,TV,AH,ODP,ODE,ST,AION"


def rfmid(root: Path) -> Truth:
    truth, rows = {}, [f"ID,Disease_Risk,{RFMID_DISEASES},PT,RT,RS,CRS,EDN,RPEC,MHL,RP,OTHER"]
    width = RFMID_DISEASES.count(",") + 1 + 9
    for k in range(1, 7):
        _image(root / "Training_Set" / "Training" / f"{k}.png", k)
        risk = str(k % 2)
        truth[f"{k}.png"] = (risk, f"own:{k}")
        rows.append(",".join([str(k), risk, *([risk] + ["0"] * (width - 1))]))
    (root / "Training_Set" / "RFMiD_Training_Labels.csv").write_text("\n".join(rows) + "\n")
    return truth


def deepdrid(root: Path) -> Truth:
    top = root / "regular-fundus-training"
    header = "patient_id,image_id,image_path,left_eye_DR_Level,right_eye_DR_Level,"
    truth, rows = (
        {},
        [header + "patient_DR_Level,Overall quality,Clarity,Field definition,Artifact"],
    )
    for k, patient in enumerate((1, 2, 3)):
        left, right = k % 5, (k + 2) % 5
        for n, image in enumerate(("l1", "l2", "r1", "r2")):
            name = f"{patient}_{image}"
            _image(top / "Images" / str(patient) / f"{name}.jpg", 4 * k + n)
            truth[f"{patient}/{name}.jpg"] = (str(max(left, right)), str(patient))
            path = f"\\regular-fundus-training\\Images\\{patient}\\{name}.jpg"
            rows.append(f"{patient},{name},{path},{left},{right},{max(left, right)},1,8,8,1")
    (top / "regular-fundus-training.csv").write_text("\n".join(rows) + "\n")
    return truth


def retinamnist(root: Path) -> Truth:
    rng = np.random.default_rng(0)
    truth, arrays = {}, {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 5, (n, 1))
        for i, (label,) in enumerate(arrays[f"{split}_labels"]):
            truth[f"{split}_images[{i}]"] = (str(label), f"own:{split}{i}")
    np.savez(root / "retinamnist.npz", **arrays)
    return truth


def kermany(root: Path) -> Truth:
    truth = {}
    names = ["CNV-1016042-1", "CNV-1016042-2", "DME-1072015-1", "DRUSEN-1083159-1"]
    names += ["NORMAL-1016042-3", "NORMAL-1025467-1"]  # one patient in two classes
    for k, name in enumerate(names):
        label, patient, _ = name.split("-")
        _image(root / "OCT2017" / "train" / label / f"{name}.jpeg", k, grey=True)
        truth[f"{label}/{name}.jpeg"] = (label, patient)
    return truth


def ddr(root: Path) -> Truth:
    truth, k = {}, 0
    for folder in ("train", "valid", "test"):
        lines = []
        for grade in ("0", "2", "5", "4"):  # 5: ungradable
            name = f"007-{k:04d}-000.jpg"
            _image(root / "DR_grading" / folder / name, k)
            truth[f"{folder}/{name}"] = (None if grade == "5" else grade, f"own:{name}")
            lines.append(f"{name} {grade}")
            k += 1
        (root / "DR_grading" / f"{folder}.txt").write_text("\n".join(lines) + "\n")
    return truth


def airogs(root: Path) -> Truth:
    truth, rows = {}, ["challenge_id,class"]
    for k in range(6):
        name, label = f"TRAIN{k:06d}", ("RG", "NRG")[k % 2]
        _image(root / str(k // 3) / f"{name}.jpg", k)
        truth[f"{k // 3}/{name}.jpg"] = (label, f"own:{name}")
        rows.append(f"{name},{label}")
    (root / "train_labels.csv").write_text("\n".join(rows) + "\n")
    return truth


BRSET_COLUMNS = (
    "image_id,patient_id,camera,patient_age,comorbidities,diabetes_time_y,insuline,"
    "patient_sex,exam_eye,diabetes,nationality,optic_disc,vessels,macula,DR_SDRG,DR_ICDR,"
    "focus,iluminaton,image_field,artifacts,quality"
)


def brset(root: Path) -> Truth:
    truth, rows = {}, [BRSET_COLUMNS]
    for k in range(6):
        name, patient, grade = f"img{k + 1:05d}", str(k // 2 + 1), str(k % 5)
        _image(root / "fundus_photos" / f"{name}.jpg", k)
        truth[f"{name}.jpg"] = (grade, patient)
        rows.append(
            f"{name},{patient},Canon CR,{48 + k}.0,diabetes1,10,no,{k % 2 + 1},{k % 2 + 1},"
            f"yes,Brazil,1,1,1,{grade},{grade},1,1,1,1,Adequate"
        )
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return truth


def g1020(root: Path) -> Truth:
    truth, rows = {}, ["imageID,binaryLabels"]
    for k in range(6):
        name, label = f"image_{k}.jpg", str(int(k in (1, 4)))
        _image(root / "Images" / name, k)
        (root / "Images" / f"image_{k}.json").write_text('{"shapes": []}')
        truth[name] = (label, f"own:{name}")
        rows.append(f"{name},{label}")
    (root / "G1020.csv").write_text("\n".join(rows) + "\n")
    return truth


def fives(root: Path) -> Truth:
    truth, classes = {}, {"A": "AMD", "D": "DR", "G": "glaucoma", "N": "normal"}
    for k, letter in enumerate("AADDGN"):
        name = f"{k + 1}_{letter}.png"
        _image(root / "train" / "Original" / name, k)
        _image(root / "train" / "Ground truth" / name, 50 + k, grey=True)  # a vessel mask
        truth[name] = (classes[letter], f"own:{name}")
    return truth


def jsiec(root: Path) -> Truth:
    truth = {}
    for k, folder in enumerate(["0.0.Normal", "0.0.Normal", "0.3.DR1", "1.0.DR2", "29.0.Blur"]):
        name = f"{folder}/{k:03d}.jpg"
        _image(root / "1000images" / name, k)
        truth[name] = (folder, f"own:{name}")
    return truth


CASES: list[tuple[str, int, Callable[[Path], Truth]]] = [
    ("EyePACS (Kaggle Diabetic Retinopathy Detection)", 0, eyepacs),
    ("APTOS 2019 Blindness Detection", 0, aptos),
    ("IDRiD (disease grading)", 0, idrid),
    ("Messidor-2", 0, messidor2),
    ("ODIR-5K", 0, odir),
    ("RFMiD (Retinal Fundus Multi-Disease Image Dataset)", 0, rfmid),
    ("DeepDRiD and RetinaMNIST", 0, deepdrid),
    ("DeepDRiD and RetinaMNIST", 1, retinamnist),
    ("Kermany OCT2017", 0, kermany),
    ("DDR (OIA-DDR, DR grading)", 0, ddr),
    ("AIROGS (Rotterdam EyePACS AIROGS)", 0, airogs),
    ("BRSET (Brazilian Multilabel Ophthalmological Dataset)", 0, brset),
    ("G1020", 0, g1020),
    ("FIVES", 0, fives),
    ("JSIEC (1000 fundus images, 39 classes)", 0, jsiec),
]


@pytest.mark.parametrize(("heading", "block", "build"), CASES, ids=[c[2].__name__ for c in CASES])
def test_readme_params_ingest_the_dataset_as_distributed(
    tmp_path, monkeypatch, heading, block, build
):
    root = tmp_path / "download"
    root.mkdir()
    truth = build(root)
    blocks, recipes = _readme_blocks(heading)
    monkeypatch.chdir(root)  # the README's paths are relative to the download folder
    for recipe in recipes:
        exec(compile(recipe, f"README.md ({heading})", "exec"), {})
    params = write_params(tmp_path, ingest=blocks[block]["ingest"] | {"workers": 1})
    assert ingest.main(["--params", str(params)]) == 0
    paths = load_params(params).paths
    m = pd.read_parquet(paths.manifest).set_index("source")
    assert sorted(m.index) == sorted(truth)
    labels = {s: (None if pd.isna(v) else v) for s, v in m["label"].items()}
    assert labels == {s: label for s, (label, _) in truth.items()}
    # one subject per patient: the same partition of the images
    by_subject = m.groupby("subject_id").groups
    by_patient = pd.Series({s: p for s, (_, p) in truth.items()}).groupby(lambda s: truth[s][1])
    assert sorted(map(sorted, by_subject.values())) == sorted(
        sorted(group.index) for _, group in by_patient
    )
    assert pd.read_csv(paths.quarantine).empty
    if build is odir:  # the recipe's eye column: Left/Right -> L/R
        assert {s: e for s, e in m["eye"].items()} == {s: s.split("_")[1][0].upper() for s in truth}
