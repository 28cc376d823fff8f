"""Re-sampling of an (infinite, shuffled) training stream to fight class imbalance.

Both samplers are rejection samplers: every example gets a weight w from its
label, and is kept with probability w / max(w), drawn with a stateless uniform
seeded by (seed, element index). The kept stream then holds each example in
proportion to w. One pass, no per-class copies of the input, and it works the
same on a cached or a streamed dataset; the cost is reading (not decoding: the
filter runs before `decode`) the examples that are rejected.

- "class_balanced" (single-label): w = 1 / count[class], so classes come out
  uniform.
- "rarest_label" (multilabel, the RFMiD winners' sampler): w = 1 / count of the
  rarest label the example carries; an example with no positive label gets
  1 / `normal_count` (the "normal" pseudo-class) when given, else the smallest
  label weight.
"""

import numpy as np
import tensorflow as tf
from absl import logging

SAMPLERS = ("class_balanced", "rarest_label")


def _inverse(counts) -> np.ndarray:
    counts = np.asarray(counts, np.float64)
    return np.where(counts > 0, 1.0 / np.maximum(counts, 1.0), 0.0)


def class_balanced_weights(class_counts) -> np.ndarray:
    """Acceptance probability per class, float32 [K]: min positive count / count."""
    w = _inverse(class_counts)
    if not w.any():
        raise ValueError("class_counts are all zero")
    return (w / w.max()).astype(np.float32)


def rarest_label_weights(class_counts, normal_count=None) -> tuple[np.ndarray, float]:
    """(acceptance per label float32 [C], acceptance of examples with no label).

    The weight of an example is the largest of its labels' weights, so these are
    already normalised by the largest weight any example can have.
    """
    w = _inverse(class_counts)
    if not w.any():
        raise ValueError("class_counts are all zero")
    normal = 1.0 / normal_count if normal_count else w[w > 0].min()
    top = max(w.max(), normal)
    return (w / top).astype(np.float32), float(normal / top)


def acceptance_fn(sampling: str, class_counts, normal_count=None):
    """label (int32 [] or float32 [C]) -> acceptance probability float32 []."""
    if class_counts is None:
        raise ValueError(f"sampling={sampling!r} needs class_counts (or a dataset.json)")
    if sampling == "class_balanced":
        table = tf.constant(class_balanced_weights(class_counts))
        return lambda label: tf.gather(table, label)
    if sampling == "rarest_label":
        per_label, normal = rarest_label_weights(class_counts, normal_count)
        table = tf.constant(per_label)

        def accept(label):
            w = tf.reduce_max(tf.where(label > 0.5, table, 0.0))
            return tf.where(tf.reduce_any(label > 0.5), w, normal)
        return accept
    raise ValueError(f"Unknown sampling {sampling!r}; known: {', '.join(SAMPLERS)}")


def resample(dataset: tf.data.Dataset, sampling: str, class_counts, seed,
             normal_count=None) -> tf.data.Dataset:
    """Keeps each element (a dict with "label") with its acceptance probability.

    Args:
        dataset: elements are feature dicts; usually shuffled and repeated.
        sampling: "class_balanced" or "rarest_label".
        class_counts: examples per class, or positives per label (multilabel).
        seed: int or int64 [2] tensor; with the element index it seeds the draw.
        normal_count: examples with no positive label (rarest_label only).
    """
    accept = acceptance_fn(sampling, class_counts, normal_count)
    _log_expected(sampling, class_counts, normal_count)
    base = tf.constant([seed, 0], tf.int64) if isinstance(seed, int) else seed

    def keep(index, features):
        u = tf.random.stateless_uniform(
                [], tf.random.experimental.stateless_fold_in(base, index))
        return u < accept(features["label"])

    return dataset.enumerate().filter(keep).map(lambda index, features: features)


def _log_expected(sampling: str, class_counts, normal_count) -> None:
    """Logs what the sampler should produce (compare with `effective_distribution`)."""
    counts = np.asarray(class_counts, np.float64)
    if sampling == "class_balanced":
        accepted = counts * class_balanced_weights(counts)
        logging.info("class_balanced sampling: counts %s -> expected fractions %s (keeps %.1f%%)",
                     counts.tolist(), np.round(accepted / accepted.sum(), 4).tolist(),
                     100 * accepted.sum() / counts.sum())
    else:
        per_label, normal = rarest_label_weights(counts, normal_count)
        logging.info("rarest_label sampling: positives %s -> acceptance per label %s, "
                     "no-label acceptance %.4f", counts.tolist(),
                     np.round(per_label, 4).tolist(), normal)


def _labels_of(element) -> np.ndarray:
    label = element["label"] if isinstance(element, dict) else element[1]
    return np.asarray(label)


def effective_distribution(dataset: tf.data.Dataset, num_batches: int,
                           num_classes: int | None = None) -> np.ndarray:
    """Fraction of examples per class (or carrying each label) over `num_batches`.

    Works on batches of (image, label) tuples or dicts with "label"; logs the
    counts and fractions with absl logging.

    Returns:
        float64 [K]: for single-label int labels, fractions summing to 1; for
        multi-hot [B, C] labels, the fraction of examples with each label.
    """
    counts, total = None, 0
    for element in dataset.take(num_batches):
        labels = _labels_of(element)
        if labels.ndim == 1:
            batch = np.bincount(labels.astype(np.int64), minlength=num_classes or 0)
        else:
            batch = (labels > 0.5).sum(axis=0)
        if counts is not None and len(batch) > len(counts):
            counts = np.pad(counts, (0, len(batch) - len(counts)))
        elif counts is not None:
            batch = np.pad(batch, (0, len(counts) - len(batch)))
        counts = batch if counts is None else counts + batch
        total += len(labels)
    if counts is None:
        raise ValueError("the dataset yielded no batches")
    fractions = counts / max(total, 1)
    logging.info("Effective distribution over %d examples: counts %s, fractions %s",
                 total, counts.tolist(), np.round(fractions, 4).tolist())
    return fractions
