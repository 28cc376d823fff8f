"""serving.predicting / predict.py: CSV predictions that survive bad files."""

import csv
import pathlib
import subprocess
import sys

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from models import build_model
from serving import exporting, predicting
from tests.serving_helpers import encode, synthetic_fundus

REPO = pathlib.Path(__file__).resolve().parents[1]
S = 32
CLASSES = ("0", "1", "2", "3", "4")
DATASET = {"task": "dr_grade", "num_classes": 5, "class_names": list(CLASSES),
           "image_size": 64, "preprocessing": {"crop": "fundus"}}
# JPEG magic and end marker, but no valid marker structure inside.
CORRUPT_JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"


@pytest.fixture(scope="module")
def model_and_spec():
    keras.utils.set_random_seed(0)
    model = build_model("resnetv2_lite", "dr_grade", 5, S)
    return model, exporting.spec_from_dataset(model, DATASET)


@pytest.fixture
def folder(tmp_path) -> pathlib.Path:
    """Good images (JPEG, PNG, TIFF in a sub-folder) mixed with bad files."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "a.jpg").write_bytes(encode(synthetic_fundus(90, 120, radius=44, seed=0), ".jpg"))
    (root / "b.png").write_bytes(encode(synthetic_fundus(80, 80, radius=36, seed=1), ".png"))
    tiff = cv2.cvtColor(synthetic_fundus(70, 90, radius=33, seed=2), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(root / "sub" / "c.tif"), tiff)
    (root / "sub" / "corrupt.jpg").write_bytes(CORRUPT_JPEG)
    (root / "empty.png").write_bytes(b"")
    (root / "text.jpeg").write_text("not an image\n")
    good = encode(synthetic_fundus(90, 120, radius=44, seed=3), ".jpg")
    (root / "sub" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "notes.txt").write_text("skipped: not an image extension\n")
    return root


BAD = {"corrupt.jpg": "corrupt JPEG data", "empty.png": "empty file",
       "text.jpeg": "not an image", "truncated.jpg": "truncated JPEG"}


def test_find_images_recursive(folder):
    names = [p.name for p in predicting.find_images([folder])]
    assert names == ["a.jpg", "b.png", "empty.png", "c.tif", "corrupt.jpg", "truncated.jpg",
                     "text.jpeg"]  # sorted by path: sub/ before text.jpeg
    assert predicting.find_images([folder / "notes.txt"]) == [folder / "notes.txt"]
    with pytest.raises(FileNotFoundError):
        predicting.find_images([folder / "missing.jpg"])


def _check_rows(rows: list[dict], predictor) -> None:
    by_name = {pathlib.Path(r["path"]).name: r for r in rows}
    assert len(rows) == 7
    for name, reason in BAD.items():
        assert reason in by_name[name]["error"], by_name[name]
        assert by_name[name]["grade"] == "" and by_name[name]["p_0"] == ""
        assert by_name[name]["gradable"] == ""
    for name in ("a.jpg", "b.png", "c.tif"):
        row = by_name[name]
        assert row["error"] == ""
        # Fields of ~88 px diameter: below the 224 px minimum of a gradable image.
        assert (row["gradable"], row["quality"]) == ("false", "small_field")
        probs = np.array([float(row[f"p_{c}"]) for c in CLASSES])
        assert abs(probs.sum() - 1) < 1e-4
        alone = predictor([predicting.read_for_serving(pathlib.Path(row["path"]))])
        np.testing.assert_allclose(probs, alone["probabilities"][0], atol=1e-5)
        assert int(row["grade"]) == alone["grade"][0]
        assert row["class_name"] == CLASSES[int(row["grade"])]


def test_bad_files_get_errors_and_the_rest_is_predicted(folder, model_and_spec):
    predictor = predicting.from_model(*model_and_spec)
    files = predicting.find_images([folder])
    # batch_size 3: the corrupt JPEG shares a graph call with good images.
    rows = predicting.predict_files(predictor, files, batch_size=3, progress=False)
    _check_rows(rows, predictor)


def test_gradcam_overlays(folder, model_and_spec, tmp_path):
    predictor = predicting.from_model(*model_and_spec)
    files = [folder / "a.jpg", folder / "empty.png", folder / "b.png"]
    predicting.predict_files(predictor, files, batch_size=4, gradcam_dir=tmp_path / "cam",
                             progress=False)
    written = sorted(p.name for p in (tmp_path / "cam").iterdir())
    assert written == ["00000_a.png", "00002_b.png"]
    overlay = cv2.imread(str(tmp_path / "cam" / "00000_a.png"))
    assert overlay.shape == (S, S, 3)


def test_cli_with_exported_model(folder, model_and_spec, tmp_path):
    version = exporting.write_saved_model(*model_and_spec, tmp_path / "export")
    out = tmp_path / "preds.csv"
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), f"--model={version}",
                           f"--out={out}", "--batch_size=4", str(folder)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 predicted, 4 errors" in done.stdout
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", *[f"p_{c}" for c in CLASSES], "grade",
                                     "class_name", "gradable", "quality", "error"]
        rows = list(reader)
    _check_rows(rows, predicting.from_model(*model_and_spec))


def test_multilabel_rows_join_present_labels():
    predictor = predicting.Predictor(
        fn=lambda b: {"probabilities": tf.constant([[0.9, 0.2, 0.7]]),
                      "labels": tf.constant([[1, 0, 1]]), "ok": tf.constant([True]),
                      "gradable": tf.constant([True]), "quality": tf.constant([""])},
        task="multilabel", class_names=("dme", "dr", "amd"), decision_name="labels")
    row = predicting._row(pathlib.Path("x.png"), predictor,
                          {k: v[0] for k, v in predictor([b""]).items()})
    assert row["labels"] == "dme;amd" and row["p_dr"] == "0.200000" and row["error"] == ""
    assert row["gradable"] == "true" and row["quality"] == ""
    assert predicting.columns(predictor) == ["path", "p_dme", "p_dr", "p_amd", "labels",
                                             "gradable", "quality", "error"]
