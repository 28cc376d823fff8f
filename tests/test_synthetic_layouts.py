"""Synthetic source layouts are read by their adapters with the labels that were drawn."""

import pandas as pd
import pytest

from input_pipeline import sources, synthetic, synthetic_layouts

N, SIZE = 8, 64


def _source(layout, tmp_path, multilabel=False, **kw):
    written = synthetic_layouts.write_layout(layout, tmp_path / layout, N, SIZE, seed=3)
    args = sources.SourceArgs(labels_csv=written.labels_csv or None,
                              images_dir=written.images_dir, multilabel=multilabel, **kw)
    return sources.load_source(written.source, args)


def _truth():
    return [synthetic.make_example(i, SIZE, 3)[1] for i in range(N)]


@pytest.mark.parametrize("layout", ["eyepacs", "idrid"])
def test_grading_layouts_carry_the_drawn_grade(layout, tmp_path):
    src = _source(layout, tmp_path)
    assert list(src.table["label"]) == [str(r["dr_grade"]) for r in _truth()]
    paths = [src.images_dir + "/" + p for p in src.table["path"]]
    assert all(pd.io.common.file_exists(p) for p in paths)
    if layout == "eyepacs":  # both eyes of a patient share the EyePACS patient number
        assert src.table["patient_id"][0] == src.table["patient_id"][1] != ""


def test_rfmid_layout_has_the_45_disease_columns(tmp_path):
    src = _source("rfmid", tmp_path, multilabel=True)
    assert src.label_columns == list(synthetic_layouts.RFMID_DISEASES)
    truth = _truth()
    dr = src.label_columns.index("DR")
    assert [int(y[dr]) for y in src.table["label"]] == [int(r["dr_grade"] >= 1) for r in truth]
    tsln = src.label_columns.index("TSLN")
    assert [int(y[tsln]) for y in src.table["label"]] == [r["tessellation"] for r in truth]


def test_odir_layout_one_row_per_patient_two_eyes(tmp_path):
    src = _source("odir", tmp_path, multilabel=True)
    assert len(src.table) == N and src.label_columns == list(sources.ODIR_LABELS)
    truth = _truth()
    for p in range(N // 2):
        expected = synthetic_layouts.odir_labels([truth[2 * p + 1], truth[2 * p]])
        assert src.table["label"][2 * p] == tuple(str(expected[k]) for k in sources.ODIR_LABELS)
    assert src.table["path"][0].endswith("_left.jpg")


def test_kermany_layout_folders_splits_and_patients(tmp_path):
    written = synthetic_layouts.write_layout("kermany", tmp_path / "k", 48, SIZE, seed=0)
    src = sources.load_source("folders", sources.SourceArgs(images_dir=written.images_dir))
    assert src.class_names == list(synthetic_layouts.OCT_CLASSES)
    by_split = src.table.groupby("split")["label"].apply(set).to_dict()
    assert by_split == {s: set(synthetic_layouts.OCT_CLASSES) for s in ("train", "val", "test")}
    # Two scans per patient, in one class folder and one split.
    assert src.table.groupby("patient_id")[["label", "split"]].nunique().max().tolist() == [1, 1]


def test_oct_classes_differ_where_their_lesions_are():
    import cv2
    import numpy as np

    s = 96
    scans = {c: synthetic_layouts.render_oct(np.random.default_rng(0), s, c)
             for c in synthetic_layouts.OCT_CLASSES}
    assert all(x.shape == (s, s) and x.dtype == np.uint8 for x in scans.values())

    def rpe_rows(img):  # the RPE is the brightest row of each column
        return np.argmax(cv2.GaussianBlur(img.astype(np.float32), (0, 0), 2.0), axis=0)

    def top_rows(img):  # first row of the retina (inner surface) in each column
        smooth = cv2.GaussianBlur(img.astype(np.float32), (0, 0), 2.0)
        return np.argmax(smooth > 60, axis=0)

    # Same seed, same retina shape: CNV lifts the RPE, DME thickens the centre upwards.
    assert (rpe_rows(scans["NORMAL"]) - rpe_rows(scans["CNV"])).max() >= 4
    centre = slice(s // 2 - 5, s // 2 + 5)
    assert (top_rows(scans["NORMAL"])[centre] - top_rows(scans["DME"])[centre]).mean() >= 4
    with pytest.raises(ValueError, match="label must be one of"):
        synthetic_layouts.render_oct(np.random.default_rng(0), s, "AMD")


def test_rfmid_odir_source_maps_both_into_ocunet_labels(tmp_path):
    rf = synthetic_layouts.write_layout("rfmid", tmp_path / "rf", N, SIZE, seed=3)
    od = synthetic_layouts.write_layout("odir", tmp_path / "od", N, SIZE, seed=3)
    args = sources.SourceArgs(labels_csv=f"{rf.labels_csv},{od.labels_csv}",
                              images_dir=f"{rf.images_dir},{od.images_dir}", multilabel=True)
    src = sources.load_source("rfmid_odir", args)
    names = list(sources.OCUNET_LABELS)
    assert src.label_columns == names and len(names) == 30 and len(src.table) == 2 * N
    truth = _truth()
    rows = [dict(zip(names, y, strict=True)) for y in src.table["label"]]
    for r, t in zip(rows[:N], truth, strict=True):  # RFMiD part, image order
        assert r["DR"] == str(int(t["dr_grade"] >= 1))
        assert r["NORMAL"] == str(1 - int(r["Disease_Risk"])) and r["CATARACT"] == "0"
    odir_rows = rows[N:]  # left eye first: image 1 of patient 0
    expected = synthetic_layouts.odir_labels([truth[1], truth[0]])
    assert odir_rows[0]["GLAUCOMA"] == str(expected["G"])
    assert odir_rows[0]["Disease_Risk"] == str(1 - expected["N"])
    assert set(src.table["patient_id"][N:]) == {f"odir:{p + 1}" for p in range(N // 2)}
    with pytest.raises(ValueError, match="two comma-separated values"):
        sources.load_source("rfmid_odir", sources.SourceArgs(
            labels_csv=rf.labels_csv, images_dir=rf.images_dir, multilabel=True))
    with pytest.raises(ValueError, match="multilabel"):
        sources.load_source("rfmid_odir", sources.SourceArgs(labels_csv=args.labels_csv,
                                                             images_dir=args.images_dir))
