"""models.layers: TapDepthwiseConv2D is DepthwiseConv2D computed as shifted multiply-adds."""

import keras
import numpy as np
import pytest

from models import build_model
from models.layers import TapDepthwiseConv2D


def _walk(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _walk(layer)
        else:
            yield layer


def _count(model, cls):
    return sum(type(layer) is cls for layer in _walk(model))


@pytest.mark.parametrize("kernel,stride,padding,size", [
    (3, 1, "same", 13), (3, 2, "same", 13), (3, 2, "same", 12), (5, 2, "same", 14),
    (5, 1, "valid", 11), (3, 2, "valid", 12)])
def test_tap_depthwise_equals_depthwise(kernel, stride, padding, size):
    ref = keras.layers.DepthwiseConv2D(kernel, stride, padding=padding, activation="relu",
                                       bias_initializer="random_normal")
    x = np.random.default_rng(0).normal(size=(2, size, size, 4)).astype("float32")
    expected = keras.ops.convert_to_numpy(ref(x))
    tap = TapDepthwiseConv2D.from_config(ref.get_config())
    tap.build(x.shape)
    tap.set_weights(ref.get_weights())
    got = keras.ops.convert_to_numpy(tap(x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["efficientnet_b3", "mobilenetv3_large"])
def test_build_model_taps_same_outputs_and_weights(name):
    keras.utils.set_random_seed(0)
    native = build_model(name, "multiclass", 3, 64)
    taps = build_model(name, "multiclass", 3, 64, depthwise="taps")
    assert _count(taps, keras.layers.DepthwiseConv2D) == 0
    assert _count(taps, TapDepthwiseConv2D) == _count(native, keras.layers.DepthwiseConv2D) > 0
    taps.set_weights(native.get_weights())  # same variables, in the same order
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(taps(x)),
                               keras.ops.convert_to_numpy(native(x)), atol=1e-4)


def test_taps_max_input_size_swaps_only_small_maps():
    model = build_model("efficientnet_b3", "multiclass", 3, 64, depthwise="taps",
                        taps_max_input_size=8)
    swapped = [layer for layer in _walk(model) if type(layer) is TapDepthwiseConv2D]
    kept = [layer for layer in _walk(model) if type(layer) is keras.layers.DepthwiseConv2D]
    assert swapped and kept
    assert all(max(layer.input.shape[1:3]) <= 8 for layer in swapped)
    assert all(max(layer.input.shape[1:3]) > 8 for layer in kept)


def test_taps_min_stride_swaps_only_strided_layers():
    model = build_model("efficientnet_b3", "multiclass", 3, 64, depthwise="taps",
                        taps_min_stride=2)
    swapped = [layer for layer in _walk(model) if type(layer) is TapDepthwiseConv2D]
    kept = [layer for layer in _walk(model) if type(layer) is keras.layers.DepthwiseConv2D]
    # EfficientNet-B3: 26 depthwise layers, the first of stages 2, 3, 4 and 6 strided
    assert len(swapped) == 4 and len(kept) == 22
    assert all(tuple(layer.strides) == (2, 2) for layer in swapped)
    assert all(tuple(layer.strides) == (1, 1) for layer in kept)


def test_taps_model_keras_round_trip(tmp_path):
    model = build_model("mobilenetv3_large", "binary", 2, 32, depthwise="taps")
    x = np.random.default_rng(2).uniform(0, 255, (1, 32, 32, 3)).astype("float32")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert _count(loaded, TapDepthwiseConv2D) == _count(model, TapDepthwiseConv2D)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), atol=1e-5)


def test_unknown_depthwise_is_named():
    with pytest.raises(ValueError, match="depthwise='cudnn'"):
        build_model("mobilenetv3_large", "binary", 2, 32, depthwise="cudnn")
