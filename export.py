"""Exports a trained workdir for serving.

    python export.py --workdir=W --export_dir=E [--version=N] [--format=saved_model|onnx]

saved_model: E/N/ is a SavedModel (TF Serving's versioned layout) whose
`serving_default` signature takes encoded JPEG/PNG bytes and returns
probabilities, the tuned decision and the class names, plus model_card.md.
onnx: E/N/model.onnx (tensor in: float32 [B, S, S, 3] in [0, 255]) with
preprocessing.json describing what the client must do first.
See serving/exporting.py.
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
flags.DEFINE_enum("format", "saved_model", ["saved_model", "onnx"], "What to write.")
flags.mark_flags_as_required(["workdir", "export_dir"])


def main(argv):
    del argv
    try:
        out = exporting.export_workdir(FLAGS.workdir, FLAGS.export_dir, FLAGS.version,
                                       FLAGS.format)
    except (FileNotFoundError, FileExistsError, UnsafeConfigError) as e:
        sys.exit(f"error: {e}")
    logging.info("Exported %s to %s", FLAGS.format, out)
    print(out)


if __name__ == "__main__":
    app.run(main)
