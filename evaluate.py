"""Evaluates a training workdir: metrics with CIs, tuned thresholds, calibration, report.

    python evaluate.py --workdir=W [--split=test] [--data_dir=D] [--tta]

Writes W/eval/ (metrics.json, thresholds.json for export.py, calibration.json,
predictions_<split>.csv, report.html + PNGs, gradcam/) and TensorBoard images under
W/tensorboard/eval. Thresholds and temperature are tuned on the val split and
applied unchanged to --split. See evaluation/run.py.
"""

from absl import app, flags, logging

from training import compilation  # no keras/TF import: cheap before flag parsing

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (operative_config.gin, checkpoints/).")
flags.DEFINE_string("split", "test", "Split to evaluate ({split}-*.tfrecord in the data dir).")
flags.DEFINE_string("data_dir", None, "Prepared data dir; default: the one used in training.")
flags.DEFINE_bool("tta", False, "Average the logits of the image and its h/v flips.")
flags.DEFINE_integer("n_boot", 1000, "Patient-bootstrap replicates for the 95% CIs (0: none).")
flags.DEFINE_bool("per_class_temperature", False, "Multilabel: one temperature per label.")
flags.DEFINE_integer("gradcam_per_kind", 4, "Grad-CAM examples of correct and of wrong cases.")
flags.DEFINE_string("compilation_cache_dir", compilation.DEFAULT_DIR,
                    "JAX backend: persistent XLA compilation cache ('' turns it off).")
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    from evaluation import run  # after flag parsing: importing TensorFlow is slow

    compilation.enable_compilation_cache(FLAGS.compilation_cache_dir)
    path = run.evaluate(FLAGS.workdir, FLAGS.split, FLAGS.data_dir, FLAGS.tta, FLAGS.n_boot,
                        FLAGS.per_class_temperature, FLAGS.gradcam_per_kind)
    logging.info("Report written")
    print(f"Report: {path}")


if __name__ == "__main__":
    app.run(main)
