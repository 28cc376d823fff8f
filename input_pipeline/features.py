"""The one TFRecord feature spec, shared by the writer (prepare) and the parser.

Every prepared example holds:

| key                  | type            | meaning                                      |
| -------------------- | --------------- | -------------------------------------------- |
| image/encoded        | bytes           | JPEG (or PNG) of the pre-processed image     |
| image/height, width  | int64           | its size in pixels                           |
| image/class/label    | int64 [] or [C] | class index, or a multi-hot vector (C labels)|
| image/patient_id     | bytes           | patient id ("" when unknown)                 |
| image/source_path    | bytes           | the source file, relative to --images_dir    |

Single-label tasks (`dr_grade`, `binary`, `multiclass`) store a scalar class
index; `multilabel` stores a 0/1 vector of length `num_classes`. The parser
needs `num_classes` only for `multilabel`.
"""

from collections.abc import Sequence

import tensorflow as tf

IMAGE = "image/encoded"
HEIGHT = "image/height"
WIDTH = "image/width"
LABEL = "image/class/label"
PATIENT_ID = "image/patient_id"
SOURCE = "image/source_path"

TASKS = ("dr_grade", "binary", "multiclass", "multilabel")


def check_task(task: str) -> str:
    """Returns `task`, or raises ValueError naming the known tasks."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return task


def is_multilabel(task: str) -> bool:
    return check_task(task) == "multilabel"


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _ints(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def serialize_example(image_bytes: bytes, label: int | Sequence[int], *, height: int,
                      width: int, patient_id: str = "", source: str = "") -> bytes:
    """Serialises one example to a `tf.train.Example` string.

    Args:
        image_bytes: the encoded (JPEG or PNG) image.
        label: a class index (single-label tasks) or a 0/1 sequence (multilabel).
        height, width: image size in pixels.
        patient_id: patient identifier, "" when unknown.
        source: source path relative to the images folder.
    """
    scalar = isinstance(label, int | bool) or getattr(label, "ndim", 1) == 0
    labels = [label] if scalar else label
    feature = {
            IMAGE: _bytes(image_bytes),
            HEIGHT: _ints([height]),
            WIDTH: _ints([width]),
            LABEL: _ints(labels),
            PATIENT_ID: _bytes(str(patient_id).encode()),
            SOURCE: _bytes(str(source).encode()),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # deterministic=True: map fields are otherwise ordered per process, and
    # resumed prepare runs must write byte-identical shards.
    return example.SerializeToString(deterministic=True)


def feature_spec(task: str, num_classes: int | None = None) -> dict:
    """The parsing spec for `tf.io.parse_single_example` / `parse_example`."""
    if is_multilabel(task):
        if not num_classes:
            raise ValueError("num_classes is required to parse a multilabel dataset")
        label = tf.io.FixedLenFeature([num_classes], tf.int64)
    else:
        label = tf.io.FixedLenFeature([], tf.int64)
    return {
            IMAGE: tf.io.FixedLenFeature([], tf.string),
            HEIGHT: tf.io.FixedLenFeature([], tf.int64),
            WIDTH: tf.io.FixedLenFeature([], tf.int64),
            LABEL: label,
            PATIENT_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
            SOURCE: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }


def parse_example(serialized: tf.Tensor, task: str, num_classes: int | None = None) -> dict:
    """Parses one serialised example into the pipeline's feature dict.

    Returns:
        {"image_bytes": tf.string [], "label": int32 [] (single-label) or
          float32 [C] (multilabel), "patient_id": tf.string [], "source": tf.string []}
    """
    f = tf.io.parse_single_example(serialized, feature_spec(task, num_classes))
    label = f[LABEL]
    label = tf.cast(label, tf.float32) if is_multilabel(task) else tf.cast(label, tf.int32)
    return {
            "image_bytes": f[IMAGE],
            "label": label,
            "patient_id": f[PATIENT_ID],
            "source": f[SOURCE],
    }
