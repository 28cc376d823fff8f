"""serving.tflite_export / export.py --format=tflite: the tensor-in model in tf.lite.Interpreter."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import features
from models import build_model
from serving import exporting, tflite_export
from tests.serving_helpers import encode, synthetic_fundus
from tests.test_export import CLASSES, DATASET, RULE, S

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_and_spec():
    """A CORN model (its probabilities once needed Cumprod, which TFLite lacks), tuned rule."""
    keras.utils.set_random_seed(0)
    model = build_model("resnetv2_lite", "dr_grade", 5, S, head="corn")
    spec = exporting.spec_from_dataset(model, DATASET)
    assert spec.head == "corn"
    return model, dataclasses.replace(spec, rule=RULE, temperature=1.5)


@pytest.fixture(scope="module")
def coral_model() -> keras.Model:
    """The workdir's model: CORAL, whose int8 probabilities need a float concatenation."""
    keras.utils.set_random_seed(1)
    return build_model("resnetv2_lite", "dr_grade", 5, S)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """float32 [6, S, S, 3] in [0, 255]: synthetic fundus photographs at the model size."""
    return np.stack([synthetic_fundus(S, S, radius=S / 2 - 1, seed=i, brightness=0.5 + 0.1 * i)
                     for i in range(6)]).astype(np.float32)


@pytest.fixture(scope="module")
def saved_model(model_and_spec, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tensor_saved_model")
    tflite_export.write_tensor_saved_model(*model_and_spec, path)
    return path


def test_float32_and_float16_match_serve_tensor(model_and_spec, images, saved_model):
    model, spec = model_and_spec
    want = {k: keras.ops.convert_to_numpy(v)
            for k, v in exporting.tensor_fn(model, spec)(images).items()}
    sizes = {}
    for quantization, atol in (("float32", 1e-5), ("float16", 1e-2)):
        content = tflite_export.convert(saved_model, quantization)
        sizes[quantization] = len(content)
        got = tflite_export.TFLiteModel(content)(images)
        assert set(got) == {"probabilities", "grade"}
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=atol)
        np.testing.assert_array_equal(got["grade"], want["grade"])
    assert sizes["float16"] < 0.6 * sizes["float32"]  # float16 weights: half the bytes


def test_unknown_quantization_and_int8_without_images_are_refused(saved_model):
    with pytest.raises(ValueError, match="Unknown quantization 'int4'"):
        tflite_export.convert(saved_model, "int4")
    with pytest.raises(ValueError, match="int8 quantization needs representative images"):
        tflite_export.convert(saved_model, "int8")


@pytest.fixture(scope="module")
def workdir(coral_model, tmp_path_factory) -> pathlib.Path:
    """A trained workdir whose data_dir holds one train shard (int8 calibration images)."""
    root = tmp_path_factory.mktemp("tflite_workdir")
    data = root / "prepared"
    data.mkdir()
    with tf.io.TFRecordWriter(str(data / "train-00000-of-00001.tfrecord")) as writer:
        for i in range(12):
            png = encode(synthetic_fundus(DATASET["image_size"], DATASET["image_size"],
                                          radius=30, seed=10 + i))
            writer.write(features.serialize_example(png, i % 5, height=DATASET["image_size"],
                                                    width=DATASET["image_size"]))
    # prepare lists its shards in dataset.json; readers take that list, never a glob.
    listed = {**DATASET, "splits": {"train": {"num_examples": 12,
                                              "files": ["train-00000-of-00001.tfrecord"]}}}
    (data / "dataset.json").write_text(json.dumps(listed))
    w = root / "run"
    (w / "checkpoints").mkdir(parents=True)
    (w / "operative_config.gin").write_text(
        f"train.model = 'resnetv2_lite'\ntrain.image_size = {S}\ntrain.data_dir = '{data}'\n")
    (w / "dataset.json").write_text(json.dumps(DATASET))
    coral_model.save_weights(str(w / "checkpoints" / "best.weights.h5"))
    return w


def test_export_py_int8_loads_in_interpreter_and_agrees(workdir, coral_model, images):
    out_base = workdir.parent / "export"
    done = subprocess.run([sys.executable, str(REPO / "export.py"), f"--workdir={workdir}",
                           f"--export_dir={out_base}", "--format=tflite",
                           "--tflite_quantization=int8"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    version = out_base / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.tflite", "model_card.md",
                                                         "preprocessing.json"]
    pre = json.loads((version / "preprocessing.json").read_text())
    assert pre["quantization"] == "int8" and pre["class_names"] == list(CLASSES)
    assert pre["input"]["shape"] == [None, S, S, 3] and pre["signature"] == "serve_tensor"
    assert "`model.tflite`" in (version / "model_card.md").read_text()
    # No thresholds.json in this workdir: the untuned rule, temperature 1.
    model = coral_model
    spec = exporting.spec_from_dataset(model, DATASET)
    assert spec.head == "coral"
    want = exporting.tensor_fn(model, spec)(images)["probabilities"]
    got = tflite_export.TFLiteModel(version / "model.tflite")(images)
    assert got["grade"].dtype == np.int32 and got["grade"].shape == (len(images),)
    # int8 probabilities come in steps of about 1/256, so their sum is only near 1.
    np.testing.assert_allclose(got["probabilities"].sum(-1), 1.0, atol=0.02)
    # int8 is an approximation; its agreement on a trained model is a benchmark
    # (benchmarks/tflite_agreement.py). Here: close on this untrained one.
    assert np.abs(got["probabilities"] - keras.ops.convert_to_numpy(want)).max() < 0.05
    # int8 weights: about a byte per parameter (float32 would be four).
    assert (version / "model.tflite").stat().st_size < 2 * model.count_params()
