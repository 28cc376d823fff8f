"""serving.exporting / export.py: SavedModel with an image-bytes signature, ONNX, model card."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from evaluation import metrics, thresholds
from input_pipeline import preprocessing
from models import build_model, heads
from serving import exporting, model_card
from tests.serving_helpers import encode, synthetic_fundus

REPO = pathlib.Path(__file__).resolve().parents[1]
VENV_BIN = pathlib.Path(sys.executable).parent
S, D = 32, 64  # model input size, dataset (prepare) image size
CLASSES = ("0", "1", "2", "3", "4")
DATASET = {
    "task": "dr_grade", "num_classes": 5, "class_names": list(CLASSES), "image_size": D,
    "preprocessing": {"crop": "fundus", "clahe": None, "ben_graham": False},
    "splits": {"train": {"num_examples": 70, "class_counts": [30, 10, 15, 10, 5]},
               "test": {"num_examples": 15, "class_counts": [6, 2, 3, 3, 1]}},
    "rows": {"read": 100, "written": 98, "rejected": 2},
}
RULE = {"type": "ordinal_cutpoints", "score": "expected_grade", "cutpoints": [0.6, 1.4, 2.5, 3.2]}


def _images() -> list[bytes]:
    """Two JPEGs and a PNG of different sizes and aspect ratios."""
    return [encode(synthetic_fundus(120, 180, radius=58, seed=0), ".jpg"),
            encode(synthetic_fundus(100, 100, radius=45, seed=1), ".png"),
            encode(synthetic_fundus(90, 120, radius=50, seed=2, brightness=0.3), ".jpg")]


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_model("resnetv2_lite", "dr_grade", 5, S)


@pytest.fixture(scope="module")
def workdir(model, tmp_path_factory) -> pathlib.Path:
    """What train + evaluate leave behind: config, dataset.json, best weights, eval/."""
    w = tmp_path_factory.mktemp("workdir")
    (w / "operative_config.gin").write_text(
        f"train.model = 'resnetv2_lite'\ntrain.image_size = {S}\ntrain.data_dir = '/data'\n")
    (w / "dataset.json").write_text(json.dumps(DATASET))
    (w / "checkpoints").mkdir()
    model.save_weights(str(w / "checkpoints" / "best.weights.h5"))
    (w / "eval").mkdir()
    (w / "eval" / "thresholds.json").write_text(json.dumps(
        {"task": "dr_grade", "head": "coral", "temperature": 1.5, "decision": RULE}))
    rng = np.random.default_rng(0)
    y, probs = rng.integers(0, 5, 40), rng.dirichlet(np.ones(5), 40)
    test = metrics.compute_metrics("dr_grade", y, probs, probs.argmax(1), CLASSES, n_boot=20)
    test.update(split="test", data_dir="/data", external=False, tta=False,
                decision_origin="tuned on the validation split of /data",
                tuned_on_evaluated_data=False)
    (w / "eval" / "metrics.json").write_text(json.dumps(test))  # as evaluate.py writes it
    return w


@pytest.fixture(scope="module")
def spec(model, workdir) -> exporting.ServingSpec:
    return exporting.spec_from_dataset(model, DATASET, workdir / "eval" / "thresholds.json")


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory) -> pathlib.Path:
    """export.py run as a user would, on the workdir."""
    base = tmp_path_factory.mktemp("export")
    done = subprocess.run([sys.executable, str(REPO / "export.py"), f"--workdir={workdir}",
                           f"--export_dir={base}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return base / "1"


def _in_memory(model, spec, images: list[bytes]) -> dict:
    """prepare's pixels (process, then the stored JPEG's model pixels) eagerly, then the
    Keras model and heads.probabilities."""
    x = np.stack([preprocessing.model_pixels(
        preprocessing.process(tf.constant(b), spec.preprocess)["image"], spec.preprocess)
        for b in images])
    logits = model(x, training=False).numpy()
    probs = heads.probabilities(logits / spec.temperature, spec.head)
    return {"probabilities": probs, "grade": thresholds.apply_rule(spec.rule, probs)}


def test_spec_reads_workdir_files(spec):
    assert spec.head == "coral" and spec.temperature == 1.5 and spec.rule == RULE
    assert spec.preprocess == preprocessing.PreprocessConfig(image_size=D, model_image_size=S)


@pytest.mark.parametrize("batch", [1, 3])
def test_saved_model_equals_in_memory_model(exported, model, spec, batch):
    images = _images()[:batch]
    signature = tf.saved_model.load(str(exported)).signatures["serving_default"]
    got = signature(image_bytes=tf.constant(images))
    want = _in_memory(model, spec, images)
    assert got["probabilities"].shape == (batch, 5) and got["probabilities"].dtype == tf.float32
    np.testing.assert_allclose(got["probabilities"].numpy(), want["probabilities"], atol=1e-4)
    assert got["grade"].dtype == tf.int32
    np.testing.assert_array_equal(got["grade"].numpy(), want["grade"])
    assert got["class_names"].numpy().tolist() == [[c.encode() for c in CLASSES]] * batch
    assert got["ok"].numpy().all() and got["error"].numpy().tolist() == [b""] * batch
    assert got["gradable"].dtype == tf.bool and got["quality"].dtype == tf.string
    assert got["field_circle"].shape == (batch, 3)


def test_bad_and_ungradable_images_in_one_batch(exported):
    signature = tf.saved_model.load(str(exported)).signatures["serving_default"]
    white = encode(np.full((80, 80, 3), 255, np.uint8), ".png")
    got = signature(image_bytes=tf.constant([_images()[0], b"not an image", white]))
    assert got["ok"].numpy().tolist() == [True, False, True]
    assert got["error"].numpy()[1] == b"not an image (unrecognised format)"
    assert got["gradable"].numpy().tolist()[1:] == [False, False]
    assert got["quality"].numpy()[2].startswith(b"no_fundus_field")
    assert np.isfinite(got["probabilities"].numpy()).all()  # ungradable: still scored


def test_tensor_signature_and_decision_rule(exported, model, spec):
    x = np.random.default_rng(0).uniform(0, 255, (4, S, S, 3)).astype(np.float32)
    got = tf.saved_model.load(str(exported)).signatures["serve_tensor"](image=x)
    probs = heads.probabilities(model(x).numpy() / 1.5, "coral")
    np.testing.assert_allclose(got["probabilities"].numpy(), probs, atol=1e-5)
    np.testing.assert_array_equal(got["grade"].numpy(), thresholds.apply_rule(RULE, probs))


def test_version_layout_and_model_card(exported):
    assert exported.name == "1" and (exported / "saved_model.pb").is_file()
    assert not list(exported.parent.glob(".tmp-*"))
    meta = json.loads((exported / exporting.METADATA_JSON).read_text())
    assert meta["decision_output"] == "grade" and meta["class_names"] == list(CLASSES)
    card = (exported / "model_card.md").read_text()
    assert model_card.NOTICE in card and "ordinal_cutpoints" in card and "| train | 70 |" in card
    assert "**Split `test`**: 40 images" in card and "| qwk |" in card  # metrics, intervals
    assert "image-level" in card and "patient-level" not in card  # no patient ids given
    assert "Test-time augmentation: off" in card and meta["tta"] is False
    assert exporting.next_version(exported.parent) == 2


# Run in a clean interpreter: the project's packages cannot be imported there (an
# editable install would otherwise put them on the path), so loading and serving the
# SavedModel must not need them.
_WITHOUT_PROJECT = """
import sys
PROJECT = {"input_pipeline", "models", "training", "evaluation", "serving", "benchmarks",
           "train", "evaluate", "export", "predict"}

