"""How closely the export graph's field detection follows prepare's, on real photographs.

    python -m benchmarks.serving_parity [--every=12]

For every --every-th photograph of ../shared/data/mexico_fundus, the circle of
`input_pipeline.serving.find_fundus` (TF ops, inside the SavedModel) is compared
with `input_pipeline.preprocessing.find_fundus` (numpy/OpenCV, used by prepare)
on the same decoded pixels. Prints the largest and 99th-percentile difference of
(cx, cy, r) in pixels, also relative to the radius. The exact-pixel parity of the
whole pre-processing is a unit test (tests/test_serving.py); this is its check
at full resolution on the real set.
"""

import pathlib

import numpy as np
import pandas as pd
import tensorflow as tf
from absl import app, flags

from input_pipeline import preprocessing, serving

FLAGS = flags.FLAGS
flags.DEFINE_string("mexico_dir", "../shared/data/mexico_fundus",
                    "Mexican fundus set (labels.csv, images/).")
flags.DEFINE_integer("every", 12, "Use every N-th photograph.")


def main(argv) -> None:
    del argv
    mexico_dir = pathlib.Path(FLAGS.mexico_dir)
    paths = [mexico_dir / p for p in pd.read_csv(mexico_dir / "labels.csv")["image"]]
    paths = paths[::FLAGS.every]
    find = tf.function(serving.find_fundus)
    diffs, relative, no_field = [], [], []
    for path in paths:
        img = preprocessing.read_image(path)
        want = preprocessing.find_fundus(img)
        if want is None:  # prepare rejects these; serving falls back to a square
            no_field.append(path.name)
            continue
        got = find(tf.constant(img)).numpy()
        diff = np.abs(got - [want.cx, want.cy, want.r]).max()
        diffs.append(diff)
        relative.append(diff / want.r)
    diffs, relative = np.array(diffs), np.array(relative)
    print(f"serving vs prepare field circle on {len(paths)} photographs of {mexico_dir} "
          f"({len(no_field)} without a field: {no_field[:5]})")
    print(f"max |d(cx, cy, r)| {diffs.max():.2f} px, p99 {np.percentile(diffs, 99):.2f} px, "
          f"median {np.median(diffs):.2f} px; relative to r: max {relative.max():.2%}, "
          f"p99 {np.percentile(relative, 99):.2%}")


if __name__ == "__main__":
    app.run(main)
