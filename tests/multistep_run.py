"""JAX-backend child of test_multistep.py, run with 2 host devices (XLA_FLAGS).

argv: a prepared data dir, a folder for workdirs, then gin bindings. Prints a JSON line:
- "train": {k: {"summary": the training summary, "throughput": {"steps", "seconds"} of
  train's Throughput callback, "calls"}} for experiment.train with the bindings and
  train.steps_per_execution k = "4" and "1" (distribution "auto": both devices);
- "one_device" | "data_parallel": {steps per epoch (0: one pass over the data): {run:
  {"weights": [...], "logs": {final epoch logs}, "batch_logs": [each epoch's last
  batch-end logs], "calls"}}} for a tiny fit, runs being k = 1, k = 4 and k = 4 with
  device_prefetch (one device, 6 steps: prefetch's own test covers the rest); 6 steps per
  epoch and one pass on one device, 8 under DataParallel.
"calls": {"scan": n, "single": n}, the dispatches of multistep's jitted functions,
counted by wrapping `multistep._compile` from here (and Throughput by wrapping
`cb.Throughput`).
"""

import collections
import json
import os
import sys

import gin
import keras

from tests.prefetch_run import seven_batches
from training import callbacks as cb
from training import experiment, multistep, prefetch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
calls, meters = collections.Counter(), []
_compile, _throughput = multistep._compile, cb.Throughput


def _counting(fn, out_shardings):
    jitted = _compile(fn, out_shardings)
    name = "single" if fn.__name__ == "train_step" else "scan"

    def call(*args):
        calls[name] += 1
        return jitted(*args)

    return call


def _kept_throughput(*args, **kwargs):
    meters.append(_throughput(*args, **kwargs))
    return meters[-1]


multistep._compile, cb.Throughput = _counting, _kept_throughput


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
    ds = seven_batches(bool(steps_per_epoch))
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


def _train(data_dir: str, workdir: str, bindings: list) -> dict:
    calls.clear()
    meters.clear()
    gin.clear_config()
    gin.parse_config_files_and_bindings([os.path.join(REPO, "configs", "debug.gin")],
                                        [f"train.data_dir = '{data_dir}'", *bindings])
    summary = experiment.train(workdir)
    return {"summary": summary,
            "throughput": {"steps": meters[0].steps, "seconds": meters[0].seconds},
            "calls": {name: calls[name] for name in ("scan", "single")}}


def _runs(steps_per_epoch, with_prefetch: bool) -> dict:
    runs = {"1": _fit(1, steps_per_epoch), "4": _fit(4, steps_per_epoch)}
    if with_prefetch:
        runs["4_prefetch"] = _fit(4, steps_per_epoch, depth=2)
    return runs


if __name__ == "__main__":
    data_dir, workdir, *bindings = sys.argv[1:]
    out = {"train": {k: _train(data_dir, os.path.join(workdir, k),
                               [*bindings, f"train.steps_per_execution = {k}"])
                     for k in ("4", "1")}}
    # Keras uses the first device until a distribution is set.
    out["one_device"] = {s: _runs(int(s) or None, s == "6") for s in ("6", "0")}
    keras.distribution.set_distribution(keras.distribution.DataParallel())
    out["data_parallel"] = {"8": _runs(8, False)}  # the state's shardings come from fit
    print(json.dumps(out))
