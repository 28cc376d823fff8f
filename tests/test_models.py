"""Registry, backbones, heads and decoding (models/registry.py, backbones.py, heads.py)."""

import gin
import keras
import numpy as np
import pytest
from keras import ops

from models import build_model, heads, list_models, register
from models.backbones import INPUT_SCALING

S = 32  # every backbone accepts 32 px (keras.applications' minimum)
BUILTINS = ["convnext_tiny", "efficientnet_b3", "mobilenetv3_large", "resnet50v2", "resnetv2_lite"]
TASK_HEADS = [(task, head) for task, hs in heads.HEADS.items() for head in hs]
FEATURE_CHANNELS = {
    "convnext_tiny": 768,
    "efficientnet_b3": 1536,
    "mobilenetv3_large": 960,
    "resnet50v2": 2048,
    "resnetv2_lite": 64,
}


@pytest.fixture(autouse=True)
def _fresh_session():
    yield
    keras.backend.clear_session()


def _pixels(n=2, size=S, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _logit(p):
    p = np.asarray(p, dtype="float64")
    return (np.log(p) - np.log1p(-p)).astype("float32")


# ----------------------------------------------------------------------------- registry


def test_list_models_has_builtins():
    assert set(BUILTINS) <= set(list_models())
    assert set(INPUT_SCALING) == set(BUILTINS)  # every built-in states its input scaling


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("task,head", TASK_HEADS)
def test_every_model_every_head(name, task, head):
    num_classes = 2 if task == "binary" else 5
    model = build_model(name, task, num_classes, S, head=head)
    out = model(_pixels(), training=False)
    expected = heads.output_dim(task, num_classes, head)
    assert tuple(out.shape) == (2, expected)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert np.all(np.isfinite(ops.convert_to_numpy(out)))
    backbone = model.get_layer("backbone")
    assert isinstance(backbone, keras.Model)
    assert backbone.output.shape[-1] == FEATURE_CHANNELS[name]


def test_model_structure_and_default_heads():
    model = build_model("resnetv2_lite", "dr_grade", 5, S)
    names = [layer.name for layer in model.layers]
    assert names == ["image", "backbone", "gap", "dropout", "logits"]
    assert isinstance(model.get_layer("logits"), heads.CoralDense)
    assert model.output.shape == (None, 4)
    assert heads.default_head("binary") == "sigmoid"
    assert heads.default_head("multiclass") == "softmax"
    assert heads.default_head("multilabel") == "sigmoid"
    # Backbone output is its last conv feature map (S / 32 = 1 here), not pooled.
    assert model.get_layer("backbone").output.shape == (None, 1, 1, 64)


def test_output_dims():
    assert heads.output_dim("binary", 2, "sigmoid") == 1
    assert heads.output_dim("binary", 2, "softmax") == 2
    assert heads.output_dim("multiclass", 7) == 7
    assert heads.output_dim("dr_grade", 5, "coral") == 4
    assert heads.output_dim("dr_grade", 5, "corn") == 4
    assert heads.output_dim("dr_grade", 5, "softmax") == 5
    assert heads.output_dim("multilabel", 28) == 28


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError, match="known models:.*resnetv2_lite"):
        build_model("no_such_net", "binary", 2, S)


def test_bad_task_and_head_raise():
    with pytest.raises(ValueError, match="Unknown task"):
        build_model("resnetv2_lite", "regression", 2, S)
    with pytest.raises(ValueError, match="does not fit"):
        build_model("resnetv2_lite", "multiclass", 3, S, head="coral")


def test_register_custom_backbone():
    @register("tiny_test_net")
    def tiny_test_net(image_size, weights=None):
        x = keras.Input((image_size, image_size, 3))
        y = keras.layers.Conv2D(3, 3, strides=4, name="c")(x)
        return keras.Model(x, y, name="backbone")

    assert "tiny_test_net" in list_models()
    model = build_model("tiny_test_net", "multilabel", 3, 16)
    assert model(_pixels(size=16)).shape == (2, 3)


