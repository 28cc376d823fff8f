"""Trains a model from gin configs into a workdir.

    python train.py                                   # the demo (configs/demo.gin)
    python train.py --gin_file=configs/X.gin --gin_bindings='train.epochs=3' --workdir=W
    python train.py --gin_file=configs/X.gin --workdir=W --resume   # after a crash

All settings are arguments of `training.experiment.train` (see its docstring) plus
`build_model.*`, `make_dataset.*` and `AugmentConfig.*`.
"""

import os
import sys

from absl import app, flags, logging

from training import compilation  # no keras/TF import: cheap before flag parsing

FLAGS = flags.FLAGS
DEMO_GIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "demo.gin")
flags.DEFINE_multi_string("gin_file", [], "Gin config files (default: configs/demo.gin).")
flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings, e.g. 'train.epochs = 3'.")
flags.DEFINE_string("workdir", "demo_run", "Output directory (see docs/ARCHITECTURE.md).")
flags.DEFINE_bool("resume", False, "Continue the run in --workdir from its last finished epoch.")
flags.DEFINE_string("compilation_cache_dir", compilation.DEFAULT_DIR,
                    "JAX backend: persistent XLA compilation cache ('' turns it off); a "
                    "second start of the same run skips compiling.")


def main(argv):
    del argv
    import gin

    from training import experiment

    compilation.enable_compilation_cache(FLAGS.compilation_cache_dir)
    gin.parse_config_files_and_bindings(FLAGS.gin_file or [DEMO_GIN], FLAGS.gin_bindings)
    try:
        summary = experiment.train(FLAGS.workdir, resume=FLAGS.resume)
    except (FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    logging.info("best %s = %s at epoch %s; %.1f s, %.1f images/s", summary["monitor"],
                 summary["best_metric"], summary["best_epoch"], summary["wall_time_s"],
                 summary["images_per_s"])


if __name__ == "__main__":
    app.run(main)
