"""Label-source adapters: each public layout becomes one common row table.

A `Source` holds a pandas DataFrame with one row per image:

| column     | dtype               | meaning                                                   |
| ---------- | ------------------- | --------------------------------------------------------- |
| row        | int                 | 0-based row number in this table (rejected.csv refers to it) |
| path       | str                 | image file, relative to `Source.images_dir` (or absolute) |
| label      | str or tuple[str]   | raw label value ("" = unknown); a tuple for multi-column  |
| patient_id | str                 | patient identifier, "" when unknown                       |
| split      | str (optional)      | official split (train/val/test) when the layout has one   |

Raw labels stay strings here; `encode_labels` turns them into class indices
for a task and says, per row, why a label cannot be used. No image is read here
(except the RetinaMNIST npz, whose arrays are written out as PNGs once).

Adapters (the `--source` flag): generic, eyepacs, aptos, idrid, rfmid, odir,
folders (Kermany OCT style), npz (RetinaMNIST), mexico, rfmid_odir (RFMiD + ODIR-5K in
OcuNet's 30-label space).
"""

import csv
import dataclasses
import io
import math
import os
import pathlib
import re
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

IMAGE_COLUMN_CANDIDATES = ("image", "path", "filename", "id_code", "ID", "id")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "dev": "val", "test": "test", "testing": "test"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
# Suffix of every file prepare writes before renaming it into place: distinctive,
# so that cleaning up after a killed run never touches anybody else's "*.tmp".
TMP_SUFFIX = ".fundusflow-partial"


@dataclasses.dataclass
class Source:
    """One adapted label source.

    Attributes:
        table: the row table described in the module docstring.
        images_dir: absolute folder that relative `path`s are resolved against.
        label_columns: the source columns the labels came from (multilabel: one per class).
        class_names: the label values in class order when the layout defines them
            (folder names, "none/npdr/pdr", multilabel column names), else None.
        adapter: the adapter name.
    """

    table: pd.DataFrame
    images_dir: str
    label_columns: list[str]
    class_names: list[str] | None
    adapter: str


@dataclasses.dataclass(frozen=True)
class SourceArgs:
    """What the user told us about the source (flags of prepare)."""

    labels_csv: str | None = None
    images_dir: str | None = None
    label_columns: tuple[str, ...] = ()  # empty: the adapter's default
    image_column: str | None = None
    patient_column: str | None = None  # default "patient_id" when present
    split_column: str | None = None
    multilabel: bool = False
    out_dir: str | None = None  # where the npz adapter materialises its PNGs


# ----------------------------------------------------------------------------- CSV helpers


def read_csv(path: str) -> pd.DataFrame:
    """Reads a label CSV as strings: stripped headers and cells, "" for empty cells.

    Empty cells must stay "" (unknown), never NaN-turned-0; headers are stripped
    because real files carry stray spaces (IDRiD's "Risk of macular edema ").
    UTF-8 (a BOM is dropped) with LF or CRLF line ends; a file that is not UTF-8,
    empty or has a row with more or fewer fields than the header raises
    ValueError naming the file and the line.
    """
    if not path or not os.path.isfile(path):
        raise ValueError(f"--labels_csv: file not found: {path!r}")
    text = _csv_text(path)
    _check_row_widths(text, path)
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    df.columns = [str(c).strip() for c in df.columns]
    empty_unnamed = [c for c in df.columns
                     if c.startswith("Unnamed:") and not (df[c].str.strip() != "").any()]
    df = df.drop(columns=empty_unnamed)
    return df.apply(lambda col: col.str.strip()).reset_index(drop=True)


