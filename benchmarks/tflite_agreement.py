"""TFLite exports against the SavedModel's `serve_tensor` on a prepared split.

    python -m benchmarks.tflite_agreement --workdir=demo_run [--split=test] [--data_dir=D]

Exports the workdir as a SavedModel (in a temporary folder), converts its
`serve_tensor` signature to TFLite as float32, float16 and int8 (int8 calibrated
on the first 200 training images, as `export.py --format=tflite` does), and runs
all of them on every image of the split: the prepared pixels, float32
[S, S, 3] in [0, 255], as evaluate.py feeds the model. Prints one row per
variant: file size, decision agreement with the SavedModel, the largest,
99th-percentile and mean |probability difference|, and CPU milliseconds per
image (batches of 32, interpreter on all cores).
"""

import os
import pathlib
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app, flags

from input_pipeline import pipeline
from serving import exporting, tflite_export

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "demo_run", "Trained (and evaluated) workdir.")
flags.DEFINE_string("split", "test", "Prepared split to compare on.")
flags.DEFINE_string("data_dir", None, "Prepared data; default: the workdir's data_dir.")
flags.DEFINE_integer("batch_size", 32, "Images per call.")


def _split_images(data_dir: str, spec: exporting.ServingSpec) -> np.ndarray:
    """float32 [N, S, S, 3] in [0, 255]: every image of --split, in file order."""
    ds = pipeline.make_dataset(os.path.join(data_dir, f"{FLAGS.split}-*.tfrecord"),
                               FLAGS.batch_size, training=False,
                               image_size=spec.preprocess.model_image_size, task=spec.task,
                               num_classes=len(spec.class_names))
    return np.concatenate([images.numpy() for images, _ in ds])


def _run(fn, images: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
    """Outputs of fn over `images` in batches, and the milliseconds per image."""
    outs, start = [], time.perf_counter()
    for i in range(0, len(images), FLAGS.batch_size):
        outs.append({k: np.asarray(v) for k, v in fn(images[i:i + FLAGS.batch_size]).items()})
    ms = 1000 * (time.perf_counter() - start) / len(images)
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}, ms


def _row(name: str, size: int, got: dict, want: dict, decision: str, ms: float) -> str:
    diff = np.abs(got["probabilities"] - want["probabilities"]).reshape(len(got[decision]), -1)
    per_image = diff.max(axis=1)
    same = (got[decision].reshape(len(per_image), -1)
            == want[decision].reshape(len(per_image), -1)).all(axis=1)
    return (f"| {name} | {size / 1e6:.2f} | {same.sum()}/{len(same)} ({same.mean():.1%}) | "
            f"{per_image.max():.2e} | {np.percentile(per_image, 99):.2e} | "
            f"{per_image.mean():.2e} | {ms:.2f} |")


def main(argv) -> None:
    del argv
    from training import experiment

    with tempfile.TemporaryDirectory() as tmp:
        version = exporting.export_workdir(FLAGS.workdir, pathlib.Path(tmp), version=1)
        # export_workdir parsed the workdir's operative config: gin holds its data_dir.
        data_dir = FLAGS.data_dir or experiment.resolved_train_config()["data_dir"]
        _, spec, _ = exporting.load_workdir(FLAGS.workdir)
        images = _split_images(data_dir, spec)
        serve_tensor = tf.saved_model.load(str(version)).signatures["serve_tensor"]
        want, ms = _run(lambda x: serve_tensor(image=tf.constant(x)), images)
        saved_model_bytes = sum(f.stat().st_size for f in version.rglob("*") if f.is_file())
        representative = tflite_export.representative_images(data_dir, spec)
        rows = [_row("SavedModel serve_tensor", saved_model_bytes, want, want,
                     spec.decision_name, ms)]
        for quantization in tflite_export.QUANTIZATIONS:
            content = tflite_export.convert(version, quantization, representative)
            got, ms = _run(tflite_export.TFLiteModel(content, os.cpu_count()), images)
            rows.append(_row(f"TFLite {quantization}", len(content), got, want,
                             spec.decision_name, ms))
    print(f"{FLAGS.workdir}: {spec.task} ({spec.head}), {FLAGS.split} split of {data_dir}, "
          f"{len(images)} images at {spec.preprocess.model_image_size} px; int8 calibrated "
          f"on {len(representative)} training images")
    print(f"| variant | MB | same {spec.decision_name} | max abs dp | p99 abs dp | mean abs dp "
          "| ms/image |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
