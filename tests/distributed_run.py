"""Runs train.py in this process after splitting the CPU into N logical devices.

    python -m tests.distributed_run N [train.py flags...]

TensorFlow: N logical CPU devices (set before TF starts; MirroredStrategy uses them).
JAX: pass XLA_FLAGS=--xla_force_host_platform_device_count=N in the environment
instead (read when JAX starts); N is then only checked.
"""

import os
import sys


def main():
    count, argv = int(sys.argv[1]), [sys.argv[0], *sys.argv[2:]]
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    elif "JAX_COORDINATOR_ADDRESS" not in os.environ:  # else: no JAX op before joining
        import jax

        assert jax.local_device_count() == count, jax.devices()
    from absl import app

    import train

    app.run(train.main, argv)


if __name__ == "__main__":
    main()