def _csv_text(path: str) -> str:
    """The file decoded as UTF-8 (BOM dropped); ValueError naming the line otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path} line {line}: not UTF-8 (byte 0x{data[e.start]:02x}); "
                         "save the CSV as UTF-8") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file (no header row)")
    return text


def _check_row_widths(text: str, path: str) -> None:
    """Raises ValueError naming the first line whose field count differs from the header's.

    pandas would silently turn a row with one field too many into an index
    (shifting every value one column left) and pad a short row with NaN.
    """
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        width = len(next(reader))
        for row in reader:
            if row and len(row) != width:  # blank lines are skipped, as pandas does
                raise ValueError(f"{path} line {reader.line_num}: {len(row)} fields, "
                                 f"the header has {width}")
    except csv.Error as e:
        raise ValueError(f"{path} line {reader.line_num}: {e}") from None


def require_columns(df: pd.DataFrame, columns: Sequence[str], flag: str) -> None:
    """Raises ValueError naming the first missing column and the flag that named it."""
    for col in columns:
        if col not in df.columns:
            raise ValueError(f"{flag}: column {col!r} not in the label CSV; "
                             f"columns are {list(df.columns)}")


def _images_dir(args: SourceArgs) -> str:
    """--images_dir, defaulting to the CSV's folder."""
    folder = args.images_dir or (os.path.dirname(os.path.abspath(args.labels_csv))
                                 if args.labels_csv else None)
    if not folder or not os.path.isdir(folder):
        raise ValueError(f"--images_dir: folder not found: {folder!r}")
    return os.path.abspath(folder)


def _patient_ids(df: pd.DataFrame, args: SourceArgs) -> pd.Series:
    col = args.patient_column or "patient_id"
    if col in df.columns:
        return df[col].astype(str)
    if args.patient_column:
        require_columns(df, [col], "--group_column")
    return pd.Series([""] * len(df), dtype=str)


def _labels(df: pd.DataFrame, columns: Sequence[str], multilabel: bool) -> list:
    """Raw label per row: a string (one column) or a tuple of strings (multilabel)."""
    if multilabel:
        return list(zip(*(df[c].astype(str) for c in columns), strict=True))
    if len(columns) != 1:
        raise ValueError(f"--label_column: a single-label task needs exactly one column, "
                         f"got {list(columns)}")
    return list(df[columns[0]].astype(str))


def _table(paths, labels, patient_ids, split=None) -> pd.DataFrame:
    table = pd.DataFrame({"path": list(paths), "label": pd.Series(list(labels), dtype=object),
                          "patient_id": list(patient_ids)})
    table.insert(0, "row", np.arange(len(table), dtype=np.int64))
    if split is not None:
        table["split"] = [SPLIT_ALIASES.get(str(s).strip().lower(), str(s)) for s in split]
    return table


def _split_values(df: pd.DataFrame, args: SourceArgs):
    if not args.split_column:
        return None
    require_columns(df, [args.split_column], "--split_column")
    return df[args.split_column]


def _csv_source(args: SourceArgs, *, adapter: str, image_column: str, default_labels,
                path_fn: Callable[[str], str] = str, patient_fn=None,
                class_names=None) -> Source:
    """Shared body of the CSV adapters: one row per CSV row."""
    df = read_csv(args.labels_csv)
    label_columns = list(args.label_columns) or list(default_labels(df))
    if not label_columns:
        raise ValueError(f"--label_column: no label column given for source {adapter!r}")
    require_columns(df, [image_column], "--image_column")
    require_columns(df, label_columns, "--label_column(s)")
    paths = [path_fn(v) for v in df[image_column]]
    patients = (df[image_column].map(patient_fn) if patient_fn else _patient_ids(df, args))
    table = _table(paths, _labels(df, label_columns, args.multilabel), patients,
                   _split_values(df, args))
    names = label_columns if args.multilabel else class_names
    return Source(table, _images_dir(args), label_columns, names, adapter)


# ----------------------------------------------------------------------------- adapters


