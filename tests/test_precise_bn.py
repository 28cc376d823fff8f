"""training/callbacks.PreciseBatchNorm: the moving statistics become the plain average of
the batches' statistics, on TensorFlow and (subprocess) on JAX, where the forward passes
are one compiled program."""

import keras
import numpy as np

from tests.jax_child import check_on_jax
from training import callbacks as cb


def _model():
    x = keras.Input((2, 2, 2))
    y = keras.layers.BatchNormalization(momentum=0.9, name="bn")(x)
    frozen = keras.layers.BatchNormalization(name="frozen")
    frozen.trainable = False
    y = frozen(keras.layers.Dense(2, kernel_initializer="ones", name="dense")(y))
    return keras.Model(x, y)


def _batch(c0, v0, v1):
    """[2, 2, 2, 2]: channel 0 all c0; channel 1 v0 in example 0, v1 in example 1."""
    batch = np.empty((2, 2, 2, 2), "float32")
    batch[..., 0] = c0
    batch[0, ..., 1], batch[1, ..., 1] = v0, v1
    return batch


def check_precise_bn():
    """Asserts the golden values (by hand); run on each backend."""
    model = _model()
    # channel 0: a batch's constant; channel 1: one value per example
    batches = [_batch(1.0, 0.0, 2.0), _batch(3.0, 4.0, 8.0)]
    frozen_before = [keras.ops.convert_to_numpy(v)
                     for v in model.get_layer("frozen").non_trainable_weights]
    callback = cb.PreciseBatchNorm(batches)
    callback.set_model(model)
    for _ in range(2):  # a second validation gives the same (JAX: the compiled program reused)
        callback.on_test_begin()
        bn = model.get_layer("bn")
        # batch means (1, 1) and (3, 6), variances (0, 1) and (0, 4): their averages
        np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), [2.0, 3.5],
                                   rtol=1e-6)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance),
                                   [0.0, 2.5], rtol=1e-6, atol=1e-6)
        assert bn.momentum == 0.9
    for before, after in zip(frozen_before, model.get_layer("frozen").non_trainable_weights,
                             strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(after), before)


def test_precise_bn_averages_batch_statistics():
    check_precise_bn()


def test_precise_bn_on_jax():
    check_on_jax("from tests.test_precise_bn import check_precise_bn as c; c()")
