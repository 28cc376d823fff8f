"""Keras callbacks for fundusflow's training loop and its workdir artefacts.

Crash safety (docs/PITFALLS section 2): `BackupAndRestore` restores weights,
optimizer state and the epoch, but not `ModelCheckpoint.best` nor EarlyStopping's
state. `BestCheckpoint` therefore persists its own state to
`checkpoints/best.json` after every epoch and reloads it on resume, and
`ResumableEarlyStopping` continues from that state. Epochs whose logs are not
finite (TerminateOnNaN) are neither checkpointed nor backed up, so the last good
weights survive.

Epoch numbers in file names and JSON are 1-based ("after N epochs");
history.csv keeps Keras' 0-based `epoch` column.

Speed (measured with benchmarks/train_e2e.py): as soon as one callback overrides
`on_train_batch_end` without `async_safe = True`, Keras converts every step's logs
to Python floats on the training thread, which waits for the device at every step
(on an H200 that cost ConvNeXt-Tiny 18 ms of a 21 ms step). So every callback here
either acts at epoch level, counts in `on_train_batch_begin` (no logs, no wait), or
is `async_safe`: its batch-end work runs in Keras' callback thread (JAX backend;
on TensorFlow, Keras dispatches synchronously as before).
"""

import contextlib
import io
import json
import math
import os
import threading
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from training import augmenting, optimizers


def write_json_atomic(path: str, obj) -> None:
    """Writes JSON to `path` via a temporary file and os.replace (never half-written)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    # A temp name per thread: OperativeConfigWriter may write from Keras' callback
    # thread while on_train_end writes the same file (a shared name lost the race).
    tmp = f"{path}.{threading.get_ident()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_weights_atomic(model: keras.Model, path: str) -> None:
    """Model weights only (no optimizer state) to `path` (*.weights.h5), via a temp file.

    `model.save_weights` would add the optimizer's variables, which then fail to
    match (with warnings) when loaded into another stage's optimizer or an
    uncompiled model; BackupAndRestore keeps the optimizer state for resuming.
    """
    from keras.src.saving import saving_lib  # objects_to_skip isn't in the public API

    tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
    skip = [model.optimizer] if getattr(model, "optimizer", None) is not None else None
    with _removed_on_error(tmp):
        saving_lib.save_weights_only(model, tmp, objects_to_skip=skip)
    os.replace(tmp, path)


@contextlib.contextmanager
def _removed_on_error(path: str):
    """Deletes a half-written `path` if the block fails (e.g. ENOSPC), then re-raises."""
    try:
        yield
    except BaseException:
        if os.path.exists(path):
            os.remove(path)
        raise


def load_weights_model_only(model: keras.Model, path: str) -> None:
    """Loads a `save_weights_atomic` file, leaving the model's optimizer state alone."""
    from keras.src.saving import saving_lib

    skip = [model.optimizer] if getattr(model, "optimizer", None) is not None else None
    saving_lib.load_weights_only(model, path, objects_to_skip=skip)


def logs_finite(logs: dict | None) -> bool:
    """True when every numeric value in `logs` is finite (no NaN/inf loss or metric)."""
    return all(math.isfinite(float(v)) for v in (logs or {}).values()
               if isinstance(v, int | float | np.floating | np.integer))


def weights_finite(model: keras.Model) -> bool:
    return all(np.isfinite(w).all() for w in model.get_weights())


