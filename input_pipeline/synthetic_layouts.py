"""Synthetic data laid out like the public sources the adapters in sources.py read.

    python -m input_pipeline.synthetic --layout=rfmid --out_dir=D --num_images=64 --image_size=96

`write_layout(layout, out_dir, num_images, image_size, seed)` writes the folders and
label CSV of one layout and returns a `Layout` (the paths and flags to give `prepare`).
Fundus layouts reuse `synthetic.make_example` (image i of a seed is the same picture in
every layout; its drawn lesions/diseases become the layout's labels); the Kermany
layout draws OCT B-scans (`render_oct`).

| layout  | files (under out_dir)                                                  | adapter |
| ------- | ---------------------------------------------------------------------- | ------- |
| eyepacs | trainLabels.csv (image, level); train/<patient>_<left|right>.jpeg      | eyepacs |
| rfmid   | Training_Set/RFMiD_Training_Labels.csv (ID, Disease_Risk, 45 diseases);| rfmid   |
|         | Training_Set/Training/<ID>.png                                         |         |
| odir    | ODIR-5K/data.csv (ID, Patient Age/Sex, Left-/Right-Fundus, keywords,   | odir    |
|         | N D G C A H M O); ODIR-5K/Training Images/<ID>_<left|right>.jpg        |         |
| idrid   | B. Disease Grading/2. Groundtruths/a. IDRiD_Disease Grading_Training    | idrid   |
|         | Labels.csv (Image name, Retinopathy grade, "Risk of macular edema ");  |         |
|         | B. Disease Grading/1. Original Images/a. Training Set/IDRiD_NNN.jpg    |         |
| kermany | OCT2017/{train,val,test}/{CNV,DME,DRUSEN,NORMAL}/<CLASS>-<patient>-<n>.jpeg | folders |

Label derivation (fundus): RFMiD DR = grade >= 1, DN = drusen, TSLN = tessellation, ODC =
cupping, MH = macular hole, LS = laser scars, Disease_Risk = any, every other disease 0
(as rare as RFMiD's rarest: `--min_class_count` drops them). ODIR (per patient, both
eyes): D = DR, G = cupping, A = drusen, M = tessellation, O = macular hole or laser
scars, N = none of these; C and H stay 0. IDRiD: the grade; macular-edema risk 1 when
exudates were drawn, else 0.
"""

import dataclasses
import pathlib

import cv2
import numpy as np
import pandas as pd

from input_pipeline import synthetic

RFMID_DISEASES = ("DR", "ARMD", "MH", "DN", "MYA", "BRVO", "TSLN", "ERM", "LS", "MS", "CSR",
                  "ODC", "CRVO", "TV", "AH", "ODP", "ODE", "ST", "AION", "PT", "RT", "RS", "CRS",
                  "EDN", "RPEC", "MHL", "RP", "CWS", "CB", "ODPM", "PRH", "MNF", "HR", "CRAO",
                  "TD", "CME", "PTCR", "CF", "VH", "MCA", "VS", "BRAO", "PLQ", "HPED", "CL")
