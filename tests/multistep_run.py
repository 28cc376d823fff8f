"""JAX-backend child of test_multistep.py: one tiny fit per steps_per_execution.

argv[1]: comma-separated steps_per_epoch values (0: one pass over the data). Prints a
JSON line: {steps: {run: {"weights": [...], "logs": {final epoch logs}, "calls": {"scan":
n, "single": n}}}}, runs k = 1, k = 4 and (one device) k = 4 with device_prefetch;
the calls of multistep's jitted functions are counted by wrapping `multistep._compile`.
"""

import collections
import json
import sys

import keras
import numpy as np
import tensorflow as tf

from training import multistep, prefetch

calls = collections.Counter()
_compile = multistep._compile


def _counting(fn, out_shardings):
    jitted = _compile(fn, out_shardings)
    name = "single" if fn.__name__ == "train_step" else "scan"

    def call(*args):
        calls[name] += 1
        return jitted(*args)

    return call


multistep._compile = _counting


def _fit(k: int, steps_per_epoch, depth: int = 0) -> dict:
    keras.utils.set_random_seed(0)
    x = np.arange(7 * 4 * 3, dtype="float32").reshape(7 * 4, 3) / 50.0
    y = (np.arange(7 * 4) % 2).astype("float32")[:, None]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # 7 distinct batches
    if steps_per_epoch:  # Keras keeps one iterator across epochs
        ds = ds.repeat()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4),
                              keras.layers.BatchNormalization(),  # non-trainable state
                              keras.layers.Activation("tanh"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", metrics=["mae"],
                  jit_compile=True, steps_per_execution=k)
    calls.clear()
    with multistep.steps_per_execution(model, steps_per_epoch), \
            prefetch.device_prefetch(model, depth):
        history = model.fit(ds, epochs=3, steps_per_epoch=steps_per_epoch, verbose=0)
    assert not isinstance(model.train_function, multistep._MultiStep)  # restored
    assert "make_train_function" not in vars(model)
    return {"weights": [w.tolist() for w in model.get_weights()],
            "logs": {name: values[-1] for name, values in history.history.items()},
            "calls": {name: calls[name] for name in ("scan", "single")}}


def _runs(steps_per_epoch) -> dict:
    runs = {"1": _fit(1, steps_per_epoch), "4": _fit(4, steps_per_epoch)}
    if keras.distribution.distribution() is None:  # prefetch's own test covers the other
        runs["4_prefetch"] = _fit(4, steps_per_epoch, depth=2)
    return runs


if __name__ == "__main__":
    if len(keras.distribution.list_devices()) > 1:  # the state's shardings come from fit
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    print(json.dumps({s: _runs(int(s) or None) for s in sys.argv[1].split(",")}))
