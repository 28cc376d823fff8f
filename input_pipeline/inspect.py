"""CLI: a grid PNG of augmented training samples with their labels.

    python -m input_pipeline.inspect --data_dir=prepared --split=train \\
        --image_size=224 --num=16 --out=grid.png [--gin_file=configs/x.gin] \\
        [--gin_bindings="AugmentConfig.randaugment_layers = 2"]

It runs the real training pipeline (`pipeline.make_dataset(training=True)`, with
the dataset's modality defaults, the gin-bound `AugmentConfig` and `make_dataset`
arguments), so what you see is
what the model gets. `make_grid` is also what the trainer logs to TensorBoard.
"""

import json
import math
import os

import cv2
import gin
import numpy as np
from absl import app, flags, logging

from input_pipeline import augment, modality, pipeline

_LABEL_SCALE = 0.4


def _label_text(label, class_names=None) -> str:
    """Class name / index, or the positive labels of a multi-hot vector ("-" if none)."""
    label = np.asarray(label)
    if label.ndim == 0:
        i = int(label)
        return class_names[i] if class_names and i < len(class_names) else str(i)
    on = np.flatnonzero(label > 0.5)
    names = [class_names[i] if class_names and i < len(class_names) else str(i) for i in on]
    return ",".join(names) or "-"


def make_grid(images, labels=None, class_names=None, cols: int | None = None) -> np.ndarray:
    """Tiles images into one picture, each with its label written in the corner.

    Args:
        images: [N, H, W, 3], float in [0, 255] (pipeline output) or uint8.
        labels: N class indices or N multi-hot vectors, or None for no text.
        class_names: optional names for the indices.
        cols: images per row; default ceil(sqrt(N)).
    Returns:
        uint8 [rows * H, cols * W, 3] RGB (empty cells black).
    """
    images = np.clip(np.asarray(images, np.float32), 0, 255).round().astype(np.uint8)
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, image in enumerate(images):
        tile = np.ascontiguousarray(image)
        if labels is not None:
            _put_text(tile, _label_text(labels[i], class_names))
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return grid


def _put_text(tile: np.ndarray, text: str) -> None:
    """White text with a black outline: readable on dark fundus and bright lesions."""
    scale = _LABEL_SCALE * max(tile.shape[0], 64) / 128
    org = (3, int(14 * scale / _LABEL_SCALE))
    for colour, thickness in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(tile, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness,
                    cv2.LINE_AA)


def write_grid(data_dir: str, split: str, image_size: int, num: int, out: str,
               seed: int = 0) -> np.ndarray:
    """Writes `num` augmented `split` samples of the prepared data in `data_dir` to `out`."""
    with open(os.path.join(data_dir, "dataset.json")) as f:
        info = json.load(f)
    ds = pipeline.make_dataset(os.path.join(data_dir, f"{split}-*.tfrecord"), num,
                               training=True, image_size=image_size, task=info["task"],
                               num_classes=info.get("num_classes"),
                               augment_config=augment.config_for_modality(
                                   modality.modality_of(info)), seed=seed)
    images, labels = next(iter(ds))
    grid = make_grid(images.numpy(), labels.numpy(), info.get("class_names"))
    if not cv2.imwrite(out, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {out}")
    return grid


def main(_):
    FLAGS = flags.FLAGS
    gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_bindings)
    grid = write_grid(FLAGS.data_dir, FLAGS.split, FLAGS.image_size, FLAGS.num, FLAGS.out,
                      FLAGS.seed)
    logging.info("Wrote %s (%dx%d)", FLAGS.out, grid.shape[1], grid.shape[0])


def _define_flags() -> None:
    flags.DEFINE_string("data_dir", None, "Folder with dataset.json and the shards.")
    flags.DEFINE_string("split", "train", "Split whose shards to read.")
    flags.DEFINE_integer("image_size", 224, "Model input size.")
    flags.DEFINE_integer("num", 16, "Number of samples.")
    flags.DEFINE_string("out", "grid.png", "Output PNG.")
    flags.DEFINE_integer("seed", 0, "Pipeline seed.")
    flags.DEFINE_multi_string("gin_file", [], "Gin files.")
    flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings.")
    flags.mark_flag_as_required("data_dir")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
