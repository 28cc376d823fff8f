"""The single gin root, `train(...)`, and `build_from_config(workdir)`.

    train(workdir, data_dir=..., model="resnetv2_lite", epochs=20, ...)

Steps (one small function each): read dataset.json -> check the workdir (resuming:
refuse a changed plan) -> seed and precision -> tf.data -> model -> loss/metrics ->
first stage compiled -> first batches read -> only now the workdir is created (a
bad config or bad data fails before, leaving nothing) -> for each stage (frozen
backbone, then all layers) a fresh optimizer, compile and fit -> artefacts. A fresh
run that fails before its first epoch's backup removes what it wrote.

Workdir (docs/ARCHITECTURE.md): config.gin (as parsed), operative_config.gin
(after the first step), dataset.json, checkpoints/{best,epoch_NNN}.weights.h5 +
best.json, backup/stage_N/ (BackupAndRestore, removed when training completes),
history.csv, tensorboard/, model.keras (best weights), training_summary.json,
resume_log.json (one entry per resume).

gin: only `train` is configured here; `models.build_model` and
`input_pipeline.augment.AugmentConfig` take their own bindings too. A binding for
an argument that `train` passes explicitly would be ignored silently
(PITFALLS section 7), so `_check_shadowed_bindings` turns it into an error.
"""

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import pathlib
import shutil
import time

import gin
import keras
import numpy as np
import tensorflow as tf
from absl import logging

import models
from input_pipeline import augment, integrity, pipeline  # noqa: F401  (augment: gin)
from input_pipeline import inspect as inspect_lib
from input_pipeline import modality as modality_lib
from models import backbones, decision, heads, losses, metrics  # noqa: F401  (backbones: gin configurables)
from training import augmenting, initialization, multistep, optimizers, prefetch
from training import callbacks as cb
from training import config as config_lib
from training import distribution as distribution_lib

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
# Arguments `_build_model` passes to models.build_model (bind train.X, never build_model.X).
_MODEL_ARGS = ("name", "task", "num_classes", "image_size", "weights", "dropout", "head")
_DATASET_ARGS = ("file_pattern", "batch_size", "training", "image_size", "task", "num_classes",
                 "seed", "deterministic", "augment_config", "pixel_dtype")


@dataclasses.dataclass(frozen=True)
class Stage:
    """Epochs [start, end) trained with the backbone frozen or not, at base LR * lr_factor."""

    index: int
    start: int
    end: int
    train_backbone: bool
    lr_factor: float


