"""input_pipeline.sampling: rejection samplers and the effective-distribution log."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import sampling


def _stream(labels) -> tf.data.Dataset:
    """An infinite shuffled stream of {"label": ...} dicts."""
    ds = tf.data.Dataset.from_tensor_slices({"label": labels})
    return ds.shuffle(len(labels), seed=0).repeat()


def _take_labels(ds: tf.data.Dataset, n: int) -> np.ndarray:
    return np.stack([f["label"].numpy() for f in ds.take(n)])


def test_class_balanced_weights_golden():
    np.testing.assert_allclose(sampling.class_balanced_weights([10, 5, 0, 20]),
                               [0.5, 1.0, 0.0, 0.25])
    with pytest.raises(ValueError):
        sampling.class_balanced_weights([0, 0])


def test_rarest_label_weights_golden():
    per_label, normal = sampling.rarest_label_weights([100, 10, 50])
    np.testing.assert_allclose(per_label, [0.1, 1.0, 0.2])
    assert normal == pytest.approx(0.1)  # no normal_count: the smallest label weight
    per_label, normal = sampling.rarest_label_weights([100, 10, 50], normal_count=5)
    np.testing.assert_allclose(per_label, [0.05, 0.5, 0.1])
    assert normal == pytest.approx(1.0)


def test_class_balanced_sampler_gives_uniform_classes(caplog):
    counts = [600, 150, 50]
    labels = np.repeat(np.arange(3), counts).astype(np.int32)
    with caplog.at_level(logging.INFO, logger="absl"):
        ds = sampling.resample(_stream(labels), "class_balanced", counts, seed=1)
    assert "expected fractions [0.3333, 0.3333, 0.3333]" in caplog.text
    fractions = np.bincount(_take_labels(ds, 3000), minlength=3) / 3000
    np.testing.assert_allclose(fractions, [1 / 3] * 3, atol=0.035)


def _multilabel(n: int = 1000) -> np.ndarray:
    """float32 [n, 3]: label 0 common (50 %), label 1 rare (4 %), 30 % with none."""
    rng = np.random.default_rng(0)
    y = np.zeros((n, 3), np.float32)
    y[:500, 0] = 1
    y[500:540, 1] = 1
    y[540:700, 2] = 1
    y[rng.choice(500, 20, replace=False), 1] = 1  # some rare labels co-occur with label 0
    return y


def test_rarest_label_sampler_over_represents_the_rare_label_by_the_expected_factor():
    y = _multilabel()
    counts = y.sum(axis=0)
    per_label, normal = sampling.rarest_label_weights(counts)
    w = np.where(y.any(axis=1), (y * per_label).max(axis=1), normal)
    expected = (w * y[:, 1]).sum() / w.sum()  # P(rare label) after sampling
    factor = expected / y[:, 1].mean()
    assert factor > 4  # the test data really do make the rare label rarer

    ds = sampling.resample(_stream(y), "rarest_label", counts, seed=3)
    observed = _take_labels(ds, 4000)[:, 1].mean()
    assert observed / y[:, 1].mean() == pytest.approx(factor, rel=0.12)


def test_rarest_label_normal_count_sets_the_weight_of_unlabelled_examples():
    y = _multilabel()
    counts = y.sum(axis=0)
    normal_count = int((~y.any(axis=1)).sum())  # 300 -> weight between the labels'
    ds = sampling.resample(_stream(y), "rarest_label", counts, seed=3,
                           normal_count=normal_count)
    got = _take_labels(ds, 3000)
    per_label, normal = sampling.rarest_label_weights(counts, normal_count)
    w = np.where(y.any(axis=1), (y * per_label).max(axis=1), normal)
    expected_none = (w * ~y.any(axis=1)).sum() / w.sum()
    assert (~got.any(axis=1)).mean() == pytest.approx(expected_none, abs=0.03)


def test_resample_is_deterministic_for_a_seed():
    labels = np.repeat(np.arange(3), [60, 15, 5]).astype(np.int32)
    a = _take_labels(sampling.resample(_stream(labels), "class_balanced", [60, 15, 5], 7), 50)
    b = _take_labels(sampling.resample(_stream(labels), "class_balanced", [60, 15, 5], 7), 50)
    np.testing.assert_array_equal(a, b)


def test_unknown_sampler_and_missing_counts_raise():
    with pytest.raises(ValueError, match="Unknown sampling"):
        sampling.acceptance_fn("nope", [1, 2])
    with pytest.raises(ValueError, match="class_counts"):
        sampling.acceptance_fn("class_balanced", None)


def test_effective_distribution_counts_tuples_and_dicts(caplog):
    labels = np.array([0, 0, 1, 2, 2, 2, 0, 1], np.int32)
    tuples = tf.data.Dataset.from_tensor_slices((tf.zeros([8, 2]), labels)).batch(4)
    with caplog.at_level(logging.INFO, logger="absl"):
        fractions = sampling.effective_distribution(tuples, num_batches=2, num_classes=4)
    np.testing.assert_allclose(fractions, [3 / 8, 2 / 8, 3 / 8, 0])
    assert "Effective distribution over 8 examples" in caplog.text

    y = _multilabel()[495:505]  # label 0 then labels 1 (and 0 where they co-occur)
    multi = tf.data.Dataset.from_tensor_slices({"label": y}).batch(5)
    np.testing.assert_allclose(sampling.effective_distribution(multi, 2), y.mean(axis=0))