def generic(args: SourceArgs) -> Source:
    """Any CSV: --image_column (default: first of image/path/filename/id_code/ID/id)."""
    df_columns = list(read_csv(args.labels_csv).columns)
    image_column = args.image_column or next(
        (c for c in IMAGE_COLUMN_CANDIDATES if c in df_columns), None)
    if image_column is None:
        raise ValueError(f"--image_column: none of {IMAGE_COLUMN_CANDIDATES} in the label CSV; "
                         f"columns are {df_columns}")
    return _csv_source(args, adapter="generic", image_column=image_column,
                       default_labels=lambda df: [])


def _eyepacs_patient(image: str) -> str:
    # EyePACS names are "<patient>_left" / "<patient>_right": both eyes share a patient.
    m = re.fullmatch(r"(\d+)_(left|right)", image)
    return m.group(1) if m else ""


def eyepacs(args: SourceArgs) -> Source:
    """Kaggle EyePACS trainLabels.csv: image, level; files <image>.jpeg."""
    return _csv_source(args, adapter="eyepacs", image_column="image",
                       default_labels=lambda df: ["level"], path_fn=lambda v: f"{v}.jpeg",
                       patient_fn=_eyepacs_patient, class_names=[str(i) for i in range(5)])


def aptos(args: SourceArgs) -> Source:
    """APTOS 2019: id_code, diagnosis; files <id_code>.png; no patient ids."""
    return _csv_source(args, adapter="aptos", image_column="id_code",
                       default_labels=lambda df: ["diagnosis"], path_fn=lambda v: f"{v}.png",
                       class_names=[str(i) for i in range(5)])


def idrid(args: SourceArgs) -> Source:
    """IDRiD grading: Image name, Retinopathy grade, Risk of macular edema; <name>.jpg."""
    return _csv_source(args, adapter="idrid", image_column="Image name",
                       default_labels=lambda df: ["Retinopathy grade"],
                       path_fn=lambda v: f"{v}.jpg")


def _rfmid_diseases(df: pd.DataFrame) -> list[str]:
    # RFMiD: ID, Disease_Risk, then one 0/1 column per disease.
    require_columns(df, ["Disease_Risk"], "--source=rfmid")
    return list(df.columns[list(df.columns).index("Disease_Risk") + 1:])


def rfmid(args: SourceArgs) -> Source:
    """RFMiD: ID, Disease_Risk, <disease columns>; files <ID>.png."""
    default = _rfmid_diseases if args.multilabel else (lambda df: ["Disease_Risk"])
    return _csv_source(args, adapter="rfmid", image_column="ID", default_labels=default,
                       path_fn=lambda v: f"{v}.png", class_names=["0", "1"])


ODIR_LABELS = ("N", "D", "G", "C", "A", "H", "M", "O")


def odir(args: SourceArgs) -> Source:
    """ODIR-5K: one row per patient -> one row per eye image (Left-Fundus, Right-Fundus).

    The N..O labels are per patient (both eyes), which is how ODIR publishes them.
    """
    df = read_csv(args.labels_csv)
    label_columns = list(args.label_columns) or list(ODIR_LABELS)
    require_columns(df, ["ID", "Left-Fundus", "Right-Fundus"], "--source=odir")
    require_columns(df, label_columns, "--label_column(s)")
    labels = _labels(df, label_columns, args.multilabel)
    # Interleave left/right so that both eyes of one patient stay adjacent.
    paths, rows_labels, patients, splits = [], [], [], []
    split = _split_values(df, args)
    for i in range(len(df)):
        for col in ("Left-Fundus", "Right-Fundus"):
            paths.append(df[col].iat[i])
            rows_labels.append(labels[i])
            patients.append(df["ID"].iat[i])
            splits.append(None if split is None else split.iat[i])
    table = _table(paths, rows_labels, patients, None if split is None else splits)
    names = label_columns if args.multilabel else ["0", "1"]
    return Source(table, _images_dir(args), label_columns, names, "odir")