@gin.configurable(denylist=["workdir", "resume", "allow_changes"])
def train(workdir: str, resume: bool = False, allow_changes: bool = False, *,
          data_dir: str = gin.REQUIRED,
          model: str = "resnetv2_lite", task: str | None = None, head: str | None = None,
          image_size: int = 128, weights: str | None = None, dropout: float = 0.0,
          batch_size: int = 32, epochs: int = 20,
          loss: str | None = None, loss_kwargs: dict | None = None,
          class_weight: str | None = None, pos_weight: bool = False,
          pos_weight_clamp: float = 10.0,
          learning_rate: float = 1e-3, weight_decay: float = 0.05, warmup_epochs: float = 1.0,
          min_lr_ratio: float = 0.01, backbone_lr_factor: float | None = None,
          head_lr_factor: float = 1.0, use_ema: bool = False, clipnorm: float | None = None,
          freeze_backbone_epochs: int = 0, finetune_lr_factor: float = 0.1,
          monitor: str | None = None, mode: str = "auto", early_stopping_patience: int = 0,
          checkpoint_every_epochs: int = 5, seed: int = 0, deterministic: bool = False,
          precision: str = "float32", jit_compile: bool = True,
          steps_per_epoch: int | None = None, bn_recalibration_batches: int = 0,
          tensorboard: bool = True, tune_thresholds_each_epoch: bool = False,
          threshold_min_recall: float = 0.3, threshold_max: float = 0.7,
          distribution: str = "auto", lr_scaling: str = "none",
          augment_on: str = "auto", device_prefetch: int | None = None,
          steps_per_execution: int | None = None, verbose: int = 2) -> dict:
    """Trains a model on a prepared data dir; returns the training summary dict.

    Args:
        workdir: output directory; must be new/empty unless `resume`.
        resume: continue from the last finished epoch (weights + optimizer state);
            refused when the config differs from the workdir's config.gin...
        allow_changes: ...unless this is True: then the differing bindings are
            appended to config.gin, operative_config.gin and resume_log.json.
        data_dir: `prepare` output: `{split}-*.tfrecord` + dataset.json.
        model, head, weights, dropout: `models.build_model` arguments; task None ->
            dataset.json's task.
        image_size: model input S (pixels float32 [0, 255], [B, S, S, 3]).
        batch_size: global batch size (training drops the remainder).
        loss, loss_kwargs: `models.losses.get_loss(loss, task, head, **loss_kwargs)`;
            None -> the head's default loss.
        class_weight: "balanced" (n / (K * count_k) from train class_counts) or None;
            single-label tasks only.
        pos_weight: pass `pos_weight` = negatives / positives per label (clamped at
            `pos_weight_clamp`) to the loss (weighted BCE for binary/multilabel).
        learning_rate, weight_decay, warmup_epochs, min_lr_ratio, clipnorm, use_ema:
            AdamW with linear warmup + cosine decay (training/optimizers.py).
        backbone_lr_factor, head_lr_factor: discriminative LRs (None: one group).
        freeze_backbone_epochs: N > 0 trains the head alone for N epochs, then all
            layers at `learning_rate * finetune_lr_factor` with a fresh optimizer.
        monitor, mode: metric for best checkpoint and early stopping ("val_qwk",
            "val_macro_f1", "val_auc", "val_loss", ...); None: the task's
            `models.metrics.default_monitor` (val_qwk, val_auc, val_macro_f1, val_map);
            a name `fit` will not log fails before the workdir is created.
            mode "auto": min for losses.
        early_stopping_patience: epochs without improvement before stopping (0: off;
            counted within the last stage).
        checkpoint_every_epochs: also keep `epoch_NNN.weights.h5` every N epochs (0: off).
        seed, deterministic: seed init/augmentation; deterministic adds TF op determinism.
        precision: float32 | mixed_float16 | mixed_bfloat16 | auto (by backend/device).
        jit_compile: XLA-compile the train step (TensorFlow: off under op determinism).
        steps_per_epoch: None -> one pass over the train split.
        bn_recalibration_batches: N > 0 re-estimates BatchNorm statistics on N fixed
            training batches before each validation ("precise BN", callbacks.py);
            worth it in short runs, where Keras' BN momentum 0.99 lags.
        tensorboard: write TensorBoard logs (scalars, input grid, confusion matrix).
        tune_thresholds_each_epoch, threshold_min_recall, threshold_max: multilabel
            only: after each epoch, tune per-label thresholds on the validation split
            (F1-optimal with recall >= min_recall, threshold <= max) and log the
            resulting macro-F1 as `val_tuned_macro_f1` (monitor it to select the
            checkpoint as the RFMiD system did).
        distribution: "auto" | "none" | "data_parallel" | "multi_worker": one device,
            all local devices, or several processes (training/distribution.py);
            `batch_size` is then the global batch, split evenly over the replicas, and
            only process 0 writes the workdir. Not part of the plan: a run may resume
            on another device count.
        lr_scaling: "none" (`learning_rate` as given) or "linear" (times the replica
            count: for a rate tuned on one device with batch_size / replicas).
        augment_on: "host" (tf.data), "device" (inside the compiled step, same random
            draws: training/augmenting.py) or "auto" (device when Keras sees an
            accelerator and the augmentation has no host-only op).
        device_prefetch: batches moved onto the accelerator ahead of the step by a
            thread of their own (JAX; training/prefetch.py); None: two executions'
            worth on one JAX accelerator without a distribution, 0 (off) otherwise.
            Not part of the plan: batches and order are the same.
        steps_per_execution: training steps per dispatch (>= 1). JAX: k steps in one
            compiled call, a scan of the step (training/multistep.py), the epoch's
            last call ending at its end; TensorFlow: Keras' own loop, so k must divide
            the steps per epoch. None: on one JAX accelerator the largest divisor of
            the steps per epoch up to 16, else 1. Callbacks see one batch per call
            (Throughput counts its k steps). Not part of the plan: the same steps,
            float noise only.
    """
    t_start = time.time()
    with _as_config_errors():  # first: multi_worker on JAX must start before any JAX op
        plan = distribution_lib.setup(distribution)
    info = load_dataset_info(data_dir)
    task = task or info["task"]
    with _as_config_errors():  # a wrong head or monitor fails before the workdir exists
        monitor = _resolve_monitor(monitor, task, info["num_classes"], head,
                                   tune_thresholds_each_epoch)
        mode = _resolve_mode(monitor, mode)
    if plan.is_chief:  # the others find the chief's files there
        _check_workdir(workdir, resume)
    changes = _check_resume_plan(workdir, data_dir, allow_changes) if resume else {}
    summary_path = os.path.join(workdir, "training_summary.json")
    if resume and os.path.exists(summary_path) and not os.path.isdir(_backup_root(workdir)):
        logging.info("%s already finished training; nothing to resume.", workdir)
        with open(summary_path) as f:
            return json.load(f)
    # Everything that can fail on a bad config or bad data runs before the workdir
    # exists, so that a failed start leaves nothing behind.
    shards = [os.path.join(data_dir, f"{s}-*.tfrecord") for s in ("train", "val")]
    fresh = not resume  # _check_workdir: the workdir is new or empty
    own = workdir  # where this process writes (process 0 only, in a multi-process run)
    existed = os.path.isdir(workdir)
    previous_policy = keras.mixed_precision.global_policy().name
    in_scope = contextlib.ExitStack()
    try:
        in_scope.enter_context(plan.scope())  # build, compile and fit on the replicas
        with integrity.naming_corrupt_shards(shards):
            with _as_config_errors():
                _check_bindings()
                jit_compile = _seed_everything(seed, deterministic, jit_compile)
                jit_compile = _jit_under(plan, jit_compile)
                _set_precision(precision)
                augment_config = augment.config_for_modality(modality_lib.modality_of(info))
                augment_on = augmenting.resolve(augment_on, augment_config)
                train_ds, val_ds, steps = _build_datasets(
                    data_dir, info, task, image_size, batch_size, seed, deterministic,
                    steps_per_epoch, plan, augment_on, augment_config)
                steps_per_execution = multistep.resolve(steps_per_execution, steps)
                learning_rate = distribution_lib.scaled_learning_rate(learning_rate,
                                                                      lr_scaling, plan)
                net = _build_model(model, task, info["num_classes"], image_size, weights,
                                   dropout, head)
                if augment_on == "device":  # fit trains the wrapper; `net` is what is saved
                    net = augmenting.AugmentingModel(net, augment_config)
                head = _head_of(task, head)
                loss_fn = _build_loss(loss, task, head, info, loss_kwargs, pos_weight,
                                      pos_weight_clamp)
                fit_kw = dict(steps_per_epoch=steps, verbose=verbose,
                              shuffle=False,  # tf.data shuffles
                              class_weight=_class_weights(class_weight, task, info))
                opt_kw = dict(learning_rate=learning_rate, weight_decay=weight_decay,
                              min_lr_ratio=min_lr_ratio, backbone_lr_factor=backbone_lr_factor,
                              head_lr_factor=head_lr_factor, use_ema=use_ema,
                              clipnorm=clipnorm, ema_overwrite_frequency=steps)
                stages = plan_stages(epochs, freeze_backbone_epochs, finetune_lr_factor)
                _compile_stage(net, stages[0], task, info, head, loss_fn, steps,
                               warmup_epochs, jit_compile, opt_kw,
                               weighted_metrics=plan.num_replicas > 1,
                               steps_per_execution=steps_per_execution)
            first = _first_batches(train_ds, max(1, bn_recalibration_batches))
            if plan.is_chief:
                resumed, keep_operative = _create_workdir(workdir, data_dir, resume, changes)
            else:  # writes go to a private folder; the backup is read from the chief's
                resumed, keep_operative = resume and os.path.isdir(_backup_root(workdir)), True
                own = _worker_dir(workdir, plan, resumed)
                tensorboard = False
            best = cb.BestCheckpoint(os.path.join(own, "checkpoints"), monitor, mode,
                                     checkpoint_every_epochs)
            throughput, nan_guard = cb.Throughput(batch_size), cb.TerminateOnNaN()
            run_cbs = [throughput, nan_guard]  # shared by all stages
            if tune_thresholds_each_epoch:  # before BestCheckpoint: it adds the monitored log
                run_cbs.append(cb.TunedMacroF1(val_ds, threshold_min_recall, threshold_max))
            if bn_recalibration_batches:
                run_cbs.append(cb.PreciseBatchNorm([images for images, _ in first]))
            if tensorboard:
                _log_input_grid(workdir, augmenting.augmented_images(first[0][0], augment_config),
                                first[0][1], info.get("class_names"))
            distribution_lib.synchronize_batchnorm(augmenting.network_of(net), plan)
            fit_data = dict(x=plan.distribute(train_ds),
                            validation_data=plan.distribute(_val_for_fit(
                                val_ds, plan, plan.per_process_batch(batch_size),
                                info["splits"]["val"]["num_examples"])))
            for stage in stages:
                if stage.index > 0:  # stage 0 was compiled above, before the workdir existed
                    _compile_stage(net, stage, task, info, head, loss_fn, steps, warmup_epochs,
                                   jit_compile, opt_kw, weighted_metrics=plan.num_replicas > 1,
                                   steps_per_execution=steps_per_execution)
                    # Each fit starts its training stream anew: a stream of its own.
                    fit_data["x"] = plan.distribute(_build_datasets(
                        data_dir, info, task, image_size, batch_size, seed + stage.index,
                        deterministic, steps_per_epoch, plan, augment_on, augment_config)[0])
                stage_cbs = run_cbs + _stage_callbacks(
                    own, stage, best,
                    early_stopping_patience if stage.end == epochs else 0,
                    info if tensorboard else None,
                    # its confusion-matrix image reads a metric's global array, which
                    # one process of several cannot
                    head if plan.num_processes == 1 else None, resumed or stage.index > 0,
                    backbone_lr_factor, not keep_operative,
                    backup_from=None if plan.is_chief else workdir)
                net._initial_epoch = None  # else a previous stage's BackupAndRestore epoch wins
                # multistep first: prefetch's thread then feeds its k-step calls
                with multistep.steps_per_execution(net, steps), \
                        prefetch.device_prefetch(
                            net, prefetch.resolve(device_prefetch, steps_per_execution)):
                    net.fit(**fit_data, epochs=stage.end, initial_epoch=stage.start,
                            callbacks=stage_cbs, **fit_kw)
                if nan_guard.triggered:
                    break
            # model.keras loads anywhere
            distribution_lib.synchronize_batchnorm(augmenting.network_of(net), None)
        summary = _write_artifacts(own, net, best, throughput, t_start, resumed,
                                   nan_guard.triggered,
                                   dict(task=task, head=head, precision=precision,
                                        jit_compile=bool(net.jit_compile),
                                        distribution=plan.kind, replicas=plan.num_replicas,
                                        processes=plan.num_processes, augment_on=augment_on))
    except Exception:
        if fresh and plan.is_chief:
            _remove_unstarted(workdir, existed)
        raise
    finally:
        in_scope.close()
        keras.mixed_precision.set_global_policy(previous_policy)
        if own != workdir:
            shutil.rmtree(own, ignore_errors=True)
    return summary