def improved(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


class BestCheckpoint(keras.callbacks.Callback):
    """Atomic `best.weights.h5` on the monitored metric, plus `epoch_NNN.weights.h5`.

    State `{monitor, mode, best, best_epoch, last_epoch}` goes to `best.json` after
    every epoch; a resumed run starts from it (the threshold the first post-resume
    epoch must beat), which `ModelCheckpoint` can't do by itself.
    """

    def __init__(self, ckpt_dir: str, monitor: str, mode: str, every_n_epochs: int = 0):
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.ckpt_dir, self.monitor, self.mode, self.every = ckpt_dir, monitor, mode, every_n_epochs
        self.best_path = os.path.join(ckpt_dir, "best.weights.h5")
        self.state_path = os.path.join(ckpt_dir, "best.json")
        self.state = {"monitor": monitor, "mode": mode, "best": None, "best_epoch": None,
                      "last_epoch": 0}
        if os.path.exists(self.state_path):
            with open(self.state_path) as f:
                self.state.update(json.load(f))

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self.monitor not in logs:
            raise KeyError(f"monitor {self.monitor!r} not in logs; available: {sorted(logs)}")
        if not logs_finite(logs) or not weights_finite(self.model):
            return  # keep the last good checkpoint (TerminateOnNaN stops the run next)
        n = epoch + 1
        value = float(logs[self.monitor])
        if improved(value, self.state["best"], self.mode):
            save_weights_atomic(augmenting.network_of(self.model), self.best_path)
            self.state.update(best=value, best_epoch=n)
        if self.every and n % self.every == 0:
            path = os.path.join(self.ckpt_dir, f"epoch_{n:03d}.weights.h5")
            save_weights_atomic(augmenting.network_of(self.model), path)
        self.state["last_epoch"] = n
        write_json_atomic(self.state_path, self.state)


class SafeBackupAndRestore(keras.callbacks.BackupAndRestore):
    """BackupAndRestore that never backs up an epoch with NaN/inf logs, and writes atomically.

    Keras overwrites `latest.weights.h5` in place and then the epoch in
    `training_metadata.json`: a kill or a full disk during the first write leaves a
    backup that cannot be loaded, and one between the two writes pairs the new
    weights with the old epoch (that epoch is then trained twice). Here each backup
    goes to a new `epoch_NNN.weights.h5`; `training_metadata.json` (epoch, batch and
    that file's name), replaced atomically, is the commit point, and the previous
    weights file is deleted only after it. Saves at epoch ends only, so its batch
    hook returns at once and need not hold the training thread (`async_safe`).
    `restore_from`: restore from that backup folder instead of `backup_dir` (the
    processes of a multi-process run other than the chief: they save as the chief
    does, since saving is collective on JAX, but into a private folder, and all
    restore from the chief's backup).
    """

    def __init__(self, backup_dir: str, delete_checkpoint: bool = True,
                 restore_from: str | None = None):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=delete_checkpoint)
        self.async_safe = True
        self.restore_dir = restore_from or backup_dir

    def on_epoch_end(self, epoch, logs=None):
        if logs_finite(logs):
            super().on_epoch_end(epoch, logs)

    def _metadata(self, folder: str | None = None) -> dict | None:
        path = os.path.join(folder or self.backup_dir, "training_metadata.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        previous = self._metadata()
        name = f"epoch_{self._current_epoch:03d}.weights.h5"
        path = os.path.join(self.backup_dir, name)
        tmp = path[: -len(".weights.h5")] + ".tmp.weights.h5"
        with _removed_on_error(tmp):
            self.model.save_weights(tmp)  # weights + optimizer state
        os.replace(tmp, path)
        write_json_atomic(self._training_metadata_path,
                          {"epoch": self._current_epoch, "batch": self._last_batch_seen,
                           "weights": name})
        old = (previous or {}).get("weights")
        if old and old != name and os.path.exists(os.path.join(self.backup_dir, old)):
            os.remove(os.path.join(self.backup_dir, old))

    def _load_model(self):
        meta = self._metadata(self.restore_dir)
        if meta is None:
            return
        if "weights" not in meta and self.restore_dir == self.backup_dir:  # Keras' own
            super()._load_model()
            return
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        self.model.load_weights(os.path.join(self.restore_dir, meta["weights"]))
        self.model._initial_epoch = meta["epoch"]


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose `best`/`wait` continue from BestCheckpoint's persisted state.

    `wait` counts epochs without improvement since the best epoch, but not before
    `stage_start` (epochs already run before this stage), so a new stage gets its
    full patience while a resumed one keeps its count.
    """

    def __init__(self, best_checkpoint: BestCheckpoint, stage_start: int = 0, **kwargs):
        super().__init__(monitor=best_checkpoint.monitor, mode=best_checkpoint.mode, **kwargs)
        self._ckpt, self._stage_start = best_checkpoint, stage_start

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        state = self._ckpt.state
        if state["best"] is not None:
            self.best = state["best"]
            self.best_epoch = state["best_epoch"] - 1
            since = max(state["best_epoch"], self._stage_start)
            self.wait = max(0, state["last_epoch"] - since)


class TerminateOnNaN(keras.callbacks.Callback):
    """Stops training at the first non-finite batch loss and remembers that it did.

    `async_safe`: on JAX the check runs in Keras' callback thread, so the training
    thread never waits for a step's loss; it sees `stop_training` a few steps later
    and ends the epoch, whose NaN logs BestCheckpoint and SafeBackupAndRestore skip,
    so the last good checkpoint and backup stay.
    """

    async_safe = True

    def __init__(self):
        super().__init__()
        self.triggered = False

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            logging.error("Batch %d: loss is %s, stopping; the last good checkpoint is kept.",
                          batch, loss)
            self.triggered = True
            self.model.stop_training = True


class PreciseBatchNorm(keras.callbacks.Callback):
    """Before each validation, re-estimates BatchNorm moving statistics on fixed batches.

    Keras' default BN momentum (0.99) makes the moving statistics trail the weights
    by ~100 steps; in short runs (the demo: 17 steps/epoch) validation then sees stale
    statistics (val QWK 0.35 with moving stats vs 0.80 with batch stats, measured).
    "Precise BN" (Wu & Johnson 2021, "Rethinking Batch in BatchNorm") replaces them by
    the exact average over a few training batches: each batch's mean and variance per
    channel (the BN layers run with momentum 0), averaged with equal weights. Frozen BN
    layers (trainable=False run in inference mode) are untouched. On JAX the forward
    passes are one compiled program (`stateless_call` under `jax.jit`, traced once):
    called eagerly, every op of the network would compile on its own at the first
    validation of each process.

    Args:
        batches: list of image batches [B, S, S, 3] in [0, 255] (float32 or uint8).
    """

    def __init__(self, batches):
        super().__init__()
        self.batches = list(batches)
        self._compiled = None  # JAX: jit of the stateless forward, built on first use

    def on_test_begin(self, logs=None):
        layers = [layer for layer in _sublayers(self.model)
                  if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable]
        if not layers or not self.batches:
            return
        stats = [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]
        saved = [layer.momentum for layer in layers]
        try:
            for layer in layers:
                layer.momentum = 0.0  # read when the call runs (or is traced)
            sums = None
            for images in self.batches:
                batch = self._batch_statistics(images, stats)
                sums = batch if sums is None else [keras.ops.add(total, b) for total, b
                                                    in zip(sums, batch, strict=True)]
        finally:
            for layer, momentum in zip(layers, saved, strict=True):
                layer.momentum = momentum
        for variable, total in zip(stats, sums, strict=True):
            variable.assign(keras.ops.divide(total, len(self.batches)))

    def _batch_statistics(self, images, stats) -> list:
        """The values (float32 tensors) `stats` (BN moving statistics, momentum 0) take
        after a training-mode forward pass on `images`."""
        if keras.backend.backend() != "jax":
            return self._eager_statistics(images, stats)
        if self._compiled is None:
            import jax

            model = self.model

            def forward(trainable, non_trainable, images):
                return model.stateless_call(trainable, non_trainable, images, training=True)[1]

            self._compiled = jax.jit(forward)
        variables = self.model.non_trainable_variables
        updated = self._compiled([v.value for v in self.model.trainable_variables],
                                 [v.value for v in variables], images)
        position = {id(v): i for i, v in enumerate(variables)}
        return [updated[position[id(v)]] for v in stats]

    def _eager_statistics(self, images, stats) -> list:
        """`_batch_statistics` by calling the model (TensorFlow: its eager ops are cheap)."""
        self.model(images, training=True)
        return [keras.ops.copy(v.value) for v in stats]  # before the next pass


def _sublayers(layer):
    for sub in getattr(layer, "layers", []):
        yield sub
        yield from _sublayers(sub)


class LearningRateLogger(keras.callbacks.Callback):
    """Adds `lr_<group>` (learning rate after the epoch's last step) to the epoch logs.

    `groups` is fixed for the whole run so that history.csv keeps its columns across
    stages; a group without an optimizer in this stage (frozen backbone) logs 0.
    """

    def __init__(self, groups):
        super().__init__()
        self.groups = tuple(groups)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            rates = optimizers.current_learning_rates(self.model.optimizer)
            for name in self.groups:
                logs[f"lr_{name}"] = rates.get(name, 0.0)


class OperativeConfigWriter(keras.callbacks.Callback):
    """Writes gin's operative config after the first training step and at the end.

    Only configurables that have run appear in it (PITFALLS section 7), hence the
    wait for a step: by then model, loss and metrics are all built. `async_safe`:
    on JAX the write happens in Keras' callback thread once the first step's logs
    exist; epoch end waits for it, so `on_train_end`'s write comes last.
    """

    async_safe = True

    def __init__(self, path: str):
        super().__init__()
        self.path, self._written = path, False

    def _write(self):
        import gin

        write_text_atomic(self.path, gin.operative_config_str())

    def on_train_batch_end(self, batch, logs=None):
        if not self._written:
            self._write()
            self._written = True

    def on_train_end(self, logs=None):
        self._write()


class Throughput(keras.callbacks.Callback):
    """Training images/s, validation excluded: overall, and steady state.

    `images_per_second` counts every epoch, so it includes tracing/XLA compilation in
    the first epoch of each `fit` (each training stage compiles anew);
    `steady_images_per_second` leaves those first epochs out (None when no other epoch ran).

    Steps are counted as they start (`on_train_batch_begin` gets no logs, so it never
    waits for the device); the clock stops when validation starts, after Keras has
    synced the training state. With `steps_per_execution` k, Keras calls the hook once
    per k steps, with the first step's index: the epoch has then begun steps up to
    index + k, or to its end (`params["steps"]`: the last execution may be shorter).
    """

    def __init__(self, images_per_step: int):
        super().__init__()
        self.images_per_step = images_per_step
        self.seconds, self.steps = 0.0, 0
        self.steady_seconds, self.steady_steps = 0.0, 0
        self._t0 = None
        self._epoch_steps = 0
        self._steps_per_call = 1  # the model's steps_per_execution (on_train_begin)
        self._warm = False  # False during the first epoch of a fit() call

    def on_train_begin(self, logs=None):
        self._warm = False
        # Read once per fit: on JAX every `self.model` syncs fit's whole state into the
        # variables and makes the next step gather it anew (~25 ms per call for
        # EfficientNet-B3 on an H200, measured), which per batch starved the GPU.
        self._steps_per_call = getattr(self.model, "steps_per_execution", 1)

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()
        self._epoch_steps = 0

    def on_train_batch_begin(self, batch, logs=None):
        begun = batch + self._steps_per_call
        steps = (self.params or {}).get("steps")
        self._epoch_steps = min(begun, steps) if steps else begun

    def on_test_begin(self, logs=None):
        if self._t0 is None:
            return
        # validation inside fit: stop the train clock
        seconds = time.perf_counter() - self._t0
        self.seconds += seconds
        self.steps += self._epoch_steps
        if self._warm:
            self.steady_seconds += seconds
            self.steady_steps += self._epoch_steps
        self._t0, self._epoch_steps = None, 0

    def on_epoch_end(self, epoch, logs=None):
        self.on_test_begin()
        self._warm = True

    @property
    def images_per_second(self) -> float:
        return self.steps * self.images_per_step / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_second(self) -> float | None:
        if not self.steady_seconds:
            return None
        return self.steady_steps * self.images_per_step / self.steady_seconds


class TunedMacroF1(keras.callbacks.Callback):
    """Adds `val_tuned_macro_f1` to the epoch logs: validation macro-F1 after per-label
    threshold tuning (multilabel), the RFMiD system's model-selection metric.

    Each epoch: sigmoid probabilities of the validation split (one more pass over it,
    through Keras' compiled predict step), one F1-optimal threshold
    per label (`models.decision.label_threshold`: recall >= min_recall, threshold <=
    max_threshold, else 0.5), and the mean of the per-label F1s at those thresholds.
    Must come before BestCheckpoint / EarlyStopping in the callback list (they read the
    same logs dict).

    Args:
        val_ds: tf.data of (image float32 [B,S,S,3], label float32 [B, C]); one pass.
    """

    NAME = "val_tuned_macro_f1"

    def __init__(self, val_ds, min_recall: float = 0.3, max_threshold: float = 0.7):
        super().__init__()
        self.val_ds, self.min_recall, self.max_threshold = val_ds, min_recall, max_threshold
        self.thresholds = None  # float [C] of the last epoch

    def on_epoch_end(self, epoch, logs=None):
        from models import decision

        probs, labels = [], []
        for images, y in self.val_ds:  # numpy in: also runs on the JAX backend
            logits = self._logits(images.numpy())
            probs.append(1.0 / (1.0 + np.exp(-logits.astype(np.float64))))
            labels.append(y.numpy())
        probs, labels = np.concatenate(probs), np.concatenate(labels)
        tuned = [decision.label_threshold(labels[:, c], probs[:, c],
                                          min_recall=self.min_recall,
                                          max_threshold=self.max_threshold)
                 for c in range(labels.shape[1])]
        self.thresholds = [t["threshold"] for t in tuned]
        if logs is not None:
            logs[self.NAME] = float(np.mean([t["f1"] for t in tuned]))

    def _logits(self, images: np.ndarray) -> np.ndarray:
        """float32 [B, C] logits of a batch: Keras' compiled predict step (on JAX one jitted
        program per batch shape; an eager call would compile and dispatch each op on its
        own), except under a TF strategy, whose predict_on_batch returns the batch once per
        replica (42 rows for 21 on 2 devices, measured)."""
        if tf.distribute.has_strategy():
            return self._eager_logits(images)
        return np.asarray(self.model.predict_on_batch(images))

    def _eager_logits(self, images: np.ndarray) -> np.ndarray:
        return keras.ops.convert_to_numpy(self.model(images, training=False))


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """keras TensorBoard that does not hold the training thread at every step when it
    only writes per epoch (`update_freq="epoch"`, no profiling, no steps/s scalar):
    its batch-end hook then writes nothing (no default summary writer is set)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.async_safe = (self.update_freq == "epoch" and not self._should_trace
                           and not self.write_steps_per_second)


class ConfusionMatrixImage(keras.callbacks.Callback):
    """Logs the validation confusion matrix as an image to TensorBoard each epoch
    (single-label tasks).

    The matrix is the one validation itself decided: read from the compiled
    `models.metrics` confusion-matrix metric `metric_name` (macro_f1), which Keras'
    validation pass fills with the training metrics' decision rule. A second pass over
    the split would cost a forward pass per batch, and on JAX an uncompiled one: each
    of its few hundred ops compiled on first use (~20 s per start, EfficientNet-B3).

    Args:
        metric_name: the compiled metric holding the matrix (K x K).
        class_names: K names, the matrix axes.
        logdir: TensorBoard directory (an "images" run is written beside train/validation).
    """

    def __init__(self, metric_name: str, class_names, logdir: str):
        super().__init__()
        self.metric_name, self.class_names = metric_name, list(class_names)
        self.writer = tf.summary.create_file_writer(os.path.join(logdir, "images"))

    def on_epoch_end(self, epoch, logs=None):
        cm = compiled_confusion(self.model, self.metric_name)
        with self.writer.as_default():
            tf.summary.image("val/confusion_matrix", confusion_matrix_png(cm, self.class_names),
                             step=epoch)
        self.writer.flush()


def compiled_confusion(model: keras.Model, name: str) -> np.ndarray:
    """The int64 [K, K] confusion matrix (rows true class, columns decided class) held by
    the model's compiled `models.metrics` metric `name`: after `evaluate` (or fit's
    validation), that of the split it ran on."""
    for metric in model.metrics:  # the loss tracker, then Keras' CompileMetrics
        for m in getattr(metric, "metrics", [metric]):
            if m.name == name and hasattr(m, "confusion"):
                counts = keras.ops.convert_to_numpy(m.confusion.value)
                return np.rint(counts).astype(np.int64)  # float32 sums of 0/1 (or weights)
    raise ValueError(f"the model has no compiled confusion-matrix metric {name!r}")


def confusion_matrix_png(cm: np.ndarray, class_names) -> tf.Tensor:
    """Renders an int [K, K] confusion matrix (rows true, cols predicted) as uint8 [1,H,W,4]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(class_names),) * 2, dpi=80)
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):  # white on dark cells, black on light ones
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                color="white" if v > cm.max() / 2 else "black")
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)),
           xticklabels=class_names, yticklabels=class_names, xlabel="predicted", ylabel="true")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return tf.image.decode_png(buf.getvalue(), channels=4)[None]


def log_image(logdir: str, name: str, image: np.ndarray, step: int = 0) -> None:
    """Writes one uint8 [H, W, 3] image to TensorBoard run `logdir/images`."""
    writer = tf.summary.create_file_writer(os.path.join(logdir, "images"))
    with writer.as_default():
        tf.summary.image(name, np.asarray(image, np.uint8)[None], step=step)
    writer.flush()
