"""The training loop never waits for the device at each step, and compiles only once.

Keras runs every callback's `on_train_batch_end` on the training thread, after
converting the step's logs to Python floats (a device sync), unless each callback
that overrides it is `async_safe` (then a worker thread does it, on JAX). Measured
cost on an H200: 21 -> 39 ms per ConvNeXt-Tiny step (benchmarks/train_e2e.py).
"""

import os
import subprocess
import sys
import threading
import types

import keras
import numpy as np
import pytest
from keras.src import utils as keras_utils

from training import callbacks as cb
from training import compilation, experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks_each_step(callback) -> bool:
    """Keras' own rule (CallbackList._configure_async_dispatch)."""
    if getattr(callback, "async_safe", False):
        return False
    return not (keras_utils.is_default(callback.on_batch_end)
                and keras_utils.is_default(callback.on_train_batch_end))


def test_no_callback_of_a_run_holds_the_training_thread(tmp_path):
    info = {"task": "dr_grade", "class_names": list("abcde")}
    best = cb.BestCheckpoint(str(tmp_path / "checkpoints"), "val_qwk", "max", 5)
    stage = experiment.Stage(0, 0, 2, True, 1.0)
    callbacks = [cb.Throughput(8), cb.TerminateOnNaN(), cb.PreciseBatchNorm([])]
    callbacks += experiment._stage_callbacks(str(tmp_path), stage, best, 3, info, "coral",
                                             False, None)
    names = {type(c).__name__ for c in callbacks}
    assert {"EpochTensorBoard", "SafeBackupAndRestore", "OperativeConfigWriter",
            "ConfusionMatrixImage", "ResumableEarlyStopping", "CSVLogger"} <= names
    assert [type(c).__name__ for c in callbacks if _blocks_each_step(c)] == []


def test_batch_level_callbacks_still_block():
    # The rule above is Keras' and it does flag per-step writers.
    assert _blocks_each_step(keras.callbacks.TerminateOnNaN())
    assert _blocks_each_step(cb.EpochTensorBoard("/tmp/unused_tb", update_freq="batch"))
    assert _blocks_each_step(keras.callbacks.BackupAndRestore("/tmp/unused_backup", save_freq=10))


class _Model:
    stop_training = False


def test_terminate_on_nan_from_the_callback_thread():
    guard = cb.TerminateOnNaN()
    guard.set_model(_Model())
    guard.on_train_batch_end(0, {"loss": 0.7})
    assert not guard.model.stop_training and not guard.triggered
    worker = threading.Thread(target=guard.on_train_batch_end, args=(1, {"loss": np.nan}))
    worker.start()
    worker.join()
    assert guard.model.stop_training and guard.triggered


def test_throughput_counts_steps_as_they_start():
    meter = cb.Throughput(images_per_step=8)
    meter.on_epoch_begin(0)
    for step in range(3):
        meter.on_train_batch_begin(step)
    meter.on_test_begin()
    meter.on_epoch_end(0)  # validation already stopped the clock: not counted twice
    assert meter.steps == 3 and meter.seconds > 0
    assert meter.images_per_second == pytest.approx(24 / meter.seconds)


def test_throughput_counts_every_step_of_an_execution_and_a_short_last_one(monkeypatch):
    """steps_per_execution 4, 6 steps per epoch: Keras calls the hook at steps 0 and 4;
    the second execution runs 2 steps (multistep.py ends it at the epoch's end). On JAX
    the batch hook never touches `Callback.model`, whose every read syncs fit's state."""
    from keras.src import backend as keras_backend

    syncs = []
    model = types.SimpleNamespace(steps_per_execution=4, jax_state_sync=lambda: syncs.append(1))
    meter = cb.Throughput(images_per_step=8)
    meter.set_model(model)
    meter.set_params({"steps": 6, "epochs": 1})
    monkeypatch.setattr(keras_backend, "backend", lambda: "jax")  # Callback.model's check
    meter.on_train_begin()
    meter.on_epoch_begin(0)
    synced_before = len(syncs)
    for step in (0, 4):
        meter.on_train_batch_begin(step)
    assert len(syncs) == synced_before
    meter.on_epoch_end(0)
    assert meter.steps == 6


def test_compilation_cache_is_off_outside_jax_or_when_empty(tmp_path):
    assert keras.backend.backend() == "tensorflow"
    assert compilation.enable_compilation_cache(str(tmp_path / "c")) is None
    assert not (tmp_path / "c").exists()


def test_compilation_cache_on_jax_stores_compiled_programs(tmp_path):
    code = ("from training import compilation; import jax, jax.numpy as jnp, sys; "
            "p = compilation.enable_compilation_cache(sys.argv[1]); "
            "print(p); jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready(); "
            "print(compilation.enable_compilation_cache('') is None)")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(tmp_path / "cache"), "True"]
    assert os.listdir(tmp_path / "cache")  # at least one executable written