def _kermany_patient(name: str) -> str:
    # Kermany OCT names: "<CLASS>-<patient>-<n>.jpeg".
    m = re.match(r"[A-Za-z]+-(\d+)-\d+", name)
    return m.group(1) if m else ""


def folders(args: SourceArgs) -> Source:
    """Class-per-folder layout: root/<class>/*.jpeg, or root/{train,val,test}/<class>/*."""
    if args.multilabel:
        raise ValueError("--task=multilabel: the folders source has one class per image")
    root = pathlib.Path(_images_dir(args))
    split_dirs = sorted(d.name for d in root.iterdir()
                        if d.is_dir() and d.name.lower() in SPLIT_ALIASES)
    tops = [(root / s, s) for s in split_dirs] if split_dirs else [(root, None)]
    class_names = sorted({d.name for top, _ in tops for d in top.iterdir() if d.is_dir()})
    if not class_names:
        raise ValueError(f"--images_dir: no class folders under {root}")
    paths, labels, patients, splits = [], [], [], []
    for top, split in tops:
        for cls in class_names:
            folder = top / cls
            files = sorted(f for f in folder.glob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            for f in files:
                paths.append(str(f.relative_to(root)))
                labels.append(cls)
                patients.append(_kermany_patient(f.name))
                splits.append(split)
    table = _table(paths, labels, patients, splits if split_dirs else None)
    return Source(table, str(root), ["folder"], class_names, "folders")


NPZ_SPLITS = ("train", "val", "test")


def npz(args: SourceArgs) -> Source:
    """MedMNIST npz (RetinaMNIST): {train,val,test}_{images,labels}; official splits kept.

    Images are materialised once as PNGs under <out_dir>/_source_images so that the
    rest of the pipeline reads files like for every other source.
    """
    path = args.labels_csv
    if not path or not os.path.isfile(path):
        raise ValueError(f"--labels_csv: npz file not found: {path!r}")
    if not args.out_dir:
        raise ValueError("--out_dir is required for --source=npz")
    image_dir = os.path.join(args.out_dir, "_source_images")
    os.makedirs(image_dir, exist_ok=True)
    paths, labels, splits = [], [], []
    with np.load(path) as data:
        for split in NPZ_SPLITS:
            if f"{split}_images" not in data:
                raise ValueError(f"--labels_csv: npz has no key {split}_images")
            images, split_labels = data[f"{split}_images"], data[f"{split}_labels"]
            for i, (img, lab) in enumerate(zip(images, split_labels, strict=True)):
                name = f"{split}_{i:05d}.png"
                _write_png_once(os.path.join(image_dir, name), img)
                paths.append(name)
                labels.append(_npz_label(lab, args.multilabel))
                splits.append(split)
    table = _table(paths, labels, [""] * len(paths), splits)
    return Source(table, image_dir, ["label"], None, "npz")


def _npz_label(lab: np.ndarray, multilabel: bool):
    lab = np.atleast_1d(lab)
    if multilabel:
        return tuple(_number_text(v) for v in lab)
    return _number_text(lab[0])


def _number_text(value) -> str:
    """3 / 3.0 -> "3"; anything else (nan, 2.5) as written, for encode_label to reject."""
    value = float(value)
    return str(int(value)) if value.is_integer() else str(value)


def _write_png_once(path: str, img: np.ndarray) -> None:
    """uint8 [H, W] or [H, W, 3] RGB -> PNG; tmp + rename so a kill leaves no half file."""
    if os.path.exists(path):
        return
    import cv2  # local: only this adapter writes images

    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError(f"could not encode {path}")
    tmp = path + TMP_SUFFIX
    with open(tmp, "wb") as f:
        f.write(buf.tobytes())
    os.replace(tmp, path)


MEXICO_CLASSES = {"dr": ["none", "npdr", "pdr"], "dme": ["0", "1"]}


def mexico(args: SourceArgs) -> Source:
    """Mexican OCT-AND-EYE-FUNDUS labels.csv: image,patient_id,eye,dme,dr,dr_code,...

    `dr` is none/npdr/pdr or empty when unknown; empty stays "" (an unknown label,
    rejected later), never "no DR". --label_column is required (dme or dr).
    """
    if not args.label_columns:
        raise ValueError("--label_column is required for --source=mexico (dme or dr)")
    source = _csv_source(args, adapter="mexico", image_column="image",
                         default_labels=lambda df: [])
    if not args.multilabel:
        source.table["label"] = source.table["label"].str.lower()
        source.class_names = MEXICO_CLASSES.get(source.label_columns[0])
    return source


# OcuNet v4's 30-label space, in its order.
OCUNET_LABELS = ("Disease_Risk", "DR", "ARMD", "MH", "DN", "MYA", "BRVO", "TSLN", "ERM", "LS",
                 "MS", "CSR", "ODC", "CRVO", "AH", "ODP", "ODE", "AION", "PT", "RT", "RS", "CRS",
                 "EDN", "RPEC", "MHL", "CATARACT", "GLAUCOMA", "NORMAL", "RD", "RP")
# ODIR-5K label -> OcuNet label (H hypertension and O other have no OcuNet label).
ODIR_TO_OCUNET = {"D": "DR", "G": "GLAUCOMA", "C": "CATARACT", "A": "ARMD", "M": "MYA",
                  "N": "NORMAL"}
# ODIR's per-eye diagnostic keywords that name an OcuNet label ODIR has no column for.
ODIR_KEYWORDS = {"RD": "retinal detachment", "RP": "retinitis pigmentosa"}


def _split_pair(value: str | None, flag: str) -> tuple[str, str]:
    parts = [p.strip() for p in (value or "").split(",")]
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{flag}: --source=rfmid_odir needs two comma-separated values "
                         f"(RFMiD first, then ODIR-5K), got {value!r}")
    return parts[0], parts[1]


