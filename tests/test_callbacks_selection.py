"""Checkpoint-selection callbacks: the per-epoch tuned macro-F1 (RFMiD system) and the
steady-state throughput figure, on hand-made numbers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from training import callbacks as cb


def _logit(p):
    p = np.asarray(p, np.float64)
    return np.log(p / (1 - p)).astype(np.float32)


def test_tuned_macro_f1_by_hand():
    # Label 0: t = 0.35 separates (0.8, 0.4) from (0.3, 0.1): F1 1.0.
    # Label 1: one positive, every p > 0.7 = max threshold: t <= 0.7 calls all 4 positive:
    #   tp 1, fp 3 -> F1 = 2 / (2 + 3) = 0.4. Mean 0.7.
    probs = np.array([[0.8, 0.95], [0.4, 0.8], [0.3, 0.75], [0.1, 0.72]])
    labels = np.array([[1, 1], [1, 0], [0, 0], [0, 0]], np.float32)
    val_ds = tf.data.Dataset.from_tensor_slices((_logit(probs), labels)).batch(3)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Identity()])
    callback = cb.TunedMacroF1(val_ds, min_recall=0.3, max_threshold=0.7)
    callback.set_model(model)
    logs = {"val_loss": 1.0}
    callback.on_epoch_end(0, logs)
    assert logs[cb.TunedMacroF1.NAME] == pytest.approx(0.7)
    assert callback.thresholds == pytest.approx([0.35, 0.1])


def test_steady_throughput_leaves_out_each_fits_first_epoch(monkeypatch):
    clock = iter([0.0, 10.0,  # fit 1, epoch 0: 10 s (compiling), 4 steps
                  10.0, 12.0,  # fit 1, epoch 1: 2 s, 4 steps
                  20.0, 28.0,  # fit 2 (next stage), epoch 2: 8 s (compiling again)
                  30.0, 32.0])  # fit 2, epoch 3: 2 s
    monkeypatch.setattr(cb.time, "perf_counter", lambda: next(clock))
    t = cb.Throughput(images_per_step=8)
    epoch = 0
    for _ in range(2):  # two fit() calls of two epochs
        t.on_train_begin()
        for _ in range(2):
            t.on_epoch_begin(epoch)
            for b in range(4):
                t.on_train_batch_begin(b)  # steps count as they start
            t.on_epoch_end(epoch)
            epoch += 1
    assert t.images_per_second == pytest.approx(16 * 8 / 22)
    assert t.steady_images_per_second == pytest.approx(8 * 8 / 4)
    assert cb.Throughput(8).steady_images_per_second is None


def test_confusion_image_reads_the_matrix_validation_decided(tmp_path):
    """Softmax head, 3 classes, argmax decisions. Labels 0,0,1,2,2 decided 0,1,1,2,0:
    rows true, columns decided -> [[1,1,0],[0,1,0],[1,0,1]]; two evaluate batches add up."""
    from models import metrics

    logits = np.array([[3, 0, 0], [0, 2, 1], [0, 5, 1], [1, 0, 4], [2, 1, 0]], np.float32)
    labels = np.array([0, 0, 1, 2, 2], np.int32)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Identity()])
    model.compile(loss="sparse_categorical_crossentropy",
                  metrics=metrics.get_metrics("multiclass", 3, "softmax"))
    model.evaluate(logits, labels, batch_size=3, verbose=0)
    expected = [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert cb.compiled_confusion(model, "macro_f1").tolist() == expected
    with pytest.raises(ValueError, match="no compiled confusion-matrix metric 'qwk'"):
        cb.compiled_confusion(model, "qwk")
    image = cb.ConfusionMatrixImage("macro_f1", ["a", "b", "c"], str(tmp_path))
    image.set_model(model)
    image.on_epoch_end(0)
    assert list((tmp_path / "images").glob("events.out.tfevents.*"))