OCT_CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
# Patient class cycle 3:1:1:3 (Kermany's train set is ~45 % CNV, 31 % NORMAL), every class
# in every 8 patients so that tiny sets hold all four.
OCT_CYCLE = ("CNV", "NORMAL", "DME", "CNV", "NORMAL", "DRUSEN", "CNV", "NORMAL")
IDRID_DIR = "B. Disease Grading"
IDRID_CSV = f"{IDRID_DIR}/2. Groundtruths/a. IDRiD_Disease Grading_Training Labels.csv"
IDRID_IMAGES = f"{IDRID_DIR}/1. Original Images/a. Training Set"
LAYOUTS = ("demo", "eyepacs", "rfmid", "odir", "idrid", "kermany")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a written layout's labels and images are: prepare's flags."""

    source: str  # prepare --source
    labels_csv: str  # "" for folders
    images_dir: str

    def prepare_flags(self) -> list[str]:
        flags = [f"--source={self.source}", f"--images_dir={self.images_dir}"]
        return flags + ([f"--labels_csv={self.labels_csv}"] if self.labels_csv else [])


def _fundus_rows(num_images: int, image_size: int, seed: int):
    """(uint8 RGB image, synthetic CSV row) of images 0..n-1 (two eyes per patient)."""
    for i in range(num_images):
        yield synthetic.make_example(i, image_size, seed)


def _write_image(path: pathlib.Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        path.write_bytes(synthetic.encode_jpeg(img))
        return
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    ok, buf = cv2.imencode(path.suffix, bgr)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())


def write_eyepacs(out: pathlib.Path, num_images: int, image_size: int, seed: int) -> Layout:
    rows = []
    for img, row in _fundus_rows(num_images, image_size, seed):
        name = f"{10 + int(row['patient_id'][1:])}_{'right' if row['eye'] == 'OD' else 'left'}"
        _write_image(out / "train" / f"{name}.jpeg", img)
        rows.append({"image": name, "level": row["dr_grade"]})
    pd.DataFrame(rows).to_csv(out / "trainLabels.csv", index=False)
    return Layout("eyepacs", str(out / "trainLabels.csv"), str(out / "train"))


def rfmid_labels(row: dict) -> dict:
    """RFMiD 0/1 columns (Disease_Risk + RFMID_DISEASES) of a synthetic CSV row."""
    labels = dict.fromkeys(RFMID_DISEASES, 0)
    labels.update(DR=int(row["dr_grade"] >= 1), DN=row["drusen"], TSLN=row["tessellation"],
                  ODC=row["cupping"], MH=row["macular_hole"], LS=row["laser_scars"])
    return {"Disease_Risk": int(any(labels.values())), **labels}


def write_rfmid(out: pathlib.Path, num_images: int, image_size: int, seed: int) -> Layout:
    root = out / "Training_Set"
    rows = []
    for i, (img, row) in enumerate(_fundus_rows(num_images, image_size, seed)):
        _write_image(root / "Training" / f"{i + 1}.png", img)
        rows.append({"ID": i + 1, **rfmid_labels(row)})
    csv_path = root / "RFMiD_Training_Labels.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return Layout("rfmid", str(csv_path), str(root / "Training"))


def _odir_keywords(row: dict) -> str:
    words = []
    if row["dr_grade"] >= 1:
        words.append("moderate non proliferative retinopathy")
    words += [w for k, w in (("drusen", "drusen"), ("cupping", "suspected glaucoma"),
                              ("tessellation", "pathological myopia"),
                              ("macular_hole", "macular hole"), ("laser_scars", "laser spot"))
              if row[k]]
    return "，".join(words) or "normal fundus"  # ODIR separates keywords with a full-width comma


def odir_labels(rows: list[dict]) -> dict:
    """ODIR N..O of a patient from the synthetic rows of their eyes."""
    def anyof(key, test=bool):
        return int(any(test(r[key]) for r in rows))

    labels = {"D": anyof("dr_grade", lambda g: g >= 1), "G": anyof("cupping"), "C": 0,
              "A": anyof("drusen"), "H": 0, "M": anyof("tessellation"),
              "O": int(anyof("macular_hole") or anyof("laser_scars"))}
    return {"N": int(not any(labels.values())), **labels}


def write_odir(out: pathlib.Path, num_images: int, image_size: int, seed: int) -> Layout:
    root = out / "ODIR-5K"
    eyes = list(_fundus_rows(2 * (num_images // 2), image_size, seed))
    rows = []
    for p in range(len(eyes) // 2):
        (right, r_row), (left, l_row) = eyes[2 * p], eyes[2 * p + 1]  # OD first
        pid = p + 1
        for img, side in ((left, "left"), (right, "right")):
            _write_image(root / "Training Images" / f"{pid}_{side}.jpg", img)
        rows.append({"ID": pid, "Patient Age": 40 + p % 40,
                     "Patient Sex": ("Male", "Female")[p % 2],
                     "Left-Fundus": f"{pid}_left.jpg", "Right-Fundus": f"{pid}_right.jpg",
                     "Left-Diagnostic Keywords": _odir_keywords(l_row),
                     "Right-Diagnostic Keywords": _odir_keywords(r_row),
                     **odir_labels([l_row, r_row])})
    pd.DataFrame(rows).to_csv(root / "data.csv", index=False)
    return Layout("odir", str(root / "data.csv"), str(root / "Training Images"))


def write_idrid(out: pathlib.Path, num_images: int, image_size: int, seed: int) -> Layout:
    rows = []
    for i, (img, row) in enumerate(_fundus_rows(num_images, image_size, seed)):
        name = f"IDRiD_{i + 1:03d}"
        _write_image(out / IDRID_IMAGES / f"{name}.jpg", img)
        edema = int(row["dr_grade"] >= 2 and row["referable"] and i % 3 == 0)
        rows.append({"Image name": name, "Retinopathy grade": row["dr_grade"],
                     "Risk of macular edema ": edema})
    csv_path = out / IDRID_CSV
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return Layout("idrid", str(csv_path), str(out / IDRID_IMAGES))


# ----------------------------------------------------------------------------- OCT


def render_oct(rng: np.random.Generator, size: int, label: str) -> np.ndarray:
    """One synthetic OCT B-scan, uint8 grey [S, S]: retina band over a dark background.

    Layers (top to bottom): bright nerve-fibre layer, grey inner layers, dark outer
    nuclear layer, bright RPE line; a foveal pit at the centre. CNV lifts the RPE with
    a bright fibrovascular mound; DME thickens the retina and carves dark cysts; DRUSEN
    raises small domes of the RPE; NORMAL has none.
    """
    if label not in OCT_CLASSES:
        raise ValueError(f"label must be one of {OCT_CLASSES}, got {label!r}")
    s = size
    x = np.arange(s, dtype=np.float32)
    top = s * (0.35 + 0.04 * np.sin(x / s * rng.uniform(2, 4) + rng.uniform(0, 6)))
    pit = 0.05 * s * np.exp(-((x - s / 2) / (0.08 * s)) ** 2)
    thick = np.full(s, 0.22 * s, np.float32) - pit
    rpe = top + 0.22 * s
    if label == "DME":
        thick += 0.08 * s * np.exp(-((x - s / 2) / (0.2 * s)) ** 2)
    if label == "CNV":
        c = rng.uniform(0.35, 0.65) * s
        rpe -= 0.08 * s * np.exp(-((x - c) / (0.07 * s)) ** 2)
    if label == "DRUSEN":
        for c in rng.uniform(0.2, 0.8, int(rng.integers(3, 6))) * s:
            rpe -= 0.025 * s * np.exp(-((x - c) / (0.025 * s)) ** 2)
    inner_top = rpe - thick
    y = np.arange(s, dtype=np.float32)[:, None]
    depth = (y - inner_top[None]) / np.maximum(thick[None], 1)  # 0 at the top, 1 at the RPE
    img = np.zeros((s, s), np.float32)
    inside = (depth >= 0) & (depth <= 1)
    img += inside * (90 + 110 * np.exp(-depth / 0.08) - 50 * ((depth > 0.55) & (depth < 0.85)))
    img += 220 * np.exp(-((y - rpe[None]) / (0.012 * s)) ** 2)  # RPE band
    below = y > rpe[None]
    img += below * 70 * np.exp(-(y - rpe[None]) / (0.05 * s))  # choroid
    if label == "CNV":
        mound = (y > rpe[None]) & (y < rpe[None] + 0.06 * s) & (np.abs(x - c)[None] < 0.06 * s)
        img = np.where(mound, 200, img)
    if label == "DME":
        for _ in range(int(rng.integers(3, 7))):
            cx = rng.uniform(0.35, 0.65) * s
            cy = inner_top[int(cx)] + rng.uniform(0.3, 0.7) * thick[int(cx)]
            r = rng.uniform(0.02, 0.04) * s
            cv2.ellipse(img, (int(cx), int(cy)), (int(r * 1.3), int(r)), 0, 0, 360, 10, -1)
    speckle = rng.gamma(4.0, 0.25, img.shape).astype(np.float32)  # multiplicative, mean 1
    img = img * speckle + rng.normal(8, 4, img.shape)
    return np.clip(cv2.GaussianBlur(img, (0, 0), 0.6), 0, 255).astype(np.uint8)


def write_kermany(out: pathlib.Path, num_images: int, image_size: int, seed: int) -> Layout:
    """Patients of 2 B-scans each; patients cycle through OCT_CYCLE; successive patient
    blocks of 8 go to train, val, test, train, train, so that from 48 images on every
    split holds every class."""
    root = out / "OCT2017"
    for i in range(num_images):
        patient, n = i // 2, i % 2
        label = OCT_CYCLE[patient % len(OCT_CYCLE)]
        split = ("train", "val", "test", "train", "train")[(patient // len(OCT_CYCLE)) % 5]
        rng = np.random.default_rng([seed, patient, n])
        img = render_oct(rng, image_size, label)
        _write_image(root / split / label / f"{label}-{1000 + patient}-{n + 1}.jpeg", img)
    return Layout("folders", "", str(root))


WRITERS = {"eyepacs": write_eyepacs, "rfmid": write_rfmid, "odir": write_odir,
           "idrid": write_idrid, "kermany": write_kermany}


def write_layout(layout: str, out_dir, num_images: int, image_size: int, seed: int) -> Layout:
    """Writes one source layout under out_dir; returns where its labels/images are."""
    if layout not in WRITERS:
        raise ValueError(f"--layout: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return WRITERS[layout](out, num_images, image_size, seed)