def _absolute(source: Source) -> list[str]:
    return [p if os.path.isabs(p) else os.path.join(source.images_dir, p)
            for p in source.table["path"]]


def _ocunet_rfmid(args: SourceArgs) -> tuple[list, list, list]:
    """RFMiD rows -> (paths, 30-label tuples, patients): same-named columns, NORMAL =
    not Disease_Risk, labels RFMiD lacks (CATARACT, GLAUCOMA, RD) "0"."""
    src = rfmid(dataclasses.replace(args, label_columns=(), multilabel=True))
    df = read_csv(args.labels_csv)
    labels = []
    for _, row in df.iterrows():
        risk = row["Disease_Risk"]
        normal = "" if risk == "" else str(1 - int(float(risk)))
        labels.append(tuple(normal if name == "NORMAL" else
                            (row[name] if name in df.columns else "0") for name in OCUNET_LABELS))
    return _absolute(src), labels, [""] * len(labels)


def _ocunet_odir(args: SourceArgs) -> tuple[list, list, list]:
    """ODIR-5K eyes -> (paths, 30-label tuples, patients "odir:<ID>"): mapped columns,
    Disease_Risk = not N, RD/RP from the eye's diagnostic keywords, the rest "0"."""
    src = odir(dataclasses.replace(args, label_columns=ODIR_LABELS, multilabel=True))
    df = read_csv(args.labels_csv)
    labels = []
    for i in range(len(df)):
        row = df.iloc[i]
        for side in ("Left", "Right"):
            words = str(row.get(f"{side}-Diagnostic Keywords", "")).lower()
            mapped = {o: row[k] for k, o in ODIR_TO_OCUNET.items()}
            n = row["N"]
            mapped["Disease_Risk"] = "" if n == "" else str(1 - int(float(n)))
            mapped.update({o: str(int(w in words)) for o, w in ODIR_KEYWORDS.items()})
            labels.append(tuple(mapped.get(name, "0") for name in OCUNET_LABELS))
    return _absolute(src), labels, [f"odir:{p}" for p in src.table["patient_id"]]


