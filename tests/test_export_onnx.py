"""serving.onnx_export (slow: tf2onnx conversions): tensor-in model checked against Keras."""

import json

import keras
import numpy as np
import pytest

from models import build_model, heads
from serving import exporting, onnx_export
from tests.test_export import CLASSES, DATASET, S

pytest.importorskip("tf2onnx")
ort = pytest.importorskip("onnxruntime")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnetv2_lite", "mobilenetv3_large"])
def test_onnx_matches_keras(name, tmp_path):
    net = build_model(name, "dr_grade", 5, S)
    spec = exporting.spec_from_dataset(net, DATASET)
    out = onnx_export.write_onnx(net, spec, tmp_path, version=3)
    assert out == tmp_path / "3"
    pre = json.loads((out / onnx_export.PREPROCESSING_JSON).read_text())
    assert pre["input"]["shape"] == [None, S, S, 3] and pre["class_names"] == list(CLASSES)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).uniform(0, 255, (3, S, S, 3)).astype(np.float32)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {session.get_inputs()[0].name: x}), strict=True))
    want = net(x).numpy()
    assert np.abs(got["logits"] - want).max() / np.abs(want).max() < 1e-4
    np.testing.assert_allclose(got["probabilities"], heads.probabilities(want, "coral"),
                               atol=1e-5)


@pytest.mark.slow
def test_onnx_friendly_clone_converts_grouped_conv_and_gelu(tmp_path):
    """ConvNeXt's two tf2onnx blockers, in a tiny model: a depthwise grouped Conv2D and GELU."""
    inp = keras.Input((S, S, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    x = keras.layers.Conv2D(8, 7, padding="same", groups=8, name="dw")(x)
    x = keras.layers.Activation("gelu", name="act")(x)
    backbone = keras.Model(inp, x, name="backbone")
    image = keras.Input((S, S, 3), name="image")
    feats = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(image))
    net = keras.Model(image, keras.layers.Dense(2, name="logits")(feats))
    clone = onnx_export.onnx_friendly(net)
    kinds = {type(layer).__name__ for layer in exporting.all_layers(clone)}
    assert {"DepthwiseConv2D", "ErfGelu"} <= kinds and "Activation" not in kinds
    x = np.random.default_rng(3).uniform(0, 255, (2, S, S, 3)).astype(np.float32)
    np.testing.assert_allclose(clone(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-5)
    info = {**DATASET, "task": "multiclass", "num_classes": 2, "class_names": ["a", "b"]}
    out = onnx_export.write_onnx(net, exporting.spec_from_dataset(net, info), tmp_path)
    assert (out / "model.onnx").is_file()  # write_onnx checked it against Keras


@pytest.mark.slow
def test_onnx_reproduces_tta_when_the_rule_was_tuned_with_it(tmp_path):
    """thresholds.json tta=true: the ONNX graph averages the flips too (served = evaluated)."""
    import dataclasses

    net = build_model("resnetv2_lite", "dr_grade", 5, S)
    spec = dataclasses.replace(exporting.spec_from_dataset(net, DATASET), tta=True)
    out = onnx_export.write_onnx(net, spec, tmp_path, version=1)
    assert json.loads((out / onnx_export.PREPROCESSING_JSON).read_text())["tta"] is True
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).uniform(0, 255, (2, S, S, 3)).astype(np.float32)
    got = dict(zip([o.name for o in session.get_outputs()],
                   session.run(None, {session.get_inputs()[0].name: x}), strict=True))
    want = np.mean([net(v).numpy() for v in (x, x[:, :, ::-1], x[:, ::-1])], axis=0)
    assert np.abs(got["logits"] - want).max() / np.abs(want).max() < 1e-4