class NoProject:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT:
            raise ImportError(f"project module {name} imported")

sys.meta_path.insert(0, NoProject())
try:
    import serving  # noqa: F401
    sys.exit("the project is importable")
except ImportError:
    pass
import tensorflow as tf
f = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
out = f(image_bytes=tf.constant([open(sys.argv[2], "rb").read()]))
print(sorted(out), out["probabilities"].shape)
"""


def test_loads_in_plain_python_without_the_project(exported, tmp_path):
    """A clean interpreter (-I: no PYTHONPATH, no cwd on sys.path) outside the repo, with
    the project's modules unimportable."""
    code = _WITHOUT_PROJECT
    image = tmp_path / "x.jpg"
    image.write_bytes(_images()[0])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", code, str(exported), str(image)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("['class_names', 'error', 'field_circle', 'gradable', 'grade', 'ok', "
            "'probabilities', 'quality'] (1, 5)") in done.stdout


def test_saved_model_cli_shows_signature(exported):
    done = subprocess.run([str(VENV_BIN / "saved_model_cli"), "show", "--dir", str(exported),
                           "--tag_set", "serve", "--signature_def", "serving_default"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "inputs['image_bytes']" in out and "DT_STRING" in out and "shape: (-1)" in out
    for name in ("probabilities", "grade", "class_names", "ok", "error", "gradable",
                 "quality", "field_circle"):
        assert f"outputs['{name}']" in out


def test_refuses_lab_clahe_dataset(model):
    info = {**DATASET, "preprocessing": {"crop": "fundus", "clahe": "lab"}}
    with pytest.raises(ValueError, match="CLAHE"):
        exporting.spec_from_dataset(model, info)


def test_green_clahe_dataset_exports_with_clahe_in_the_graph(model, tmp_path):
    info = {**DATASET, "preprocessing": {"crop": "fundus", "clahe": "green",
                                         "clahe_clip_limit": 2.0, "clahe_tile_grid": 8}}
    spec = exporting.spec_from_dataset(model, info)
    plain = exporting.spec_from_dataset(model, DATASET)
    out = exporting.write_saved_model(model, spec, tmp_path, version=1)
    images = tf.constant(_images())
    got = tf.saved_model.load(str(out)).signatures["serving_default"](image_bytes=images)
    want = exporting.in_memory_predictor(model, spec)(images)
    without = exporting.in_memory_predictor(model, plain)(images)
    np.testing.assert_allclose(got["probabilities"].numpy(), want["probabilities"].numpy(),
                               atol=1e-4)
    assert not np.allclose(want["probabilities"].numpy(), without["probabilities"].numpy(),
                           atol=1e-4)  # CLAHE is really in the graph
    card = model_card.model_card(spec, info)
    assert "CLAHE on the green channel" in card and "`gradable` is false" in card


def test_existing_version_is_not_overwritten(exported, model, spec):
    with pytest.raises(FileExistsError):
        exporting.write_saved_model(model, spec, exported.parent, version=1)


@pytest.mark.parametrize("task,classes,rule_type,out", [
    ("multilabel", 3, "per_class_thresholds", "labels"),
    ("binary", 2, "binary_threshold", "class_id"),
    ("multiclass", 4, "argmax", "class_id"),
])
def test_decision_outputs_per_task(task, classes, rule_type, out):
    net = build_model("resnetv2_lite", task, classes, S)
    info = {**DATASET, "task": task, "num_classes": classes,
            "class_names": [f"c{i}" for i in range(classes)]}
    spec = exporting.spec_from_dataset(net, info)
    assert spec.rule["type"] == rule_type and spec.decision_name == out
    got = exporting.in_memory_predictor(net, spec)(tf.constant(_images()[:2]))
    probs = got["probabilities"].numpy()
    np.testing.assert_array_equal(got[out].numpy(), thresholds.apply_rule(spec.rule, probs))
    assert got[out].shape == ((2, classes) if task == "multilabel" else (2,))


def test_mixed_precision_model_is_exported_in_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = build_model("resnetv2_lite", "binary", 2, S)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    twin = exporting.as_float32(mixed)
    assert twin is not mixed
    assert all(not layer.dtype_policy.name.startswith("mixed") for layer in twin.layers)
    x = np.random.default_rng(1).uniform(0, 255, (2, S, S, 3)).astype(np.float32)
    np.testing.assert_allclose(twin(x).numpy(), mixed(x).numpy().astype(np.float32), atol=0.05)


def _card_metrics(split: str, patient_ids, **scope) -> dict:
    rng = np.random.default_rng(1)
    y, probs = rng.integers(0, 5, 20), rng.dirichlet(np.ones(5), 20)
    m = metrics.compute_metrics("dr_grade", y, probs, probs.argmax(1), CLASSES,
                                patient_ids=patient_ids, n_boot=10)
    return {**m, "split": split, "tta": False, **scope}


def test_model_card_names_split_optimism_and_ci_level(spec):
    on_val = _card_metrics("val", [f"p{i // 2}" for i in range(20)],
                           tuned_on_evaluated_data=True)
    card = model_card.model_card(spec, DATASET, on_val)
    assert "**Split `val`**: 20 images, 10 patients." in card
    assert "Optimistic: the temperature and the decision rule were tuned on this same" in card
    assert "95% CI (patient-level bootstrap)" in card and "test split" not in card
    no_ids = _card_metrics("test", [""] * 20)
    external = _card_metrics("test", None, external=True, data_dir="/ext/aptos",
                             decision_origin="read from W/eval/thresholds.json")
    card = model_card.model_card(spec, DATASET, no_ids, external=[external])
    assert "**Split `test`**: 20 images, no patient ids" in card and "Optimistic" not in card
    assert "95% CI (image-level bootstrap)" in card and "patient-level" not in card
    assert "External validation: split `test` of /ext/aptos" in card
    assert "none of them was tuned on the evaluated data" in card


def test_tta_from_thresholds_json_is_served(model, workdir, tmp_path):
    """thresholds.json with tta=true: the graph averages the flips, as evaluate.py did."""
    (tmp_path / "thresholds.json").write_text(json.dumps(
        {"task": "dr_grade", "head": "coral", "temperature": 1.5, "decision": RULE,
         "tta": True}))
    tta_spec = exporting.spec_from_dataset(model, DATASET, tmp_path / "thresholds.json")
    assert tta_spec.tta and tta_spec.to_json()["tta"] is True
    assert "Test-time augmentation: on" in model_card.model_card(tta_spec, DATASET)
    x = np.random.default_rng(2).uniform(0, 255, (3, S, S, 3)).astype(np.float32)
    views = [x, x[:, :, ::-1], x[:, ::-1]]  # identity, horizontal and vertical flips
    logits = np.mean([model(v, training=False).numpy() for v in views], axis=0)
    probs = heads.probabilities(logits / 1.5, "coral")
    got = tf.function(exporting.tensor_fn(model, tta_spec))(tf.constant(x))
    np.testing.assert_allclose(got["probabilities"].numpy(), probs, atol=1e-5)
    np.testing.assert_array_equal(got["grade"].numpy(), thresholds.apply_rule(RULE, probs))
    one_view = dataclasses.replace(tta_spec, tta=False)
    single = tf.function(exporting.tensor_fn(model, one_view))(tf.constant(x))
    assert not np.allclose(single["probabilities"].numpy(), probs, atol=1e-5)


def test_predictor_on_workdir_equals_predictor_on_export(workdir, exported):
    """Predictor.load takes either; the in-memory graph and the SavedModel give the same rows."""
    from serving import Predictor

    photos = [synthetic_fundus(90, 120, radius=44, seed=s) for s in range(3)]
    from_workdir = Predictor.load(workdir).predict(photos)
    from_export = Predictor.load(exported).predict(photos)
    assert list(from_workdir.columns) == list(from_export.columns)
    assert (from_workdir["error"] == "").all()
    probs = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(from_workdir[probs].to_numpy(), from_export[probs].to_numpy(),
                               atol=1e-5)
    assert from_workdir["grade"].tolist() == from_export["grade"].tolist()
