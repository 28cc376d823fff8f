"""Exports a trained workdir for serving.

    python export.py --workdir=W --export_dir=E [--version=N] [--format=saved_model|onnx|tflite]
        [--tflite_quantization=float32|float16|int8] [--data_dir=D]

saved_model: E/N/ is a SavedModel (TF Serving's versioned layout) whose
`serving_default` signature takes encoded JPEG/PNG bytes and returns
probabilities, the tuned decision and the class names, plus model_card.md.
onnx: E/N/model.onnx (tensor in: float32 [B, S, S, 3] in [0, 255]) with
preprocessing.json describing what the client must do first.
tflite: E/N/model.tflite, the same tensor-in model for tf.lite.Interpreter (edge
devices), float32, float16 or int8 (calibrated on training images of the
workdir's data_dir, or --data_dir), with preprocessing.json.
See serving/exporting.py, serving/onnx_export.py, serving/tflite_export.py.
"""

import sys

from absl import app, flags, logging

from serving import exporting
from training.config import UnsafeConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (operative_config.gin, checkpoints/).")
flags.DEFINE_string("export_dir", None, "Base export directory; the model goes to E/<version>/.")
flags.DEFINE_integer("version", None, "Version sub-directory (a positive integer, as TF "
                     "Serving requires); default: next free integer.", lower_bound=1)
flags.DEFINE_enum("format", "saved_model", ["saved_model", "onnx", "tflite"], "What to write.")
flags.DEFINE_enum("tflite_quantization", "float32", ["float32", "float16", "int8"],
                  "TFLite weights/activations; int8 calibrates on training images.")
flags.DEFINE_string("data_dir", None, "Prepared data for int8 calibration (train shards); "
                    "default: the workdir's data_dir.")
flags.mark_flags_as_required(["workdir", "export_dir"])


def main(argv):
    del argv
    try:
        out = exporting.export_workdir(FLAGS.workdir, FLAGS.export_dir, FLAGS.version,
                                       FLAGS.format, FLAGS.tflite_quantization, FLAGS.data_dir)
    except (FileNotFoundError, FileExistsError, UnsafeConfigError) as e:
        sys.exit(f"error: {e}")
    logging.info("Exported %s to %s", FLAGS.format, out)
    print(out)


if __name__ == "__main__":
    app.run(main)
