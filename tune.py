"""Grid search over gin bindings: one training run per combination, a results table and
the best combination as a gin file (training/tuning.py).

    python tune.py --gin_file=configs/idrid_binary_resnetv2_lite.gin \\
        --gin_bindings="train.data_dir='prepared'" --out_dir=tune \\
        --grid=train.learning_rate=1e-2,1e-3,1e-4,1e-5 --grid=train.batch_size=2,4
    python train.py --gin_file=configs/idrid_binary_resnetv2_lite.gin \\
        --gin_file=tune/best.gin --gin_bindings="train.data_dir='prepared'" --workdir=W

Writes --out_dir/{results.csv, results.md, best.gin, trial_NNN/}.
"""

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("gin_file", [], "Base gin config files.")
flags.DEFINE_multi_string("gin_bindings", [], "Base bindings, e.g. train.data_dir='D'.")
flags.DEFINE_multi_string("grid", [], "configurable.param=v1,v2,... (gin literals); repeat "
                          "for more parameters.")
flags.DEFINE_string("out_dir", None, "Sweep folder (trial workdirs and the results).")
flags.mark_flag_as_required("out_dir")


def main(argv):
    del argv
    from training import tuning

    try:
        grid = tuning.parse_grid(FLAGS.grid)
    except ValueError as e:
        sys.exit(f"error: {e}")
    rows = tuning.sweep(FLAGS.gin_file, FLAGS.gin_bindings, grid, FLAGS.out_dir)
    print(tuning.markdown_table(rows, ["trial", *grid, "monitor", "best_metric", "status"]))


if __name__ == "__main__":
    app.run(main)
