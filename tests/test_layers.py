"""models.layers: TapDepthwiseConv2D is DepthwiseConv2D computed as shifted multiply-adds;
TapGradDepthwiseConv2D has DepthwiseConv2D's outputs and gradients (TF here, JAX in a
subprocess: the custom gradient is backend code)."""

import keras
import numpy as np
import pytest

from models import build_model
from models.layers import TapDepthwiseConv2D, TapGradDepthwiseConv2D
from tests.jax_child import check_on_jax


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


def _output_and_gradients(layer, x, w):
    """layer(x) and d/d(kernel, x) of sum(w * y + y**2), y = layer(x), as numpy."""
    if keras.backend.backend() == "jax":
        import jax

        def loss(kernel, x):
            with keras.StatelessScope(state_mapping=[(layer.kernel, kernel)]):
                y = layer(x)
            return (w * y + y * y).sum(), y

        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            layer.kernel.value, x)
        return [np.asarray(v) for v in (y, *grads)]
    import tensorflow as tf

    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(w * y + y * y)
    return [v.numpy() for v in (y, *tape.gradient(loss, [layer.kernel, x]))]


def check_tap_grad_equals_depthwise():
    rng = np.random.default_rng(0)
    # stride 1: cuDNN forward, custom gradient (odd and even kernels, both paddings);
    # stride 2: taps throughout
    for kernel, stride, padding, size in [(3, 1, "same", 9), (5, 1, "same", 8),
                                          (4, 1, "same", 8), (3, 1, "valid", 10),
                                          (5, 1, "valid", 7), (3, 2, "same", 9)]:
        x = rng.normal(size=(2, size, size + 1, 3)).astype("float32")
        ref = keras.layers.DepthwiseConv2D(kernel, stride, padding=padding,
                                           bias_initializer="random_normal")
        ref.build(x.shape)
        tap = TapGradDepthwiseConv2D.from_config(ref.get_config())
        tap.build(x.shape)
        tap.set_weights(ref.get_weights())
        w = rng.normal(size=ref.compute_output_shape(x.shape)).astype("float32")
        for got, expected, what in zip(_output_and_gradients(tap, x, w),
                                       _output_and_gradients(ref, x, w),
                                       ("output", "kernel gradient", "input gradient"),
                                       strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{what}, k={kernel} s={stride} {padding}")


def test_tap_grad_equals_depthwise():
    check_tap_grad_equals_depthwise()


def test_tap_grad_equals_depthwise_on_jax():
    check_on_jax("from tests.test_layers import check_tap_grad_equals_depthwise as c; c()")


def test_build_model_taps_grad_swaps_layers():
    model = build_model("mobilenetv3_large", "binary", 2, 32, depthwise="taps_grad")
    assert _count(model, keras.layers.DepthwiseConv2D) == 0
    assert _count(model, TapGradDepthwiseConv2D) == 15


def test_taps_max_input_size_swaps_only_small_maps():
    model = build_model("efficientnet_b3", "multiclass", 3, 64, depthwise="taps",
                        taps_max_input_size=8)
    swapped = [layer for layer in _walk(model) if type(layer) is TapDepthwiseConv2D]
    kept = [layer for layer in _walk(model) if type(layer) is keras.layers.DepthwiseConv2D]
    assert swapped and kept
    assert all(max(layer.input.shape[1:3]) <= 8 for layer in swapped)
    assert all(max(layer.input.shape[1:3]) > 8 for layer in kept)


def test_taps_strided_swaps_only_strided_layers():
    model = build_model("efficientnet_b3", "multiclass", 3, 64, depthwise="taps",
                        taps_strided=True)
    swapped = [layer for layer in _walk(model) if type(layer) is TapDepthwiseConv2D]
    kept = [layer for layer in _walk(model) if type(layer) is keras.layers.DepthwiseConv2D]
    # EfficientNet-B3: 26 depthwise layers, the first of stages 2, 3, 4 and 6 strided
    assert len(swapped) == 4 and len(kept) == 22
    assert all(tuple(layer.strides) == (2, 2) for layer in swapped)
    assert all(tuple(layer.strides) == (1, 1) for layer in kept)


def test_taps_strided_or_small():
    # B3 at 64 px: stride-1 inputs 32 (2 layers), 16 (2), 8 (2), 4 (9) and 2 px (7), four
    # strided layers (33, 19, 9, 7 px): <= 4 px or strided swaps 9 + 7 + 4
    model = build_model("efficientnet_b3", "multiclass", 3, 64, depthwise="taps",
                        taps_max_input_size=4, taps_strided=True)
    swapped = [layer for layer in _walk(model) if type(layer) is TapDepthwiseConv2D]
    kept = [layer for layer in _walk(model) if type(layer) is keras.layers.DepthwiseConv2D]
    assert len(swapped) == 20 and len(kept) == 6
    assert sum(tuple(layer.strides) == (2, 2) for layer in swapped) == 4
    assert all(tuple(layer.strides) == (1, 1) and max(layer.input.shape[1:3]) > 4
               for layer in kept)


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
