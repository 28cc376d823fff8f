"""Runs train.py in this process after splitting the CPU into N logical devices.

    python -m tests.distributed_run N [train.py flags...]
    python -m tests.distributed_run N parity DATA_DIR OUT_DIR [gin bindings...]

`parity` trains the same run twice in this process, into OUT_DIR/none (one device)
and OUT_DIR/data_parallel (N devices), for tests/test_distribution.py to compare.

TensorFlow: N logical CPU devices (set before TF starts; MirroredStrategy uses them).
JAX: pass XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment
instead (read when JAX starts; no JAX op may run here before a multi-process job
joins its cluster).

A fault, injected from here (the code under test is unchanged): with
DISTRIBUTED_RUN_STALL=E:B in the environment, this process stops at the start of batch B
of epoch E (Keras' 0-based numbers) and sleeps there until it is killed, so
that a test can kill it in the middle of that epoch however fast the steps are.
"""

import os
import sys
import time

STALL = "DISTRIBUTED_RUN_STALL"


def main():
    count, argv = int(sys.argv[1]), [sys.argv[0], *sys.argv[2:]]
    import keras

    if os.environ.get(STALL):
        _stall_at(*(int(n) for n in os.environ[STALL].split(":")))

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    if argv[1:2] == ["parity"]:
        _parity(*argv[2:])
        return
    from absl import app

    import train

    app.run(train.main, argv)


def _stall_at(epoch: int, batch: int, seconds: float = 600.0):
    """Every Model.fit gets a last callback that sleeps `seconds` (until the test kills
    this process) when batch `batch` of epoch `epoch` begins."""
    import keras

    from tests.reliability.inject import _add_callback  # the fault scenarios' patch

    class Stall(keras.callbacks.Callback):
        def on_epoch_begin(self, e, logs=None):
            self.epoch = e

        def on_train_batch_begin(self, b, logs=None):
            if (self.epoch, b) == (epoch, batch):
                print(f"distributed_run: stalled at epoch {epoch} batch {batch}",
                      file=sys.stderr, flush=True)
                time.sleep(seconds)

    _add_callback(Stall)


def _parity(data_dir, out_dir, *bindings):
    import gin

    from training import config, experiment

    for kind in ("none", "data_parallel"):
        config.parse([os.path.join(os.path.dirname(__file__), "..", "configs", "debug.gin")],
                     [f"train.data_dir = '{data_dir}'", f"train.distribution = '{kind}'",
                      *bindings], finalize=False)
        experiment.train(os.path.join(out_dir, kind))
        gin.clear_config()


if __name__ == "__main__":
    main()
