"""Callbacks that run the network at each epoch's end: compiled against eager calls.

- `PreciseBatchNorm` (before each validation) re-estimates BN statistics with
  training-mode forward passes; on JAX they are one jitted `stateless_call`.
- `TunedMacroF1` (each epoch's end) predicts the validation split through Keras' compiled
  predict step (`predict_on_batch`).

The eager variants are the same callbacks calling the model eagerly on every backend
(their own eager paths: same averaging, same tuning). Eager calls on JAX compile each op
of the network on its own the first time and then dispatch them one by one. Each variant
runs in a fresh process (no compilation cache) and times the callback's first and second
epoch:

    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python -m benchmarks.epoch_callbacks \
        --model=efficientnet_b3 --image_size=64

Both ways give the same numbers (float noise); tests/test_precise_bn.py and
tests/test_callbacks_selection.py hold golden values. Measured on 2 CPU cores (JAX
0.10.2, TF 2.21), first epoch (compiles) / second, eager vs compiled seconds:

| | EfficientNet-B3 64 px, 4 batches of 8 | ResNetV2-lite 128 px, 8 of 32 (the demo's) |
| --- | --- | --- |
| precise_bn, JAX | 18.54 vs 4.70 (3.9x) / 1.52 vs 0.72 | 2.97 vs 0.73 / 0.37 vs 0.16 |
| tuned_f1, JAX | 20.51 vs 2.40 (8.5x) / 1.24 vs 0.66 | 2.01 vs 0.51 / 0.30 vs 0.31 |
| precise_bn, TF | - | 0.61 vs 0.67 / 0.50 vs 0.56 |
| tuned_f1, TF | - | 0.52 vs 0.33 / 0.40 vs 0.10 (4.0x) |

On TF both precise_bn variants run the same eager code, so their 10 % gap is this
benchmark's noise between processes. An earlier run gave B3's eager tuned_f1 first epoch
11.53 s (so 4.5x) with the same eager calls: first compiles vary that much on this host.
"""

import json
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS  # defined under __main__
VARIANTS = ("precise_bn_eager", "precise_bn", "tuned_f1_eager", "tuned_f1")


def _callback(variant: str, batches, val_ds):
    """The callback `variant` names; the *_eager ones call the model eagerly on every
    backend, through the callbacks' own eager paths (same averaging, same tuning)."""
    from training import callbacks

    if variant.startswith("precise_bn"):
        cls = callbacks.PreciseBatchNorm
        if variant.endswith("_eager"):
            cls = type("EagerPreciseBatchNorm", (cls,),
                       {"_batch_statistics": cls._eager_statistics})
        return cls(batches)
    cls = callbacks.TunedMacroF1
    if variant.endswith("_eager"):
        cls = type("EagerTunedMacroF1", (cls,), {"_logits": cls._eager_logits})
    return cls(val_ds)


def _child() -> list[float]:
    import numpy as np
    import tensorflow as tf

    from models import registry

    size, variant = FLAGS.image_size, FLAGS.variant
    task = "multilabel" if variant.startswith("tuned_f1") else "dr_grade"
    model = registry.build_model(FLAGS.model, task=task, num_classes=5, image_size=size,
                                 weights=None)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 255, (FLAGS.batch_size, size, size, 3)).astype("float32")
               for _ in range(FLAGS.batches)]
    labels = rng.integers(0, 2, (len(batches) * FLAGS.batch_size, 5)).astype("float32")
    val_ds = tf.data.Dataset.from_tensor_slices((np.concatenate(batches), labels)).batch(
        FLAGS.batch_size)
    callback = _callback(variant, batches, val_ds)
    callback.set_model(model)
    times = []
    for epoch in range(2):
        start = time.perf_counter()
        if task == "multilabel":
            callback.on_epoch_end(epoch, {})
        else:
            callback.on_test_begin()
        times.append(round(time.perf_counter() - start, 3))
    return times


def main(_):
    if FLAGS.variant:
        print(json.dumps(_child()))
        return
    import keras

    times = {}
    for variant in VARIANTS:
        args = [sys.executable, "-m", "benchmarks.epoch_callbacks", f"--variant={variant}",
                *[f"--{k}={getattr(FLAGS, k)}" for k in
                  ("model", "image_size", "batch_size", "batches")]]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{variant} failed:\n{proc.stderr[-4000:]}")
        times[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"## {FLAGS.model} {FLAGS.image_size}px, {FLAGS.batches} batches of "
          f"{FLAGS.batch_size}, {keras.backend.backend()}")
    print("| callback | epoch | eager s | compiled s | eager / compiled |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("precise_bn", "tuned_f1"):
        for i, epoch in enumerate(("first (compiles)", "second")):
            eager, compiled = times[f"{name}_eager"][i], times[name][i]
            print(f"| {name} | {epoch} | {eager:.2f} | {compiled:.2f} | "
                  f"{eager / compiled:.1f}x |")


if __name__ == "__main__":
    flags.DEFINE_string("model", "efficientnet_b3", "fundusflow registry name.")
    flags.DEFINE_integer("image_size", 64, "Square input size.")
    flags.DEFINE_integer("batch_size", 8, "Images per batch.")
    flags.DEFINE_integer("batches", 4, "Batches per epoch-end pass.")
    flags.DEFINE_string("variant", "", "Internal: one of VARIANTS, measured in this process.")
    app.run(main)
