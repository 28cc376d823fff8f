"""JAX-backend child of test_multistep.py: one tiny fit per steps_per_execution.

Prints a JSON line: {"one_device" | "data_parallel" (run with 2 host devices): {steps
per epoch (0: one pass over the data): {run: {"weights": [...], "logs": {final epoch
logs}, "batch_logs": [each epoch's last batch-end logs], "calls": {"scan": n, "single":
n}}}}}, runs being k = 1, k = 4 and k = 4 with device_prefetch (one device, 6 steps: its
own test covers the rest); the calls of multistep's jitted functions are counted by
wrapping `multistep._compile`.
"""

import collections
import json

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


class _LastBatchLogs(keras.callbacks.Callback):
    """The logs of each epoch's last on_train_batch_end (its last step's, for any k)."""

    def __init__(self):
        super().__init__()
        self.per_epoch, self._last = [], None

    def on_train_batch_end(self, batch, logs=None):
        self._last = {name: float(value) for name, value in logs.items()}

    def on_epoch_end(self, epoch, logs=None):
        self.per_epoch.append(self._last)


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
        batch_logs = _LastBatchLogs()
        history = model.fit(ds, epochs=3, steps_per_epoch=steps_per_epoch, verbose=0,
                            callbacks=[batch_logs])
    assert not isinstance(model.train_function, multistep._MultiStep)  # restored
    assert "make_train_function" not in vars(model)
    return {"weights": [w.tolist() for w in model.get_weights()],
            "logs": {name: values[-1] for name, values in history.history.items()},
            "batch_logs": batch_logs.per_epoch,
            "calls": {name: calls[name] for name in ("scan", "single")}}


def _runs(steps_per_epoch, with_prefetch: bool) -> dict:
    runs = {"1": _fit(1, steps_per_epoch), "4": _fit(4, steps_per_epoch)}
    if with_prefetch:
        runs["4_prefetch"] = _fit(4, steps_per_epoch, depth=2)
    return runs


if __name__ == "__main__":
    # Several host devices (XLA_FLAGS): Keras uses the first until a distribution is set.
    out = {"one_device": {s: _runs(int(s) or None, s == "6") for s in ("8", "6", "0")}}
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    out["data_parallel"] = {"6": _runs(6, False)}  # the state's shardings come from fit
    print(json.dumps(out))
