"""CLI: how well do global colour statistics alone predict a binary label?

    python -m evaluation.shortcut --labels_csv=D/labels.csv --images_dir=D \\
        --label_column=dme [--positive=1] [--group_column=patient_id]

Six numbers per image (mean and standard deviation of R, G and B over the whole
image) feed a logistic regression, cross-validated in 5 folds grouped by patient;
the out-of-fold ROC AUC is printed. These numbers carry exposure and colour cast,
nothing about lesions: a high AUC means the label can be told from how the images
were taken (camera, clinic, protocol), so a CNN's AUC on that set is weak evidence
that it sees the disease. Rows with an empty label are skipped and counted; an
unreadable image stops with its path.
"""

import os

import cv2
import numpy as np
from absl import app, flags
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, cross_val_predict

from input_pipeline import sources


def colour_stats(path: str) -> np.ndarray:
    """float64 [6]: mean and std of R, G, B in [0, 1] over all pixels of the image file."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"cannot read image {path}")
    pixels = img.reshape(-1, 3)[:, ::-1].astype(np.float64) / 255.0
    return np.r_[pixels.mean(0), pixels.std(0)]


def shortcut_auc(features: np.ndarray, y: np.ndarray, groups, folds: int = 5) -> float:
    """Out-of-fold AUC of a logistic regression on `features` [N, F], grouped folds."""
    model = LogisticRegression(max_iter=2000)
    p = cross_val_predict(model, features, y, groups=groups, cv=GroupKFold(folds),
                          method="predict_proba")[:, 1]
    return float(roc_auc_score(y, p))


def run(labels_csv: str, images_dir: str, label_column: str, positive=("1",),
        image_column: str = "image", group_column: str = "patient_id") -> dict:
    """-> {"auc", "n", "positives", "skipped_unknown"} for the CSV's known labels."""
    df = sources.read_csv(labels_csv)
    sources.require_columns(df, [image_column, label_column], "--label_column/--image_column")
    known = df[df[label_column] != ""]
    y = known[label_column].str.lower().isin([v.lower() for v in positive]).to_numpy(int)
    groups = (known[group_column] if group_column in known.columns
              else known[image_column]).to_numpy()
    x = np.stack([colour_stats(os.path.join(images_dir, p)) for p in known[image_column]])
    return {"auc": shortcut_auc(x, y, groups), "n": len(known), "positives": int(y.sum()),
            "skipped_unknown": len(df) - len(known)}


FLAGS = flags.FLAGS
flags.DEFINE_string("labels_csv", None, "Label CSV.")
flags.DEFINE_string("images_dir", None, "Folder the CSV's image paths are relative to.")
flags.DEFINE_string("label_column", None, "Label column; empty cells are unknown.")
flags.DEFINE_list("positive", ["1"], "Label values counted as positive (others: negative).")
flags.DEFINE_string("image_column", "image", "Image path column.")
flags.DEFINE_string("group_column", "patient_id", "Patient column for the grouped folds.")


def main(argv):
    del argv
    r = run(FLAGS.labels_csv, FLAGS.images_dir or os.path.dirname(FLAGS.labels_csv),
            FLAGS.label_column, FLAGS.positive, FLAGS.image_column, FLAGS.group_column)
    print(f"{FLAGS.label_column} in {{{','.join(FLAGS.positive)}}}: colour-statistics AUC "
          f"{r['auc']:.3f} (5-fold grouped CV; n={r['n']}, {r['positives']} positive, "
          f"{r['skipped_unknown']} unknown skipped)")


if __name__ == "__main__":
    flags.mark_flags_as_required(["labels_csv", "label_column"])
    app.run(main)