# ----------------------------------------------------------------------------- inputs


def load_dataset_info(data_dir: str) -> dict:
    """dataset.json of a prepared data dir (schema in docs/ARCHITECTURE.md)."""
    path = os.path.join(data_dir, "dataset.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found. Prepare data first, e.g. `make demo`, or:\n"
            "  python -m input_pipeline.synthetic --out_dir=demo_data/raw --num_images=800 "
            "--image_size=256 --seed=0\n"
            "  python -m input_pipeline.prepare --labels_csv=demo_data/raw/labels.csv "
            "--images_dir=demo_data/raw --out_dir=demo_data/prepared --task=dr_grade "
            "--label_column=dr_grade --image_size=128 --num_shards=4 --workers=2")
    with open(path) as f:
        info = json.load(f)
    if not info["splits"].get("train", {}).get("num_examples"):
        raise ValueError(f"{data_dir} has no training examples (dataset.json): prepare "
                         "wrote none; its rejected.csv says why for every row")
    return info


def _build_datasets(data_dir, info, task, image_size, batch_size, seed, deterministic,
                    steps_per_epoch, plan=None, augment_on: str = "host",
                    augment_config: augment.AugmentConfig | None = None):
    """(train tf.data (repeats), val tf.data (one pass), train steps per epoch).

    This process's share under `plan` (distribution.Plan): training reads its subset of
    the shard files at `batch_size / processes` per step; validation reads all of it
    (every process: each example counted once per process, which leaves every metric
    unchanged). `batch_size` is the global batch, steps count global batches.

    Augmentation is `AugmentConfig` with the defaults of dataset.json's modality
    (`augment.config_for_modality`) unless `augment_config` is given (train passes the
    one it resolved `augment_on` with); caching/sampling are `make_dataset` arguments:
    bind them in gin (`AugmentConfig.hue = 0.0`, `make_dataset.cache = "auto"`).
    """
    plan = plan or distribution_lib.Plan("none")
    global_batch, batch_size = batch_size, plan.per_process_batch(batch_size)
    common = dict(batch_size=batch_size, image_size=image_size, task=task,
                  num_classes=info["num_classes"], seed=seed, deterministic=deterministic)
    if augment_config is None:
        augment_config = augment.config_for_modality(modality_lib.modality_of(info))
    # uint8 training batches: a quarter of the host->device copy (the model casts them
    # back to float32 on the device; rounding after augmentation moves < 0.5 levels).
    # Rebuilt on each opening: Keras' TF fit opens it once more under a strategy.
    train_ds = distribution_lib.each_opening_alike(functools.partial(
        pipeline.make_dataset, os.path.join(data_dir, "train-*.tfrecord"), training=True,
        augment_config=augment_config, pixel_dtype="uint8", shard=plan.shard(),
        augment_on=augment_on, **common))
    val_ds = pipeline.make_dataset(os.path.join(data_dir, "val-*.tfrecord"), training=False,
                                   pixel_dtype="float32", **common)
    # A known length spares Keras the "input ran out of data" warning after each validation.
    val_batches = math.ceil(info["splits"]["val"]["num_examples"] / batch_size)
    val_ds = val_ds.apply(tf.data.experimental.assert_cardinality(val_batches))
    if steps_per_epoch is None:
        n = int(train_ds.cardinality())
        steps_per_epoch = n if n > 0 else max(1, info["splits"]["train"]["num_examples"]
                                              // global_batch)
    return train_ds, val_ds, int(steps_per_epoch)


def _val_for_fit(val_ds, plan, batch: int, num_examples: int):
    """Validation as `fit` gets it: with several replicas, the last batch padded to a
    multiple of the replica count (a JAX batch must split evenly over the devices)
    with weight-0 copies of the first example, which no metric counts; val_loss counts
    them (Keras' loss mean divides by the batch size): at most replicas - 1 of them.
    (images, labels, weights float32 [B]); `val_ds` unchanged with one replica."""
    pad = -num_examples % plan.num_replicas
    if plan.num_replicas == 1 or not pad:
        return val_ds
    batches = int(val_ds.cardinality())
    examples = val_ds.unbatch().map(lambda x, y: (x, y, tf.constant(1.0)))
    padding = examples.take(1).map(lambda x, y, w: (x, y, 0.0 * w)).repeat(pad)
    padded = examples.concatenate(padding).batch(batch)
    return padded.apply(tf.data.experimental.assert_cardinality(batches))


def _class_weights(class_weight, task, info) -> dict | None:
    """{class: n / (K * count)} from train class_counts ("balanced"), or None."""
    if class_weight is None:
        return None
    if class_weight != "balanced":
        raise ValueError(f"class_weight must be 'balanced' or None, got {class_weight!r}")
    if task == "multilabel":
        raise ValueError("class_weight does not apply to multilabel; use pos_weight=True")
    counts = np.asarray(info["splits"]["train"]["class_counts"], float)
    weights = counts.sum() / (len(counts) * np.maximum(counts, 1.0))
    return {i: float(w) for i, w in enumerate(weights)}


# ----------------------------------------------------------------------------- model


def _head_of(task: str, head: str | None) -> str:
    return heads.check_head(task, head)


def _check_shadowed_bindings(fn, explicit) -> None:
    """Raises if gin binds an argument of `fn` that the code passes explicitly (ignored)."""
    shadowed = sorted(set(gin.get_bindings(fn)) & set(explicit))
    if shadowed:
        name = fn.__name__
        raise ValueError(f"gin binds {name}.{shadowed}, which train() passes explicitly and "
                         f"would silently ignore; bind train.<arg> instead.")


def _check_bindings() -> None:
    _check_shadowed_bindings(models.build_model, _MODEL_ARGS)
    _check_shadowed_bindings(pipeline.make_dataset, _DATASET_ARGS)


def _build_model(name, task, num_classes, image_size, weights, dropout, head) -> keras.Model:
    with initialization.initialized_together():  # on JAX one program, not hundreds
        net = models.build_model(name, task, num_classes, image_size, weights=weights,
                                 dropout=dropout, head=head)
        net.build((None, image_size, image_size, 3))  # BackupAndRestore needs a built model
    return net


def _build_loss(loss, task, head, info, loss_kwargs, pos_weight, clamp):
    kwargs = dict(loss_kwargs or {})
    if pos_weight:
        split = info["splits"]["train"]
        counts = split["class_counts"]
        positives = counts[1:2] if task == "binary" else counts
        kwargs["pos_weight"] = [float(w) for w in np.ravel(losses.pos_weight_from_counts(
            split["num_examples"], np.asarray(positives, float), clamp))]
    return losses.get_loss(loss, task, head, **kwargs)


def plan_stages(epochs: int, freeze_backbone_epochs: int, finetune_lr_factor: float) -> list:
    """[Stage]: one stage, or frozen-backbone epochs then the rest at a lower LR."""
    n = min(max(0, freeze_backbone_epochs), epochs)
    if n == 0:
        return [Stage(0, 0, epochs, True, 1.0)]
    stages = [Stage(0, 0, n, False, 1.0)]
    if epochs > n:
        stages.append(Stage(1, n, epochs, True, finetune_lr_factor))
    return stages


def _compile_stage(net, stage, task, info, head, loss_fn, steps, warmup_epochs, jit_compile,
                   opt_kw, weighted_metrics: bool = False, steps_per_execution: int = 1) -> None:
    """Sets the backbone's trainable flag and compiles with a fresh optimizer.

    weighted_metrics: metrics count sample weights (the weight-0 padding of validation
    under several replicas, `_val_for_fit`); with `class_weight`, the training metrics
    are then class-weighted too.
    """
    network = augmenting.network_of(net)
    try:
        network.get_layer("backbone").trainable = stage.train_backbone
    except ValueError:
        if not stage.train_backbone:
            raise
    opt = optimizers.build_optimizer(
        network, total_steps=steps * (stage.end - stage.start),
        warmup_steps=int(round(warmup_epochs * steps)),
        **{**opt_kw, "learning_rate": opt_kw["learning_rate"] * stage.lr_factor})
    run_metrics = metrics.get_metrics(task, info["num_classes"], head)
    net.compile(optimizer=opt, loss=loss_fn, jit_compile=jit_compile,
                metrics=None if weighted_metrics else run_metrics,
                weighted_metrics=run_metrics if weighted_metrics else None,
                steps_per_execution=steps_per_execution)
    with initialization.initialized_together():  # its zeros too (else fit builds it)
        opt.build(net.trainable_variables)
    logging.info("Stage %d: epochs %d-%d, backbone %s, %d trainable tensors, groups %s",
                 stage.index, stage.start + 1, stage.end,
                 "trained" if stage.train_backbone else "frozen",
                 len(net.trainable_variables), list(optimizers.sub_optimizers(opt)))


# ----------------------------------------------------------------------------- run setup


def _resolve_monitor(monitor: str | None, task: str, num_classes: int, head: str | None,
                     tuned_f1: bool) -> str:
    """The monitored log name (task default when None); raises ValueError naming the
    available ones when `fit` would never log it (which used to fail after epoch 1)."""
    if tuned_f1 and task != "multilabel":
        raise ValueError(f"train.tune_thresholds_each_epoch is for multilabel, not {task!r}")
    available = metrics.logged_names(task, num_classes, head)
    if tuned_f1:
        available.append(cb.TunedMacroF1.NAME)
    monitor = monitor or metrics.default_monitor(task)
    if monitor not in available:
        raise ValueError(f"train.monitor={monitor!r} is not logged for task {task!r}; "
                         f"available: {', '.join(available)}")
    return monitor


def _resolve_mode(monitor: str, mode: str) -> str:
    if mode == "auto":
        return "min" if monitor.endswith("loss") else "max"
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min', 'max' or 'auto', got {mode!r}")
    return mode


def _backup_root(workdir: str) -> str:
    return os.path.join(workdir, "backup")


def _check_workdir(workdir: str, resume: bool) -> None:
    """Refuses a non-empty workdir without resume (nothing is created here)."""
    if os.path.isdir(workdir) and os.listdir(workdir) and not resume:
        raise FileExistsError(
            f"workdir {workdir} is not empty: pass --resume to continue that run, "
            "or choose another --workdir.")


class ConfigError(ValueError):
    """A config that cannot train (unknown model, bad binding, ...), found before the
    workdir was created."""


@contextlib.contextmanager
def _as_config_errors():
    """ValueError/TypeError/KeyError in the block -> ConfigError with the same message."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(str(e)) from e


class PlanChangedError(ValueError):
    """--resume with a config that differs from the one the workdir was trained with."""


# Bindings that change nothing trained (logging only).
_NOT_PLAN = ("train.verbose", "train.tensorboard", "train.distribution",
             "train.device_prefetch", "train.steps_per_execution")


def _check_resume_plan(workdir: str, data_dir: str, allow_changes: bool) -> dict:
    """{binding: (old, new)} between the workdir's config.gin and the current gin config.

    Raises PlanChangedError when there is a change (or the data dir's dataset.json
    differs from the workdir's copy) and `allow_changes` is False.
    """
    recorded = os.path.join(workdir, "config.gin")
    if not os.path.exists(recorded):
        return {}  # nothing trained yet (train.py writes config.gin first)
    with open(recorded) as f:
        changes = config_lib.plan_changes(f.read(), gin.config_str(), ignore=_NOT_PLAN)
    old_info = os.path.join(workdir, "dataset.json")
    if os.path.exists(old_info) and _dataset_fingerprint(old_info) != _dataset_fingerprint(
            os.path.join(data_dir, "dataset.json")):
        changes["dataset.json"] = (f"{old_info} (trained on)",
                                   f"{os.path.join(data_dir, 'dataset.json')} (differs)")
    if changes and not allow_changes:
        raise PlanChangedError(
            f"--resume refused: the config differs from {recorded}: "
            f"{config_lib.describe_changes(changes)}. Resume with the same --gin_file/"
            "--gin_bindings, or pass --resume_with_changes to continue with these changes "
            "(recorded in the workdir).")
    return changes


def _dataset_fingerprint(path: str) -> dict:
    """dataset.json without its timing: what identifies the prepared data."""
    with open(path) as f:
        info = json.load(f)
    info.pop("timing", None)
    return info


def _create_workdir(workdir: str, data_dir: str, resume: bool, changes: dict):
    """Creates (or, resuming, updates) the workdir. Returns (resumed, keep_operative).

    A resumed run never rewrites config.gin / operative_config.gin: they describe
    what was trained. Changes allowed by --resume_with_changes are appended to both
    (later bindings win when gin parses them) and every resume to resume_log.json.
    keep_operative: operative_config.gin exists and must not be rewritten.
    """
    resumed = resume and os.path.isdir(_backup_root(workdir))
    if resume and not resumed:
        logging.warning("--resume: no backup in %s, starting from scratch.", workdir)
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
    config_path = os.path.join(workdir, "config.gin")
    operative = os.path.join(workdir, "operative_config.gin")
    if not os.path.exists(config_path):
        shutil.copyfile(os.path.join(data_dir, "dataset.json"),
                        os.path.join(workdir, "dataset.json"))
        cb.write_text_atomic(config_path, gin.config_str())
        return resumed, False
    epoch = _trim_history(workdir) if resumed else 0
    if changes:
        block = (f"\n# --resume_with_changes at {_now()}, from the backup after epoch {epoch}:\n"
                 + config_lib.changes_as_gin(changes))
        for path in (config_path, operative):
            if os.path.exists(path):
                with open(path) as f:
                    cb.write_text_atomic(path, f.read() + block)
        logging.warning("Resuming with changes: %s", config_lib.describe_changes(changes))
    _append_resume_log(workdir, epoch, changes)
    return resumed, os.path.exists(operative)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _append_resume_log(workdir: str, epoch: int, changes: dict) -> None:
    """resume_log.json: one entry per resume (time, epoch, changes, the full new config)."""
    path = os.path.join(workdir, "resume_log.json")
    log = []
    if os.path.exists(path):
        with open(path) as f:
            log = json.load(f)
    log.append({"time": _now(), "after_epoch": epoch,
                "changes": {k: {"old": config_lib.UNSET if a is config_lib.UNSET else repr(a),
                                "new": config_lib.UNSET if b is config_lib.UNSET else repr(b)}
                            for k, (a, b) in changes.items()},
                "config": gin.config_str()})
    cb.write_json_atomic(path, log)


def _remove_unstarted(workdir: str, existed: bool) -> None:
    """After a failed fresh start: removes what this run wrote, unless an epoch finished.

    existed: the (then empty) workdir was there before; it is kept, empty.
    """
    if not os.path.isdir(workdir) or os.path.isdir(_backup_root(workdir)):
        return
    logging.info("Start failed before the first epoch ended: removing what it wrote in %s",
                 workdir)
    if not existed:
        shutil.rmtree(workdir)
        return
    for name in os.listdir(workdir):
        path = os.path.join(workdir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _backup_epoch(workdir: str) -> int:
    """Epochs done according to the newest stage backup (0 when none)."""
    done = 0
    root = _backup_root(workdir)
    for stage_dir in os.listdir(root) if os.path.isdir(root) else []:
        meta = os.path.join(root, stage_dir, "training_metadata.json")
        if os.path.exists(meta):
            with open(meta) as f:
                done = max(done, int(json.load(f)["epoch"]))
    return done


def _trim_history(workdir: str) -> int:
    """Drops history.csv rows of epochs the backup doesn't hold (they will be re-run).

    A row cut short by a kill (no newline) is dropped too. Returns the epochs done.
    """
    done = _backup_epoch(workdir)
    path = os.path.join(workdir, "history.csv")
    if os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
        keep = lines[:1] + [ln for ln in lines[1:]
                            if ln.endswith("\n") and int(ln.split(",", 1)[0]) < done]
        if len(keep) < len(lines):
            logging.info("Resuming after epoch %d: dropping %d history rows.", done,
                         len(lines) - len(keep))
            cb.write_text_atomic(path, "".join(keep))
    logging.info("Resuming from the backup of epoch %d.", done)
    return done


def _jit_under(plan, jit_compile: bool) -> bool:
    """jit_compile, off under a TF strategy over CPUs (XLA cross-device error there,
    PITFALLS section 9)."""
    if jit_compile and distribution_lib.uses_cpu_strategy(plan):
        logging.warning("jit_compile=False: XLA fails under a TF strategy over CPU devices.")
        return False
    return jit_compile


def _worker_dir(workdir: str, plan, resumed: bool = False) -> str:
    """A private folder for the files a non-chief process writes (removed after; named
    after the workdir, so that a restart after a kill replaces what the killed one left).
    Resumed: it starts from the chief's best checkpoint and its state, so that every
    process ends on the same best weights (JAX refuses to load differing ones)."""
    import hashlib
    import tempfile

    key = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:12]
    own = os.path.join(tempfile.gettempdir(), f"fundusflow_process{plan.process_id}_{key}")
    shutil.rmtree(own, ignore_errors=True)
    os.makedirs(os.path.join(own, "checkpoints"))
    for name in ("best.json", "best.weights.h5") if resumed else ():
        chief = os.path.join(workdir, "checkpoints", name)
        if os.path.exists(chief):
            shutil.copy2(chief, os.path.join(own, "checkpoints", name))
    logging.info("process %d: the chief writes %s; this one's files go to %s",
                 plan.process_id, workdir, own)
    return own


def _seed_everything(seed: int, deterministic: bool, jit_compile: bool) -> bool:
    """Seeds Python/NumPy/backend RNGs; returns the jit_compile to use.

    TF op determinism covers TF ops: the tf.data pipeline, and on TensorFlow the step,
    where it rules out XLA. A JAX step is no TF op: uncompiled it would run op by op
    through the same XLA kernels (each op compiled on first use, then dispatched one at
    a time), slower and no more deterministic, so it stays compiled.
    """
    keras.utils.set_random_seed(seed)
    if not deterministic:
        return jit_compile
    tf.config.experimental.enable_op_determinism()
    if keras.backend.backend() != "tensorflow":
        return jit_compile
    if jit_compile:
        # Keras would override jit_compile=True anyway, with a misleading warning.
        logging.warning("deterministic=True: TF op determinism disables XLA "
                        "(jit_compile=False).")
    return False


def _set_precision(precision: str) -> str:
    """Sets the global dtype policy BEFORE any model is built; returns the previous one."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    previous = keras.mixed_precision.global_policy().name
    if precision == "auto":
        precision = _auto_precision()
    keras.mixed_precision.set_global_policy(precision)
    logging.info("dtype policy: %s", precision)
    return previous


def _auto_precision() -> str:
    """mixed_float16 for TF on GPU; mixed_bfloat16 for JAX on GPU/TPU; float32 on CPU."""
    backend = keras.backend.backend()
    if backend == "tensorflow" and tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    if backend == "jax":
        import jax

        if jax.default_backend() in ("gpu", "tpu"):
            return "mixed_bfloat16"
    return "float32"


def _stage_callbacks(workdir, stage, best, patience, tb_info, head, append,
                     backbone_lr_factor, write_operative=True, backup_from=None) -> list:
    """Callbacks of one stage; order matters: state is persisted before the backup.

    backup_from: another process's workdir whose backup this one restores from
    (non-chief processes; they write theirs in their own `workdir`); None: `workdir`'s.
    """
    tb_dir = os.path.join(workdir, "tensorboard")
    out = [cb.LearningRateLogger(optimizers.group_names(backbone_lr_factor)), best]
    if patience:
        out.append(cb.ResumableEarlyStopping(best, stage.start, patience=int(patience)))
    # history.csv before the backup: a crash in between leaves a row that
    # `_trim_history` drops on resume, rather than a missing row.
    out.append(keras.callbacks.CSVLogger(os.path.join(workdir, "history.csv"), append=append))
    stage_dir = f"stage_{stage.index}"
    out.append(cb.SafeBackupAndRestore(
        os.path.join(_backup_root(workdir), stage_dir), delete_checkpoint=False,
        restore_from=backup_from and os.path.join(_backup_root(backup_from), stage_dir)))
    if write_operative:  # a resumed run keeps the record of what was trained
        out.append(cb.OperativeConfigWriter(os.path.join(workdir, "operative_config.gin")))
    if tb_info:
        out.append(cb.EpochTensorBoard(tb_dir, write_graph=False, profile_batch=0))
        if tb_info["task"] != "multilabel" and head is not None:
            # macro_f1: the confusion-matrix metric every single-label task compiles
            out.append(cb.ConfusionMatrixImage("macro_f1", tb_info["class_names"], tb_dir))
    return out


def _first_batches(train_ds, n: int) -> list:
    """The first n training batches as numpy (inputs, labels) pairs: inputs are the
    augmented images, or with augmentation on the device {image, augment} dicts."""
    return [tf.nest.map_structure(lambda t: t.numpy(), batch) for batch in train_ds.take(n)]


def _log_input_grid(workdir: str, images, labels, class_names) -> None:
    """A grid of augmented training inputs -> TensorBoard (images: train/augmented_inputs)."""
    grid = inspect_lib.make_grid(images, labels, class_names)
    cb.log_image(os.path.join(workdir, "tensorboard"), "train/augmented_inputs", grid)


# ----------------------------------------------------------------------------- artefacts


def _read_history(workdir: str) -> list[dict]:
    import csv

    path = os.path.join(workdir, "history.csv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _write_artifacts(workdir, net, best, throughput, t_start, resumed, nan, extra) -> dict:
    """Best weights -> model.keras; training_summary.json; removes the backup."""
    iterations = optimizers.group_iterations(net.optimizer)  # before best.weights.h5 resets them
    net = augmenting.network_of(net)
    if os.path.exists(best.best_path):
        cb.load_weights_model_only(net, best.best_path)
    tmp = os.path.join(workdir, "model.tmp.keras")
    net.save(tmp)
    os.replace(tmp, os.path.join(workdir, "model.keras"))
    rows = _read_history(workdir)
    summary = {
        "monitor": best.monitor, "mode": best.mode,
        "best_epoch": best.state["best_epoch"], "best_metric": best.state["best"],
        "final_metrics": {k: float(v) for k, v in (rows[-1] if rows else {}).items()
                          if k not in ("epoch", None)},
        "epochs_run": len(rows), "resumed": bool(resumed), "terminated_on_nan": bool(nan),
        "wall_time_s": round(time.time() - t_start, 2),
        "images_per_s": round(throughput.images_per_second, 2),  # compilation included
        "images_per_s_steady": (None if throughput.steady_images_per_second is None
                                else round(throughput.steady_images_per_second, 2)),
        "optimizer_iterations": iterations,
        **extra,
    }
    cb.write_json_atomic(os.path.join(workdir, "training_summary.json"), summary)
    if not nan:  # a NaN run keeps its backup: the last good epoch can still be resumed
        shutil.rmtree(_backup_root(workdir), ignore_errors=True)
    return summary


# ----------------------------------------------------------------------------- rebuild


def resolved_train_config() -> dict:
    """train()'s arguments as currently bound in gin, defaults filled in."""
    params = inspect.signature(train).parameters
    config = {k: p.default for k, p in params.items()
              if p.default is not inspect.Parameter.empty and k != "resume"}
    config.update(gin.get_bindings(train))
    return config


def resolve_data_dir(workdir: str, data_dir: str) -> str:
    """The training data dir as seen from here; the config stores it as train was given it.

    A relative path was relative to the directory train ran from, usually an ancestor of
    the workdir (`make demo`: demo_run/data beside demo_run/w). Tries, in order: the path
    itself (absolute, or relative to the current directory), then the path under each
    ancestor of the workdir; the first holding a dataset.json wins. Returns `data_dir`
    unchanged when none does (the caller then names the missing files).
    """
    if os.path.isabs(data_dir) or os.path.isfile(os.path.join(data_dir, "dataset.json")):
        return data_dir
    for parent in pathlib.Path(os.path.abspath(workdir)).parents:
        if (parent / data_dir / "dataset.json").is_file():
            return str(parent / data_dir)
    return data_dir


def check_trained_workdir(workdir: str, need_weights: bool = True) -> None:
    """Raises FileNotFoundError (one line: the missing file, what to do) unless `workdir`
    holds what `build_from_config` reads."""
    def path(*parts):
        return os.path.join(workdir, *parts)

    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} not found: pass the --workdir train.py "
                                "wrote.")
    resume = (f"resume the run (python train.py --workdir={workdir} --resume with its "
              "--gin_file/--gin_bindings)")
    if not os.path.exists(path("operative_config.gin")):
        started = os.path.exists(path("config.gin"))
        raise FileNotFoundError(
            f"{path('operative_config.gin')} not found: "
            + (f"the run stopped before its first training step; {resume}." if started else
               f"{workdir} is not a training workdir (train.py writes config.gin and "
               "operative_config.gin there)."))
    if not os.path.exists(path("dataset.json")):
        raise FileNotFoundError(
            f"{path('dataset.json')} not found: copy the dataset.json of the data dir it was "
            "trained on there (train.py copies it when it starts).")
    best = path("checkpoints", "best.weights.h5")
    if need_weights and not os.path.exists(best):
        why = ("model.keras is there, but evaluate/export/predict load the best checkpoint; "
               if os.path.exists(path("model.keras")) else "")
        raise FileNotFoundError(
            f"{best} not found: {why}restore the run's checkpoints/ folder, or, if training "
            f"stopped before its first epoch ended, {resume}.")


def build_from_config(workdir: str, load_weights: bool = True):
    """Rebuilds the trained model from `workdir` (float32) and loads best weights.

    Parses `workdir/operative_config.gin` (this replaces the current gin config),
    so `models.build_model` bindings apply exactly as in training. A missing file
    raises FileNotFoundError naming it (`check_trained_workdir`); a config binding
    anything but fundusflow's configurables raises `config.UnsafeConfigError`.

    Returns:
        (keras.Model with best weights, dataset_info dict from workdir/dataset.json,
         config dict: train()'s resolved arguments with "task", "head", "num_classes").
    """
    check_trained_workdir(workdir, load_weights)
    with gin.unlock_config():
        gin.clear_config()
        config_lib.parse([os.path.join(workdir, "operative_config.gin")], [],
                         skip_unknown=True, finalize=False)
    config = resolved_train_config()
    with open(os.path.join(workdir, "dataset.json")) as f:
        info = json.load(f)
    config["task"] = config["task"] or info["task"]
    config["head"] = _head_of(config["task"], config["head"])
    config["num_classes"] = info["num_classes"]
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")  # export/eval: float32 (PITFALLS 8)
    try:
        net = _build_model(config["model"], config["task"], info["num_classes"],
                           config["image_size"], None, config["dropout"], config["head"])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if load_weights:
        net.load_weights(os.path.join(workdir, "checkpoints", "best.weights.h5"))
    return net, info, config
