"""Serving latency: an exported model's SavedModel signature, JPEG bytes in, on CPU.

    python -m benchmarks.serving_latency [--model=mobilenetv3_large] [--image_size=224]

Exports `--model` (random weights; the weights do not change the speed) for a
dr_grade task with the fundus crop, then times `serving_default` (JPEG bytes of
synthetic raw photographs in: decode, fundus crop, resize, model, decision)
and, for comparison, `serve_tensor` (float pixels in: the model and decision
only). Per batch size: images/s and p50 / p95 milliseconds per call, warm-up
calls excluded. Not a test: timings depend on the machine and its load.
"""

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "mobilenetv3_large", "Registered backbone.")
flags.DEFINE_integer("image_size", 224, "Model input size S.")
flags.DEFINE_integer("dataset_image_size", 512, "prepare's image size (the crop is resized to it).")
flags.DEFINE_integer("photo_height", 1024, "Raw photograph height; width is 1.5x (black sides).")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Batch sizes to time.")
flags.DEFINE_integer("warmup", 3, "Untimed calls per batch size (tracing, allocator).")
flags.DEFINE_integer("calls", 20, "Timed calls per batch size.")


def _photos(n: int, size: int, distinct: int = 8) -> list[bytes]:
    """n JPEGs of wide (3:2) synthetic fundus photographs of height `size`, cycling
    through `distinct` renderings (rendering is slow; decoding cost is the same)."""
    from input_pipeline import synthetic

    rng = np.random.default_rng(0)
    unique = [synthetic.encode_jpeg(synthetic.render_fundus(rng, size, wide=True))
              for _ in range(min(n, distinct))]
    return [unique[i % len(unique)] for i in range(n)]


def _export(workdir: str) -> str:
    from models import build_model
    from serving import exporting

    model = build_model(FLAGS.model, "dr_grade", 5, FLAGS.image_size)
    info = {"task": "dr_grade", "num_classes": 5, "class_names": list("01234"),
            "image_size": FLAGS.dataset_image_size, "preprocessing": {"crop": "fundus"}}
    spec = exporting.spec_from_dataset(model, info)
    return str(exporting.write_saved_model(model, spec, workdir))


def _time_calls(fn, arg) -> np.ndarray:
    """Milliseconds per call, float [calls], after FLAGS.warmup untimed calls."""
    for _ in range(FLAGS.warmup):
        fn(arg)
    times = []
    for _ in range(FLAGS.calls):
        t0 = time.perf_counter()
        out = fn(arg)
        _ = {k: v.numpy() for k, v in out.items()}  # results on the host, like a server
        times.append((time.perf_counter() - t0) * 1e3)
    return np.array(times)


def _row(name: str, batch: int, ms: np.ndarray) -> str:
    return (f"| {name} | {batch} | {batch * 1e3 / np.mean(ms):8.1f} | "
            f"{np.percentile(ms, 50):8.1f} | {np.percentile(ms, 95):8.1f} |")


def main(argv):
    del argv
    height, width = FLAGS.photo_height, FLAGS.photo_height * 3 // 2
    batches = [int(b) for b in FLAGS.batch_sizes]
    photos = _photos(max(batches), height)
    with tempfile.TemporaryDirectory() as workdir:
        loaded = tf.saved_model.load(_export(workdir))
        serve_bytes = loaded.signatures["serving_default"]
        serve_tensor = loaded.signatures["serve_tensor"]
        s = FLAGS.image_size
        print(f"{FLAGS.model} at {s} px, CPU ({os.cpu_count()} cores), JPEG photos "
              f"{width}x{height} (~{np.mean([len(p) for p in photos]) / 1e3:.0f} kB), "
              f"dataset size {FLAGS.dataset_image_size}; {FLAGS.calls} timed calls "
              f"after {FLAGS.warmup} warm-up\n")
        print("| signature | batch | images/s | p50 ms/call | p95 ms/call |")
        print("|---|---|---|---|---|")
        for b in batches:
            ms = _time_calls(lambda x: serve_bytes(image_bytes=x), tf.constant(photos[:b]))
            print(_row("serving_default (JPEG bytes)", b, ms), flush=True)
            pixels = tf.random.uniform([b, s, s, 3], 0, 255, seed=0)
            ms = _time_calls(lambda x: serve_tensor(image=x), pixels)
            print(_row("serve_tensor (float pixels)", b, ms), flush=True)


if __name__ == "__main__":
    app.run(main)