def rfmid_odir(args: SourceArgs) -> Source:
    """RFMiD + ODIR-5K in OcuNet's 30-label space (multilabel only).

    --labels_csv=RFMID_CSV,ODIR_CSV and --images_dir=RFMID_IMAGES,ODIR_IMAGES (two
    comma-separated values each, RFMiD first). Labels a source has no column for are 0
    (e.g. CATARACT in RFMiD, BRVO in ODIR): absent from that source's annotation, which
    is how OcuNet trained; `--min_class_count` drops labels left with too few positives.
    """
    if not args.multilabel:
        raise ValueError("--source=rfmid_odir is multilabel: pass --task=multilabel")
    if args.split_column:
        raise ValueError("--split_column: --source=rfmid_odir has no shared split column")
    csvs, dirs = (_split_pair(args.labels_csv, "--labels_csv"),
                  _split_pair(args.images_dir, "--images_dir"))
    paths, labels, patients = [], [], []
    for part, csv_path, images in zip((_ocunet_rfmid, _ocunet_odir), csvs, dirs, strict=True):
        p, lab, pat = part(dataclasses.replace(args, labels_csv=csv_path, images_dir=images))
        paths += p
        labels += lab
        patients += pat
    root = os.path.commonpath([os.path.abspath(d) for d in dirs])
    return Source(_table(paths, labels, patients), root, list(OCUNET_LABELS),
                  list(OCUNET_LABELS), "rfmid_odir")


ADAPTERS: dict[str, Callable[[SourceArgs], Source]] = {
    "generic": generic, "eyepacs": eyepacs, "aptos": aptos, "idrid": idrid, "rfmid": rfmid,
    "odir": odir, "folders": folders, "npz": npz, "mexico": mexico, "rfmid_odir": rfmid_odir,
}


def load_source(name: str, args: SourceArgs) -> Source:
    """Runs the named adapter; raises ValueError naming the flag/column at fault."""
    if name not in ADAPTERS:
        raise ValueError(f"--source: unknown source {name!r}; known: {', '.join(ADAPTERS)}")
    return ADAPTERS[name](args)


# ----------------------------------------------------------------------------- label encoding

UNKNOWN_LABEL = "unknown label (empty)"


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """How raw labels become class indices.

    Attributes:
        task: dr_grade | binary | multiclass | multilabel.
        class_names: explicit class names (--class_names), or None.
        positive_threshold: binary only: numeric label >= threshold -> 1, else 0.
        label_map: raw value -> class index (--label_map "none:0,npdr:1,pdr:1").
        num_grades: dr_grade only: K when --class_names is not given.
    """

    task: str
    class_names: tuple[str, ...] | None = None
    positive_threshold: float | None = None
    label_map: dict[str, int] | None = None
    num_grades: int = 5


def parse_label_map(text: str | None) -> dict[str, int] | None:
    """"a:0,b:1" -> {"a": 0, "b": 1}; raises ValueError naming --label_map."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        key, sep, value = item.rpartition(":")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"--label_map: expected 'raw:index,...', got item {item!r}")
        out[key.strip()] = int(value)
    return out


def resolve_class_names(spec: LabelSpec, source: Source) -> list[str]:
    """The task's class names (index order); raises ValueError on a bad combination."""
    if spec.task == "multilabel":
        return list(spec.class_names or source.label_columns)
    if spec.class_names:
        names = list(spec.class_names)
    elif spec.task == "binary":
        names = ["0", "1"]
    elif spec.task == "dr_grade":
        names = [str(i) for i in range(spec.num_grades)]
    elif spec.label_map:
        names = [str(i) for i in range(max(spec.label_map.values()) + 1)]
    elif source.class_names:
        names = list(source.class_names)
    else:
        names = _sorted_values(v for v in source.table["label"] if v != "")
    if spec.task == "binary" and len(names) != 2:
        raise ValueError(f"--class_names: binary needs 2 names, got {names}")
    if len(names) < 2:
        raise ValueError(f"--class_names: need at least 2 classes, got {names}")
    return names


