"""Predicts image files with an exported model or a training workdir; writes a CSV.

    python predict.py --model=E/N PATH... [--out=predictions.csv] [--overwrite]
    python predict.py --workdir=W PATH... [--gradcam_dir=D] [--batch_size=16]

PATHs are image files or folders (searched recursively). Missing, unreadable or
corrupt files and broken symlinks get a row with their error; the others are
still predicted. An existing --out is refused unless --overwrite. Grad-CAM
overlays need the Keras model, hence --workdir. See serving/predicting.py.
"""

import os
import sys

from absl import app, flags, logging

from serving import predicting
from training.config import UnsafeConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Exported SavedModel version directory (E/N).")
flags.DEFINE_string("workdir", None, "Training workdir (instead of --model).")
flags.DEFINE_string("out", "predictions.csv", "Output CSV.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.DEFINE_string("gradcam_dir", None, "Write Grad-CAM overlays here (needs --workdir).")
flags.DEFINE_integer("batch_size", 16, "Images per signature call.")


def main(argv):
    paths = argv[1:]
    if not paths:
        raise app.UsageError("Give at least one image file or folder.")
    if (FLAGS.model is None) == (FLAGS.workdir is None):
        raise app.UsageError("Give exactly one of --model and --workdir.")
    if FLAGS.gradcam_dir and not FLAGS.workdir:
        raise app.UsageError("--gradcam_dir needs --workdir (Grad-CAM needs the Keras model).")
    if os.path.lexists(FLAGS.out) and not FLAGS.overwrite:
        sys.exit(f"predict.py: --out={FLAGS.out} exists; pass --overwrite to replace it")
    files = predicting.find_images(paths)
    try:
        predictor = (predicting.from_saved_model(FLAGS.model) if FLAGS.model
                     else predicting.from_workdir(FLAGS.workdir))
    except (FileNotFoundError, UnsafeConfigError) as e:  # e.g. no best checkpoint
        sys.exit(f"error: {e}")
    rows = predicting.predict_files(predictor, files, FLAGS.batch_size, FLAGS.gradcam_dir)
    predicting.write_csv(rows, predicting.columns(predictor), FLAGS.out)
    errors = sum(1 for r in rows if r["error"])
    logging.info("%d images predicted, %d errors -> %s", len(rows) - errors, errors, FLAGS.out)
    print(f"{len(rows) - errors} predicted, {errors} errors -> {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