def test_mixed_bfloat16_outputs_float32():
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        for head in ("coral", "corn", "softmax"):
            model = build_model("resnetv2_lite", "dr_grade", 5, S, head=head)
            out = model(_pixels(), training=False)
            assert keras.backend.standardize_dtype(out.dtype) == "float32"
            assert keras.backend.standardize_dtype(model.output.dtype) == "float32"
            # The policy did take effect in the body.
            assert model.get_layer("backbone").compute_dtype == "bfloat16"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_keras_save_load_round_trip_coral(tmp_path):
    model = build_model("resnetv2_lite", "dr_grade", 5, S, head="coral", dropout=0.2)
    x = _pixels(3)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer("logits"), heads.CoralDense)
    np.testing.assert_allclose(
        ops.convert_to_numpy(loaded(x, training=False)),
        ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_gradcam_rewiring_reproduces_logits():
    """The recipe of PITFALLS section 4 works on our structure: conv map + same logits."""
    model = build_model("resnetv2_lite", "dr_grade", 5, S, dropout=0.5)
    assert model.get_layer("dropout").rate == 0.5
    backbone = model.get_layer("backbone")
    conv_name = "block3_conv2"
    features = keras.Model(backbone.inputs, [backbone.get_layer(conv_name).output, backbone.output])
    image = keras.Input((S, S, 3))
    conv, fmap = features(image)
    logits = model.get_layer("logits")(model.get_layer("gap")(fmap))
    cam_model = keras.Model(image, [conv, logits])
    x = _pixels(2)
    conv_out, cam_logits = cam_model(x, training=False)
    assert tuple(conv_out.shape) == (2, 1, 1, 64)
    np.testing.assert_allclose(
        ops.convert_to_numpy(cam_logits),
        ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


# ----------------------------------------------------------------------------- backbones


def test_input_scaling_layers():
    lite = build_model("resnetv2_lite", "binary", 2, S).get_layer("backbone")
    scale = lite.get_layer("input_scaling")
    np.testing.assert_allclose(ops.convert_to_numpy(scale(np.array([0.0, 255.0]))), [0, 1])
    r50 = build_model("resnet50v2", "binary", 2, S).get_layer("backbone")
    scale = r50.get_layer("input_scaling")
    np.testing.assert_allclose(
        ops.convert_to_numpy(scale(np.array([0.0, 127.5, 255.0]))), [-1, 0, 1], atol=1e-6
    )
    # The keras.applications models that carry their own preprocessing get no extra layer.
    for name in ("convnext_tiny", "mobilenetv3_large"):
        bb = build_model(name, "binary", 2, S).get_layer("backbone")
        assert "input_scaling" not in [layer.name for layer in bb.layers]
        first = [type(layer).__name__ for layer in bb.layers[1:3]]
        assert {"Rescaling", "Normalization"} & set(first), first


def test_resnetv2_lite_widths_via_gin():
    try:
        gin.parse_config("resnetv2_lite.widths = (8, 12)\nresnetv2_lite.stem_filters = 4")
        model = build_model("resnetv2_lite", "multiclass", 3, S)
        backbone = model.get_layer("backbone")
        assert backbone.get_layer("stem_conv").filters == 4
        # Two stride-2 blocks after the stride-4 stem: 32 / 16 = 2.
        assert backbone.output.shape == (None, 2, 2, 12)
    finally:
        gin.clear_config()


def test_resnetv2_lite_small_input_stem_keeps_resolution():
    try:
        gin.parse_config("resnetv2_lite.widths = (8, 12, 16)\nresnetv2_lite.stem_kernel = 3\n"
                         "resnetv2_lite.stem_strides = 1\nresnetv2_lite.stem_pool = False")
        backbone = build_model("resnetv2_lite", "dr_grade", 5, 28).get_layer("backbone")
        assert backbone.get_layer("stem_conv").kernel_size == (3, 3)
        assert "stem_pool" not in [layer.name for layer in backbone.layers]
        # Stride-1 stem, three stride-2 blocks: 28 -> 14 -> 7 -> 4.
        assert backbone.output.shape == (None, 4, 4, 16)
    finally:
        gin.clear_config()


@pytest.mark.parametrize("name", ["resnetv2_lite", "mobilenetv3_large"])
def test_weights_from_file(tmp_path, name):
    source = build_model(name, "binary", 2, S).get_layer("backbone")
    path = str(tmp_path / "backbone.weights.h5")
    source.save_weights(path)
    loaded = build_model(name, "binary", 2, S, weights=path).get_layer("backbone")
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_imagenet_weights_refused_for_lite():
    with pytest.raises(ValueError, match="No ImageNet weights"):
        build_model("resnetv2_lite", "binary", 2, S, weights="imagenet")


# ----------------------------------------------------------------------------- heads


def test_coral_dense_shared_weight_and_ordered_bias():
    layer = heads.CoralDense(5)
    out = layer(np.ones((2, 3), "float32"))
    assert tuple(out.shape) == (2, 4)
    assert tuple(layer.fc.kernel.shape) == (3, 1)  # ONE weight vector shared by the 4 tasks
    np.testing.assert_allclose(ops.convert_to_numpy(layer.bias), [1.0, 0.75, 0.5, 0.25])
    # logit_k = w.x + b_k: columns differ only by their bias.
    w_x = ops.convert_to_numpy(ops.sum(layer.fc.kernel))
    np.testing.assert_allclose(ops.convert_to_numpy(out)[0], w_x + np.array([1, 0.75, 0.5, 0.25]))
    restored = heads.CoralDense.from_config(layer.get_config())
    assert restored.num_classes == 5


def test_coral_probabilities():
    logits = np.array([[10, 10, -10, -10], [-10, -10, -10, -10]], "float32")
    np.testing.assert_allclose(heads.probabilities(logits, "coral")[0], [0, 0, 1, 0, 0], atol=1e-4)
    # Crossing cumulative probs: P(y>0)=0.3, P(y>1)=0.6 -> (0.7, -0.3, 0.6) -> clip, renormalise.
    probs = heads.probabilities(_logit([[0.3, 0.6]]), "coral")
    np.testing.assert_allclose(probs, [[0.7 / 1.3, 0.0, 0.6 / 1.3]], atol=1e-6)


def test_corn_probabilities():
    # Conditional probs (0.8, 0.5, 0.5) -> P(y>k) = (0.8, 0.4, 0.2) -> P(y=k) = (.2, .4, .2, .2).
    logits = _logit([[0.8, 0.5, 0.5]])
    np.testing.assert_allclose(
        heads.probabilities(logits, "corn"), [[0.2, 0.4, 0.2, 0.2]], atol=1e-6
    )


def test_softmax_sigmoid_probabilities():
    logits = np.array([[1.0, 3.0, 0.0], [2.0, -1.0, 0.5]], "float32")
    e = np.exp(logits)
    np.testing.assert_allclose(
        heads.probabilities(logits, "softmax"), e / e.sum(1, keepdims=True), rtol=1e-6
    )
    binary = np.array([[0.0], [np.log(3.0)]], "float32")
    np.testing.assert_allclose(
        heads.probabilities(binary, "sigmoid"), [[0.5, 0.5], [0.25, 0.75]], rtol=1e-6
    )
    multi = np.array([[2.0, -1.0, 0.1]], "float32")  # sigmoid: 0.88, 0.27, 0.52
    np.testing.assert_allclose(
        heads.probabilities(multi, "sigmoid"), 1 / (1 + np.exp(-multi)), rtol=1e-6
    )


def test_probabilities_on_tensors_and_symbolic():
    out = heads.probabilities(ops.convert_to_tensor(_logit([[0.8, 0.6, 0.4]])), "coral")
    assert not isinstance(out, np.ndarray)
    assert isinstance(heads.probabilities(_logit([[0.8, 0.6, 0.4]]), "coral"), np.ndarray)
    symbolic = keras.Input((4,))
    assert heads.probabilities(symbolic, "corn").shape == (None, 5)