def _sorted_values(values) -> list[str]:
    """Unique values, numerically sorted when all are integers (so "10" follows "9").

    "nan" / "inf" never become class names: such a cell is a broken number, and
    encode_label rejects its row.
    """
    unique = {v for v in values if not _non_finite(v)}
    if all(v.lstrip("-").isdigit() for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def _as_number(raw: str) -> float | None:
    """The finite number a label cell holds, else None ("x", "nan", "inf", "1e999")."""
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _non_finite(raw: str) -> bool:
    """True for cells that parse as a number but not a finite one ("nan", "-inf")."""
    try:
        return not math.isfinite(float(raw))
    except ValueError:
        return False


def encode_label(raw, spec: LabelSpec, class_names: Sequence[str],
                 columns: Sequence[str] = ()):
    """One raw label -> (class index | tuple of 0/1, None) or (None, rejection reason).

    `columns` are the label columns the value came from (one, or one per class for
    multilabel); when given, the reason names the column as well as the value.
    """
    if spec.task == "multilabel":
        return _encode_multilabel(raw, len(class_names), columns)
    index, reason = _encode_single(raw, spec, class_names)
    if reason and columns:
        reason = f"{reason}, column {columns[0]!r}"
    return index, reason


def _encode_single(raw: str, spec: LabelSpec, class_names: Sequence[str]):
    if raw == "":
        return None, UNKNOWN_LABEL
    if spec.label_map is not None:
        if raw not in spec.label_map:
            return None, f"label {raw!r} not in --label_map"
        index = spec.label_map[raw]
    elif _non_finite(raw) and (spec.positive_threshold is not None or raw not in class_names):
        # A class may be named "Inf" (a folder, --class_names); a number cannot be nan.
        return None, f"label {raw!r} is not a finite number"
    elif spec.task == "binary" and spec.positive_threshold is not None:
        value = _as_number(raw)
        if value is None:
            return None, f"label {raw!r} is not a number (--positive_threshold)"
        index = int(value >= spec.positive_threshold)
    elif raw in class_names:
        index = list(class_names).index(raw)
    else:
        value = _as_number(raw)
        # Accept "2.0" for class "2": some CSVs were written from float columns.
        if value is None or value != int(value) or str(int(value)) not in class_names:
            return None, f"label {raw!r} out of range / not a known class"
        index = list(class_names).index(str(int(value)))
    if not 0 <= index < len(class_names):
        return None, f"label {raw!r} maps to {index}, out of range 0..{len(class_names) - 1}"
    return index, None


def _encode_multilabel(raw, num_labels: int, columns: Sequence[str] = ()):
    values = raw if isinstance(raw, tuple) else (raw,)
    if len(values) != num_labels:
        return None, f"expected {num_labels} label values, got {len(values)}"
    out = []
    for i, v in enumerate(values):
        where = f", column {columns[i]!r}" if i < len(columns) else ""
        if v == "":
            return None, UNKNOWN_LABEL + where
        number = _as_number(v)
        if number not in (0.0, 1.0):
            return None, f"label {v!r} out of range (multilabel values are 0/1){where}"
        out.append(int(number))
    return tuple(out), None


def encode_labels(table: pd.DataFrame, spec: LabelSpec, class_names: Sequence[str],
                  columns: Sequence[str] = ()):
    """Encodes every row: returns (list of index | tuple | None, list of reason | None).

    Reasons name the value and, when `columns` (the source's label columns) is
    given, the column; unknown (empty) labels start with UNKNOWN_LABEL.
    """
    pairs = [encode_label(raw, spec, class_names, columns) for raw in table["label"]]
    return [p[0] for p in pairs], [p[1] for p in pairs]
