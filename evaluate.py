"""Evaluates a training workdir: metrics with CIs, tuned thresholds, calibration, report.

    python evaluate.py --workdir=W [--split=test] [--tta]
    python evaluate.py --workdir=W --data_dir=D --split=test     # external validation

On W's own data: writes W/eval/ (metrics.json, thresholds.json for export.py,
calibration.json, predictions_<split>.csv, report.html + PNGs, gradcam/) and TensorBoard
images under W/tensorboard/eval. Temperature and decision rule are tuned on the val split
and applied unchanged to --split (with --split=val the report flags the result as
optimistic). With --tta, export.py then averages the flips in the served graph too.

External validation (D prepared from another source, same classes and pre-processing,
e.g. only a test split): nothing is tuned on D; temperature, rule and TTA are the served
ones from W/eval/thresholds.json (tuned on W's val split; tuned now and written there when
absent). Results go to W/eval/external/<name of D>/. See evaluation/run.py.
"""

import sys

from absl import app, flags, logging

from training import compilation  # no keras/TF import: cheap before flag parsing

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (operative_config.gin, checkpoints/).")
flags.DEFINE_string("split", "test", "Split to evaluate ({split}-*.tfrecord in the data dir).")
flags.DEFINE_string("data_dir", None, "Prepared data dir; default: the one used in training.")
flags.DEFINE_bool("tta", None, "Average the logits of the image and its h/v flips (default: "
                  "off on W's own data; the served setting for an external --data_dir).")
flags.DEFINE_integer("n_boot", 1000, "Patient-bootstrap replicates for the 95% CIs (0: none).")
flags.DEFINE_bool("per_class_temperature", False, "Multilabel: one temperature per label.")
flags.DEFINE_integer("gradcam_per_kind", 4, "Grad-CAM examples of correct and of wrong cases.")
flags.DEFINE_string("compilation_cache_dir", compilation.DEFAULT_DIR,
                    "JAX backend: persistent XLA compilation cache ('' turns it off).")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    from evaluation import run  # after flag parsing: importing TensorFlow is slow
    from input_pipeline.integrity import CorruptShardError
    from training.config import UnsafeConfigError

    compilation.enable_compilation_cache(FLAGS.compilation_cache_dir)
    try:
        path = run.evaluate(FLAGS.workdir, FLAGS.split, FLAGS.data_dir, FLAGS.tta,
                            FLAGS.n_boot, FLAGS.per_class_temperature, FLAGS.gradcam_per_kind)
    except (FileNotFoundError, CorruptShardError, UnsafeConfigError) as e:
        sys.exit(f"error: {e}")
    logging.info("Report written")
    print(f"Report: {path}")


if __name__ == "__main__":
    app.run(main)
