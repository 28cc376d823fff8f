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
    # A missing path is kept (it gets an error row), not raised.
    assert predicting.find_images([folder / "missing.jpg"]) == [folder / "missing.jpg"]


def test_missing_paths_and_broken_symlinks_get_error_rows(folder, tmp_path):
    links = tmp_path / "links"
    links.mkdir()
    (links / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    (links / "loop.png").symlink_to(links / "loop.png")
    (links / "ok.jpg").symlink_to(folder / "a.jpg")
    (links / "dir.jpg").symlink_to(folder)  # a folder named like an image: not walked
    found = predicting.find_images([links, folder / "missing.jpg", folder / "b.png"])
    assert [p.name for p in found] == ["dangling.jpg", "loop.png", "ok.jpg", "missing.jpg",
                                       "b.png"]
    reasons = {}
    for path in found:
        try:
            predicting.read_for_serving(path)
            reasons[path.name] = ""
        except predicting.InputError as e:
            reasons[path.name] = str(e)
    assert reasons == {"dangling.jpg": f"dangling symlink (its target {tmp_path / 'gone.jpg'} "
                                       "does not exist)",
                       "loop.png": "symlink loop", "ok.jpg": "", "missing.jpg": "no such file",
                       "b.png": ""}


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


@pytest.fixture(scope="module")
def exported(model_and_spec, tmp_path_factory) -> pathlib.Path:
    return exporting.write_saved_model(*model_and_spec, tmp_path_factory.mktemp("export"))


def _predict_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_with_exported_model(folder, model_and_spec, exported, tmp_path):
    out = tmp_path / "preds.csv"
    out.write_text("an earlier run\n")  # replaced: --overwrite
    missing = folder / "missing.jpg"  # one missing argument does not abort the others
    done = _predict_cli(f"--model={exported}", f"--out={out}", "--overwrite", "--batch_size=4",
                        str(folder), str(missing))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3 predicted, 5 errors" in done.stdout
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["path", *[f"p_{c}" for c in CLASSES], "grade",
                                     "class_name", "gradable", "quality", "error"]
        rows = list(reader)
    assert rows[-1]["path"] == str(missing) and rows[-1]["error"] == "no such file"
    _check_rows(rows[:-1], predicting.from_model(*model_and_spec))


def test_cli_refuses_existing_out_without_overwrite(folder, exported, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("image,dr_grade\na.jpg,2\n")
    done = _predict_cli(f"--model={exported}", f"--out={labels}", str(folder / "a.jpg"))
    assert done.returncode != 0
    assert f"--out={labels} exists; pass --overwrite" in done.stderr
    assert labels.read_text() == "image,dr_grade\na.jpg,2\n"  # untouched


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


def test_predictor_api_paths_and_arrays(folder, exported, tmp_path):
    from serving import Predictor

    predictor = Predictor.load(exported)
    image = synthetic_fundus(90, 120, radius=44, seed=5)
    png = tmp_path / "photo.png"
    png.write_bytes(encode(image, ".png"))  # lossless: the same pixels as `image`
    bad = np.zeros((4, 4), np.float32)
    frame = predictor.predict([png, image, bad, folder / "empty.png"], batch_size=3)
    assert list(frame.columns) == predicting.columns(predictor)
    assert frame["path"].tolist() == [str(png), "array[1]", "array[2]",
                                      str(folder / "empty.png")]
    assert frame["error"].tolist() == [
        "", "", "expected a uint8 RGB array [H, W, 3], got float32 [4, 4]", "empty file (0 bytes)"]
    probs = frame[[f"p_{c}" for c in CLASSES]].to_numpy(np.float64)
    np.testing.assert_array_equal(probs[0], probs[1])
    assert np.isnan(probs[2:]).all() and abs(probs[0].sum() - 1) < 1e-4
    assert str(frame["grade"].dtype) == "Int64" and frame["grade"].isna().tolist() == [
        False, False, True, True]
    assert frame["class_name"][0] == CLASSES[frame["grade"][0]]
    batch = predictor.predict(np.stack([image, image]))  # [N, H, W, 3]: N photographs
    np.testing.assert_array_equal(batch[[f"p_{c}" for c in CLASSES]].to_numpy(), probs[:2])
    with pytest.raises(FileNotFoundError, match="neither an exported model"):
        Predictor.load(tmp_path)
