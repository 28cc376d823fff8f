"""Label-source adapters on tiny fixtures written with the real public headers."""

import re

import cv2
import numpy as np
import pytest

from input_pipeline import sources
from input_pipeline.sources import LabelSpec, SourceArgs


def _csv(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _load(name, tmp_path, text, **kw):
    kw.setdefault("images_dir", str(tmp_path))
    return sources.load_source(name, SourceArgs(labels_csv=_csv(tmp_path, text), **kw))


def test_eyepacs_paths_levels_and_patients(tmp_path):
    src = _load("eyepacs", tmp_path, "image,level\n10_left,0\n10_right,2\n13_left,4\n")
    t = src.table
    assert list(t.path) == ["10_left.jpeg", "10_right.jpeg", "13_left.jpeg"]
    assert list(t.label) == ["0", "2", "4"]
    assert list(t.patient_id) == ["10", "10", "13"]  # both eyes of one patient
    assert list(t.row) == [0, 1, 2]
    assert src.label_columns == ["level"] and src.class_names == ["0", "1", "2", "3", "4"]


def test_aptos(tmp_path):
    src = _load("aptos", tmp_path, "id_code,diagnosis\n000c1434d8d7,2\n001639a390f0,4\n")
    assert list(src.table.path) == ["000c1434d8d7.png", "001639a390f0.png"]
    assert list(src.table.label) == ["2", "4"]
    assert list(src.table.patient_id) == ["", ""]


def test_idrid_strips_the_trailing_space_header_and_empty_columns(tmp_path):
    text = ("Image name,Retinopathy grade,Risk of macular edema ,,\n"
            "IDRiD_001,3,2,,\nIDRiD_002,0,0,,\n")
    src = _load("idrid", tmp_path, text)
    assert list(src.table.path) == ["IDRiD_001.jpg", "IDRiD_002.jpg"]
    assert list(src.table.label) == ["3", "0"]
    edema = _load("idrid", tmp_path, text, label_columns=("Risk of macular edema",))
    assert list(edema.table.label) == ["2", "0"]


def test_rfmid_multilabel_uses_disease_columns(tmp_path):
    text = "ID,Disease_Risk,DR,ARMD,MH\n1,1,1,0,0\n2,0,0,0,0\n3,1,0,1,1\n"
    src = _load("rfmid", tmp_path, text, multilabel=True)
    assert src.label_columns == ["DR", "ARMD", "MH"] == src.class_names
    assert list(src.table.path) == ["1.png", "2.png", "3.png"]
    assert list(src.table.label) == [("1", "0", "0"), ("0", "0", "0"), ("0", "1", "1")]
    single = _load("rfmid", tmp_path, text)
    assert single.label_columns == ["Disease_Risk"]
    assert list(single.table.label) == ["1", "0", "1"]


def test_odir_one_row_per_eye(tmp_path):
    text = ("ID,Patient Age,Patient Sex,Left-Fundus,Right-Fundus,Left-Diagnostic Keywords,"
            "Right-Diagnostic Keywords,N,D,G,C,A,H,M,O\n"
            "0,69,Female,0_left.jpg,0_right.jpg,cataract,normal fundus,0,0,0,1,0,0,0,0\n"
            "1,57,Male,1_left.jpg,1_right.jpg,normal fundus,normal fundus,1,0,0,0,0,0,0,0\n")
    src = _load("odir", tmp_path, text, multilabel=True)
    t = src.table
    assert list(t.path) == ["0_left.jpg", "0_right.jpg", "1_left.jpg", "1_right.jpg"]
    assert list(t.patient_id) == ["0", "0", "1", "1"]
    assert t.label[1] == ("0", "0", "0", "1", "0", "0", "0", "0")
    assert t.label[3] == ("1",) + ("0",) * 7
    assert src.class_names == list("NDGCAHMO")


def _touch_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(b"x")


def test_class_per_folder_kermany(tmp_path):
    for cls in ("NORMAL", "CNV", "DME"):
        _touch_images(tmp_path / cls, [f"{cls}-1016042-1.jpeg", f"{cls}-77-3.jpeg"])
    (tmp_path / "CNV" / "notes.txt").write_text("not an image")
    src = sources.load_source("folders", SourceArgs(images_dir=str(tmp_path)))
    assert src.class_names == ["CNV", "DME", "NORMAL"]
    assert list(src.table.path)[:2] == ["CNV/CNV-1016042-1.jpeg", "CNV/CNV-77-3.jpeg"]
    assert list(src.table.patient_id) == ["1016042", "77"] * 3
    assert "split" not in src.table.columns


def test_class_per_folder_with_split_folders(tmp_path):
    _touch_images(tmp_path / "train" / "CNV", ["CNV-1-1.jpeg"])
    _touch_images(tmp_path / "test" / "NORMAL", ["NORMAL-2-1.jpeg"])
    src = sources.load_source("folders", SourceArgs(images_dir=str(tmp_path)))
    assert src.class_names == ["CNV", "NORMAL"]
    assert sorted(zip(src.table.split, src.table.label, strict=True)) == [
            ("test", "NORMAL"), ("train", "CNV")]


def test_retinamnist_npz_materialises_pngs_with_official_splits(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 5, (n, 1))
    npz_path = tmp_path / "retinamnist.npz"
    np.savez(npz_path, **arrays)
    out = tmp_path / "out"
    src = sources.load_source("npz", SourceArgs(labels_csv=str(npz_path), out_dir=str(out)))
    t = src.table
    assert list(t.split) == ["train"] * 3 + ["val"] + ["test"] * 2
    assert src.images_dir == str(out / "_source_images")
    assert t.label[4] == str(int(arrays["test_labels"][0, 0]))
    png = cv2.cvtColor(cv2.imread(str(out / "_source_images" / t.path[4])), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(png, arrays["test_images"][0])  # PNG is lossless
    assert not list((out / "_source_images").glob("*" + sources.TMP_SUFFIX))


def test_mexico_keeps_empty_dr_unknown(tmp_path):
    text = ("image,patient_id,eye,dme,dr,dr_code,width,height\n"
            "images/a.jpg,0736,OI,1,,,512,512\n"
            "images/b.jpg,0100,OD,0,none,0,512,512\n"
            "images/c.jpg,0101,od,1,NPDR,1,512,512\n")
    src = _load("mexico", tmp_path, text, label_columns=("dr",))
    assert list(src.table.label) == ["", "none", "npdr"]
    assert list(src.table.patient_id) == ["0736", "0100", "0101"]
    assert src.class_names == ["none", "npdr", "pdr"]
    spec = LabelSpec(task="multiclass")
    names = sources.resolve_class_names(spec, src)
    encoded, reasons = sources.encode_labels(src.table, spec, names)
    assert encoded == [None, 0, 1]
    assert reasons == [sources.UNKNOWN_LABEL, None, None]
    with pytest.raises(ValueError, match="label_column"):
        _load("mexico", tmp_path, text)


def test_generic_image_column_default_and_missing_columns(tmp_path):
    src = _load("generic", tmp_path, "path,id,grade\na.png,1,0\n", label_columns=("grade",))
    assert list(src.table.path) == ["a.png"]  # "path" comes before "id"
    with pytest.raises(ValueError, match="'dr_grade'"):
        _load("generic", tmp_path, "image,grade\na.png,0\n", label_columns=("dr_grade",))
    with pytest.raises(ValueError, match="--image_column"):
        _load("generic", tmp_path, "file,grade\na.png,0\n", label_columns=("grade",))
    with pytest.raises(ValueError, match="patient"):
        _load("generic", tmp_path, "image,grade\na.png,0\n", label_columns=("grade",),
              patient_column="patient")
    with pytest.raises(ValueError, match="--source"):
        sources.load_source("kaggle", SourceArgs())


@pytest.mark.parametrize("raw,spec,expected", [
        ("3", LabelSpec("dr_grade"), (3, None)),
        ("2.0", LabelSpec("dr_grade"), (2, None)),
        ("", LabelSpec("dr_grade"), (None, sources.UNKNOWN_LABEL)),
        ("3", LabelSpec("binary", positive_threshold=2), (1, None)),
        ("1", LabelSpec("binary", positive_threshold=2), (0, None)),
        ("pdr", LabelSpec("binary", label_map={"none": 0, "npdr": 1, "pdr": 1}), (1, None)),
        (("1", "0", "1"), LabelSpec("multilabel"), ((1, 0, 1), None)),
        (("1", "", "1"), LabelSpec("multilabel"), (None, sources.UNKNOWN_LABEL)),
])
def test_encode_label_golden(raw, spec, expected):
    names = ["a", "b", "c"] if spec.task == "multilabel" else (
            ["0", "1"] if spec.task == "binary" else [str(i) for i in range(5)])
    assert sources.encode_label(raw, spec, names) == expected


@pytest.mark.parametrize("raw,spec", [
        ("5", LabelSpec("dr_grade")), ("-1", LabelSpec("dr_grade")),
        ("2.5", LabelSpec("dr_grade")), ("x", LabelSpec("binary", positive_threshold=2)),
        ("severe", LabelSpec("binary", label_map={"none": 0})), ("2", LabelSpec("binary")),
        (("2", "0", "1"), LabelSpec("multilabel")),
])
def test_encode_label_rejects_out_of_range(raw, spec):
    names = ["a", "b", "c"] if spec.task == "multilabel" else (
            ["0", "1"] if spec.task == "binary" else [str(i) for i in range(5)])
    index, reason = sources.encode_label(raw, spec, names)
    assert index is None and reason and reason != sources.UNKNOWN_LABEL


def test_class_names_sorted_numerically_and_label_map(tmp_path):
    src = _load("generic", tmp_path, "image,g\na,10\nb,9\nc,2\nd,\n", label_columns=("g",))
    assert sources.resolve_class_names(LabelSpec("multiclass"), src) == ["2", "9", "10"]
    assert sources.parse_label_map("none:0, npdr:1,pdr:1") == {"none": 0, "npdr": 1, "pdr": 1}
    with pytest.raises(ValueError, match="--label_map"):
        sources.parse_label_map("none=0")
    with pytest.raises(ValueError, match="--class_names"):
        sources.resolve_class_names(LabelSpec("binary", class_names=("a", "b", "c")), src)


# ----------------------------------------------------------------------------- bad CSVs


def test_latin1_csv_names_the_file_and_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes("image,grade\na.png,0\nb\xe9.png,1\n".encode("latin-1"))
    with pytest.raises(ValueError) as e:
        sources.read_csv(str(path))
    assert str(e.value) == f"{path} line 3: not UTF-8 (byte 0xe9); save the CSV as UTF-8"


@pytest.mark.parametrize("text,message", [
        ("", "empty file (no header row)"),
        ("\n\n", "empty file (no header row)"),
        ("image,grade\na.png,0\nb.png,1,extra\n", "line 3: 3 fields, the header has 2"),
        ("image,grade,eye\na.png,0,OD\nb.png,1\n", "line 3: 2 fields, the header has 3"),
        ('image,grade\n"a.png,0\n', "line 2: unexpected end of data"),
        ('image,grade\na.png,"0"x\n', "line 2: ',' expected after '\"'"),
])
def test_empty_and_ragged_csvs_name_the_line(tmp_path, text, message):
    path = _csv(tmp_path, text)
    with pytest.raises(ValueError, match=f"^{re.escape(path)}:? {re.escape(message)}$"):
        sources.read_csv(path)


def test_bom_and_crlf_csvs_just_work(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbfimage,grade\r\na.png,0\r\n\r\nb.png,4\r\n")
    df = sources.read_csv(str(path))
    assert list(df.columns) == ["image", "grade"]
    assert df.to_dict("list") == {"image": ["a.png", "b.png"], "grade": ["0", "4"]}


def test_header_only_csv_reads_as_zero_rows(tmp_path):
    assert len(sources.read_csv(_csv(tmp_path, "image,grade\n"))) == 0  # prepare refuses it


# ----------------------------------------------------------------------------- bad label cells

BAD_CELLS = ("nan", "NaN", "inf", "-inf", "1e999", "abc", "")


@pytest.mark.parametrize("raw", BAD_CELLS)
@pytest.mark.parametrize("spec", [LabelSpec("dr_grade"), LabelSpec("binary"),
                                  LabelSpec("binary", positive_threshold=2),
                                  LabelSpec("multiclass", class_names=("none", "npdr", "pdr"))])
def test_nan_inf_empty_and_text_labels_reject_naming_value_and_column(raw, spec):
    names = spec.class_names or (["0", "1"] if spec.task == "binary" else
                                 [str(i) for i in range(5)])
    index, reason = sources.encode_label(raw, spec, names, ["level"])
    assert index is None
    if raw == "":
        assert reason == "unknown label (empty), column 'level'"
    else:
        assert reason.startswith(f"label {raw!r} ") and reason.endswith(", column 'level'")
    if raw.lower().lstrip("-") in ("nan", "inf", "1e999"):
        assert "is not a finite number" in reason


def test_multilabel_names_the_column_of_the_bad_cell():
    spec = LabelSpec("multilabel")
    assert sources.encode_label(("1", "nan", "0"), spec, "abc", ["A", "B", "C"]) == (
            None, "label 'nan' out of range (multilabel values are 0/1), column 'B'")
    assert sources.encode_label(("1", "0", ""), spec, "abc", ["A", "B", "C"]) == (
            None, "unknown label (empty), column 'C'")


def test_nan_never_becomes_a_class_name(tmp_path):
    src = _load("generic", tmp_path, "image,g\na,npdr\nb,nan\nc,none\nd,inf\n",
                label_columns=("g",))
    assert sources.resolve_class_names(LabelSpec("multiclass"), src) == ["none", "npdr"]


def test_npz_nan_and_fractional_labels_reach_encode_label(tmp_path):
    labels = np.array([[1.0], [np.nan], [2.5]])
    npz_path = tmp_path / "r.npz"
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(npz_path, train_images=images, train_labels=labels, val_images=images[:0],
             val_labels=labels[:0], test_images=images[:0], test_labels=labels[:0])
    src = sources.load_source("npz", SourceArgs(labels_csv=str(npz_path),
                                                out_dir=str(tmp_path / "out")))
    assert list(src.table.label) == ["1", "nan", "2.5"]


def test_a_class_named_inf_is_a_class_not_a_number():
    spec = LabelSpec("multiclass", class_names=("Inf", "normal"))
    assert sources.encode_label("Inf", spec, ["Inf", "normal"]) == (0, None)
    assert sources.encode_label("nan", spec, ["Inf", "normal"], ["folder"]) == (
            None, "label 'nan' is not a finite number, column 'folder'")
