"""JAX-backend child of test_prefetch.py: one tiny fit with and without device_prefetch.

Prints a JSON line: {"<depth>": [final weights as nested lists]} for depths 0 and 2.
"""

import json
import sys

import keras
import numpy as np
import tensorflow as tf

from training import prefetch


def seven_batches(repeat: bool) -> tf.data.Dataset:
    """7 distinct batches of 4 (x float32 [4, 3], y float32 [4, 1]); repeated when
    `repeat` (fit with steps_per_epoch: Keras keeps one iterator across epochs)."""
    x = np.arange(7 * 4 * 3, dtype="float32").reshape(7 * 4, 3) / 50.0
    y = (np.arange(7 * 4) % 2).astype("float32")[:, None]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    return ds.repeat() if repeat else ds


def _fit(depth: int, steps_per_epoch) -> list:
    keras.utils.set_random_seed(0)
    ds = seven_batches(bool(steps_per_epoch))
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=True)
    with prefetch.device_prefetch(model, depth):
        model.fit(ds, epochs=3, steps_per_epoch=steps_per_epoch, verbose=0)
    assert model.train_function is not None
    return [w.tolist() for w in model.get_weights()]


def _thread_sees(distribution) -> bool:
    """Whether prefetch's thread reads batches under the caller's distribution."""

    def source():
        yield keras.distribution.distribution()

    ahead = prefetch._Ahead(source(), depth=1)
    seen = next(ahead)
    ahead.close()
    return seen is distribution


if __name__ == "__main__":
    steps = int(sys.argv[1]) or None
    out = {}
    if len(keras.distribution.list_devices()) > 1:  # the state's shardings come from fit
        keras.distribution.set_distribution(keras.distribution.DataParallel())
        out["thread_sees_distribution"] = _thread_sees(keras.distribution.distribution())
    out.update({str(d): _fit(d, steps) for d in (0, 2)})
    print(json.dumps(out))
