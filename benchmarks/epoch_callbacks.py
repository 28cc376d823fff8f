"""Callbacks that run the network at each epoch's end: compiled against eager calls.

- `PreciseBatchNorm` (before each validation) re-estimates BN statistics with
  training-mode forward passes; on JAX they are one jitted `stateless_call`. The eager
  way: the model called per batch, its BN momentum set to i / (i + 1).
- `TunedMacroF1` (each epoch's end) predicts the validation split through Keras' compiled
  predict step (`predict_on_batch`). The eager way: `model(images, training=False)`.

Eager calls on JAX compile each op of the network on its own the first time and then
dispatch them one by one. Each variant runs in a fresh process (no compilation cache)
and times the callback's first and second epoch:

    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python -m benchmarks.epoch_callbacks \\
        --model=efficientnet_b3 --image_size=64

Both ways give the same numbers (float noise); tests/test_precise_bn.py and
tests/test_callbacks_selection.py hold golden values. Measured on 2 CPU cores (JAX
0.10.2, TF 2.21), first epoch (compiles) / second, eager vs compiled seconds:

| | EfficientNet-B3 64 px, 4 batches of 8 | ResNetV2-lite 128 px, 8 of 32 (the demo's) |
| --- | --- | --- |
| precise_bn, JAX | 17.75 vs 5.16 (3.4x) / 1.58 vs 0.70 | 3.16 vs 0.75 / 0.29 vs 0.13 |
| tuned_f1, JAX | 11.53 vs 2.57 (4.5x) / 1.25 vs 1.28 | - |
| precise_bn, TF | 2.92 vs 3.18 / 2.83 vs 2.84 (both eager) | 0.60 vs 0.65 / 0.56 vs 0.59 |
| tuned_f1, TF | 2.20 vs 2.51 / 2.01 vs 0.26 (7.7x) | 0.55 vs 0.36 / 0.63 vs 0.10 |

(precise_bn on TF runs eagerly both ways; interleaved in one process, 0.517 vs 0.523 s a
validation of the demo model.)
"""

import json
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS  # defined under __main__
VARIANTS = ("precise_bn_eager", "precise_bn", "tuned_f1_eager", "tuned_f1")


def _precise_bn_eager(model, batches):
    import keras

    from training import callbacks

    layers = [layer for layer in callbacks._sublayers(model)
              if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
    saved = [layer.momentum for layer in layers]
    for i, images in enumerate(batches):
        for layer in layers:
            layer.momentum = i / (i + 1)
        model(images, training=True)
    for layer, momentum in zip(layers, saved, strict=True):
        layer.momentum = momentum


def _tuned_f1_eager(model, val_ds):
    """TunedMacroF1's epoch end with eager calls (its code before predict_on_batch)."""
    import keras
    import numpy as np

    from models import decision

    probs, labels = [], []
    for images, y in val_ds:
        logits = keras.ops.convert_to_numpy(model(images.numpy(), training=False))
        probs.append(1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
        labels.append(y.numpy())
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    return [decision.label_threshold(labels[:, c], probs[:, c], min_recall=0.3,
                                     max_threshold=0.7) for c in range(labels.shape[1])]


def _child() -> list[float]:
    import numpy as np
    import tensorflow as tf

    from models import registry
    from training import callbacks

    size, variant = FLAGS.image_size, FLAGS.variant
    task = "multilabel" if variant.startswith("tuned_f1") else "dr_grade"
    model = registry.build_model(FLAGS.model, task=task, num_classes=5, image_size=size,
                                 weights=None)
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 255, (FLAGS.batch_size, size, size, 3)).astype("float32")
               for _ in range(FLAGS.batches)]
    if variant == "precise_bn_eager":
        run = lambda: _precise_bn_eager(model, batches)  # noqa: E731
    elif variant == "precise_bn":
        callback = callbacks.PreciseBatchNorm(batches)
        callback.set_model(model)
        run = callback.on_test_begin
    else:
        labels = rng.integers(0, 2, (len(batches) * FLAGS.batch_size, 5)).astype("float32")
        val_ds = tf.data.Dataset.from_tensor_slices((np.concatenate(batches), labels)).batch(
            FLAGS.batch_size)
        if variant == "tuned_f1_eager":
            run = lambda: _tuned_f1_eager(model, val_ds)  # noqa: E731
        else:
            callback = callbacks.TunedMacroF1(val_ds)
            callback.set_model(model)
            run = lambda: callback.on_epoch_end(0, {})  # noqa: E731
    times = []
    for _ in range(2):
        start = time.perf_counter()
        run()
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
