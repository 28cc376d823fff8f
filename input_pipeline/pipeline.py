"""tf.data input pipeline: prepared TFRecords -> batches for `keras.Model.fit`.

Stages are pure functions on a dict of tensors; `make_dataset` only wires them:

    parse (features.parse_example) -> decode -> preprocess -> augment (training only)

Training order (each choice made for memory or speed, see the comments in
`make_dataset`):

    list_files(shuffled) -> interleave(TFRecordDataset) -> parse
      -> [cache: decode + preprocess -> cache]
      -> shuffle -> repeat -> [sampling] -> enumerate
      -> decode + preprocess + augment (one fused map) -> batch -> prefetch

Pixels: the pipeline hands out float32 in [0, 255] (or, with `pixel_dtype="uint8"`,
the same rounded to uint8: a quarter of the bytes to batch and to copy to an
accelerator, where the model casts back); normalisation is the model's.
Per-example augmentation seeds are `fold_in(seed, element index)`, so with
`deterministic=True` two iterations of two datasets built alike are identical.
"""

import fnmatch
import functools
import glob
import json
import os

import gin
import numpy as np
import tensorflow as tf
from absl import logging

from input_pipeline import augment as augment_lib
from input_pipeline import features as features_lib
from input_pipeline import sampling as sampling_lib

AUTOTUNE = tf.data.AUTOTUNE
INFO_KEYS = ("image", "label", "patient_id", "source")
_GB = 1024**3


# ------------------------------------------------------------------------------ stages


def decode(features: dict) -> dict:
    """Decodes "image_bytes" (JPEG or PNG) to "image" uint8 [H, W, 3]; drops the bytes.

    JPEGs use the accurate integer IDCT: TF's default is INTEGER_FAST, which is up
    to ~10 levels off what OpenCV / PIL (and so prepare, predict) decode; accurate
    is bit-identical to OpenCV and costs no measurable time at 512 px.
    """
    out = dict(features)
    data = out.pop("image_bytes")
    image = tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
            lambda: tf.io.decode_image(data, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    out["image"] = image
    return out


def preprocess_image(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 (or float) [H, W, 3] -> float32 [S, S, 3] in [0, 255], S = image_size.

    Shrinking (the usual case: prepared 512 px -> model size) uses area averaging:
    exact box-filter antialiasing, so thin vessels do not alias, at a third of the
    cost of antialiased bilinear on CPU. Enlarging (either side smaller than S)
    uses bilinear, where area would degenerate to blocky nearest-neighbour. Both
    are convex combinations, so values stay in [0, 255]. Shared by training,
    evaluation and the export signature.
    """
    size = (image_size, image_size)
    shape = tf.shape(image)
    shrink = tf.logical_and(shape[0] >= image_size, shape[1] >= image_size)
    resized = tf.cond(shrink,
                      lambda: tf.image.resize(image, size, method="area"),
                      lambda: tf.image.resize(image, size, method="bilinear"))
    return tf.ensure_shape(tf.cast(resized, tf.float32), [image_size, image_size, 3])


def preprocess(features: dict, image_size: int) -> dict:
    """Replaces "image" with `preprocess_image(image, image_size)`."""
    return {**features, "image": preprocess_image(features["image"], image_size)}


def augment(features: dict, config: augment_lib.AugmentConfig, seed) -> dict:
    """Replaces "image" with its augmented version (`augment.augment`)."""
    return {**features, "image": augment_lib.augment(features["image"], config, seed)}


# ---------------------------------------------------------------------------- helpers


def shard_files(file_pattern: str) -> list[str]:
    """The shard files `file_pattern` names, e.g. "data/train-*.tfrecord" (sorted).

    With a dataset.json in the pattern's folder, exactly the files it lists whose
    names match the pattern: prepare records each split's shards there, and
    shards of an earlier plan left in the folder must never be read (the glob
    would mix them in). Without one (shards from elsewhere), the glob.
    Raises FileNotFoundError when nothing matches or a listed shard is missing.
    """
    folder, pattern = os.path.split(file_pattern)
    info_path = os.path.join(folder, "dataset.json")
    if not os.path.exists(info_path):
        files = sorted(glob.glob(file_pattern))
    else:
        with open(info_path) as f:
            info = json.load(f)
        files = sorted(os.path.join(folder, name)
                       for split in info.get("splits", {}).values()
                       for name in split.get("files", []) if fnmatch.fnmatch(name, pattern))
        for path in files:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: listed in {info_path} but missing; "
                                        "re-run prepare")
        unlisted = sorted(set(glob.glob(file_pattern)) - set(files))
        if unlisted:
            logging.warning("%d shard files match %s but are not listed in %s (e.g. %s): "
                            "left from an earlier prepare, not read", len(unlisted),
                            file_pattern, info_path, unlisted[0])
    if not files:
        raise FileNotFoundError(f"No files match {file_pattern!r}")
    return files


def _files_or_none(file_pattern: str) -> list[str]:
    try:
        return shard_files(file_pattern)
    except FileNotFoundError:
        return []


def read_dataset_info(files: list[str]) -> dict | None:
    """dataset.json beside the shards, or None when there is none."""
    if not files:
        return None
    path = os.path.join(os.path.dirname(files[0]), "dataset.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _split_info(info: dict | None, files: list[str]) -> dict | None:
    """The dataset.json split whose shard files are exactly `files`, if any."""
    names = sorted(os.path.basename(f) for f in files)
    for split in (info or {}).get("splits", {}).values():
        if sorted(split.get("files", [])) == names:
            return split
    return None


def _should_cache(cache, split: dict | None, image_size: int, limit_gb: float) -> bool:
    """cache=True/False as given; "auto": cache when the preprocessed images fit in
    `limit_gb` (estimated from dataset.json; without it, stream)."""
    if cache != "auto":
        return bool(cache)
    if not split:
        return False
    estimate = split["num_examples"] * image_size * image_size * 3 * 4
    logging.info("cache=auto: %.2f GB of preprocessed images (limit %.1f GB)",
                 estimate / _GB, limit_gb)
    return estimate < limit_gb * _GB


def _check_sampling(sampling: str | None, task: str) -> None:
    """class_balanced is for single-label tasks, rarest_label for multilabel."""
    multilabel = features_lib.is_multilabel(task)  # also validates `task`
    if sampling is None:
        return
    if sampling not in sampling_lib.SAMPLERS:
        raise ValueError(f"Unknown sampling {sampling!r}; known: {sampling_lib.SAMPLERS}")
    if multilabel != (sampling == "rarest_label"):
        want = "rarest_label" if multilabel else "class_balanced"
        raise ValueError(f"sampling={sampling!r} does not fit task {task!r}; use {want!r}")


def _options(deterministic: bool, threadpool_size: int | None) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = True
    # One thread per element op, parallel across elements: no oversubscription on
    # small machines, and per-op thread pools are wasted on 224-px images.
    options.threading.max_intra_op_parallelism = 1
    if threadpool_size:
        options.threading.private_threadpool_size = threadpool_size
    options.experimental_optimization.map_parallelization = True
    options.experimental_optimization.parallel_batch = True
    return options


def _example_seeds(seed: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Two independent base seeds (sampling, augmentation) from the global seed."""
    split = tf.random.experimental.stateless_split(tf.constant([seed, 0], tf.int64), 2)
    return split[0], split[1]


def _to_output(features: dict, keep_keys: tuple[str, ...] | None):
    """(image, label) for fit, or a dict of `keep_keys` for evaluation."""
    if keep_keys is None:
        return features["image"], features["label"]
    return {k: features[k] for k in keep_keys}


# ------------------------------------------------------------------------ make_dataset


def _shard_subset(files: list[str], num_shards: int, index: int) -> list[str]:
    """Files index, index + num_shards, ... of `files` (one reader of several)."""
    if len(files) < num_shards:
        raise ValueError(f"{len(files)} shard files ({files[0]}, ...) for {num_shards} "
                         "readers: prepare the data with --num_shards >= the process count")
    return files[index::num_shards]


@gin.configurable
def make_dataset(file_pattern: str, batch_size: int, training: bool, image_size: int,
                 task: str, num_classes: int | None = None,
                 augment_config: augment_lib.AugmentConfig | None = None, seed: int = 0,
                 deterministic: bool = False, cache: bool | str = False,
                 cache_limit_gb: float = 4.0, shuffle_buffer: int = 1024,
                 sampling: str | None = None, class_counts=None, normal_count=None,
                 with_info: bool = False, keep_keys: tuple[str, ...] | None = None,
                 repeat: bool | None = None, cycle_length: int = 8,
                 threadpool_size: int | None = None,
                 pixel_dtype: str = "float32",
                 shard: tuple[int, int] | None = None,
                 augment_on: str = "host") -> tf.data.Dataset:
    """Batches of prepared TFRecords for `fit` / `evaluate` / `predict`.

    Args:
        file_pattern: shard files, e.g. "data/train-*.tfrecord": the ones dataset.json
            lists when it is there (`shard_files`), else the glob.
        batch_size: examples per batch; training drops the remainder (static batch dim).
        training: shuffle, repeat, sample, augment; otherwise files in order, once.
        image_size: model input size S.
        task, num_classes: as in `features.parse_example`.
        augment_config: training augmentation; None means `AugmentConfig()` (gin-bound).
        seed: global seed for file order, shuffling, sampling and augmentation.
        deterministic: keep the training element order fixed (tf.data Options;
            evaluation is always ordered); with a fixed seed, two datasets built
            alike yield identical batches.
        cache: False (stream: works for larger-than-RAM data), True (keep the
            preprocessed float32 images in memory after the first epoch), or
            "auto" (cache when dataset.json's num_examples * S*S*3*4 bytes is
            below `cache_limit_gb`).
        shuffle_buffer: shuffle buffer in examples (encoded records when not
            cached, ~50 KB each at 512 px; preprocessed images when cached).
        sampling: None, "class_balanced" or "rarest_label" (see `sampling.py`);
            training only.
        class_counts: per-class counts (positives per label for multilabel) for
            sampling; default: dataset.json's for this split.
        normal_count: examples with no positive label (rarest_label only).
        with_info: yield dicts with image, label, patient_id and source.
        keep_keys: yield dicts with these keys instead of (image, label).
        repeat: repeat forever; default `training`.
        cycle_length: shard files read concurrently.
        threadpool_size: private tf.data thread pool size (None: the shared one).
        pixel_dtype: "float32" or "uint8" (rounded after augmentation; training on
            an accelerator: 4x less host->device traffic, measured 21.1 -> 18.0 ms
            per ConvNeXt-Tiny step on an H200, benchmarks/train_e2e.py).
        shard: (num_shards, index): read only files index, index + num_shards, ...
            (one process of several; class counts stay the whole split's). Raises
            ValueError when there are fewer files than shards.
        augment_on: "host" (augment here) or "device": training batches are then
            ({"image": uint8 un-augmented, "augment": float32 [B, DEVICE_PARAMS]}, label),
            the parameters drawn as "host" would draw them (`augment.device_params`), for
            `device_augment.DeviceAugment` inside the training step (cached images are
            then kept as uint8: a quarter of the memory).

    Returns:
        A dataset of (image `pixel_dtype` [B, S, S, 3] in [0, 255], label int32 [B] or
        float32 [B, C]), or dicts of `keep_keys` (tf.string [B] for the info keys).
    """
    _check_sampling(sampling, task)
    if pixel_dtype not in ("float32", "uint8"):
        raise ValueError(f"pixel_dtype must be 'float32' or 'uint8', got {pixel_dtype!r}")
    if augment_on not in ("host", "device"):
        raise ValueError(f"augment_on must be 'host' or 'device', got {augment_on!r}")
    on_device = training and augment_on == "device" and keep_keys is None and not with_info
    files = shard_files(file_pattern)
    repeat = training if repeat is None else repeat
    keep_keys = INFO_KEYS if with_info else (tuple(keep_keys) if keep_keys else None)
    config = (augment_config or augment_lib.AugmentConfig()) if training else None
    split = _split_info(read_dataset_info(files), files)
    sample_seed, augment_seed = _example_seeds(seed)
    if shard is not None:
        files = _shard_subset(files, *shard)

    # Shuffle the shard order (each epoch) and read several shards at once.
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    ds = ds.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
                       num_parallel_calls=AUTOTUNE)
    ds = ds.map(functools.partial(features_lib.parse_example, task=task,
                                  num_classes=num_classes), num_parallel_calls=AUTOTUNE)

    cached = _should_cache(cache, split, image_size, cache_limit_gb)
    if cached:
        stored = _as_uint8 if on_device else (lambda f: f)
        ds = ds.map(lambda f: stored(preprocess(decode(f), image_size)),
                    num_parallel_calls=AUTOTUNE).cache()
    if training:
        # Streaming: shuffle before decoding, so the buffer holds encoded bytes (~50 KB
        # per 512-px JPEG), not 0.6 MB float images. Cached: it holds references.
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if training and sampling:
        counts = class_counts if class_counts is not None else (split or {}).get("class_counts")
        ds = sampling_lib.resample(ds, sampling, counts, seed=sample_seed,
                                   normal_count=normal_count)

    # Not through autograph: this and everything it calls (augment.py) branch on Python
    # values only, or with tf.cond; converting augment.py cost ~1.7 s of every start.
    @tf.autograph.experimental.do_not_convert
    def element(index, f):
        if not cached:
            f = preprocess(decode(f), image_size)
        seed = tf.random.experimental.stateless_fold_in(augment_seed, index)
        if on_device:
            params = augment_lib.device_params(f["image"], config, seed)
            return {"image": _as_uint8(f)["image"], "augment": params}, f["label"]
        if training:
            f = augment(f, config, seed)
        if pixel_dtype == "uint8":
            f = _as_uint8(f)
        return _to_output(f, keep_keys)

    ds = ds.enumerate().map(element, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training, num_parallel_calls=AUTOTUNE)
    # Evaluation keeps the file order (stable outputs, reproducible reports); training
    # lets parallel stages hand out whichever element is ready, unless asked not to.
    ordered = deterministic or not training
    return ds.prefetch(AUTOTUNE).with_options(_options(ordered, threadpool_size))


def _as_uint8(features: dict) -> dict:
    """"image" rounded to uint8 (values are in [0, 255]: rounding cannot wrap)."""
    if features["image"].dtype == tf.uint8:
        return features
    return {**features, "image": tf.cast(tf.round(features["image"]), tf.uint8)}


def num_examples(file_pattern: str) -> int | None:
    """num_examples from dataset.json for the split these shards form, else None."""
    files = _files_or_none(file_pattern)
    split = _split_info(read_dataset_info(files), files)
    return None if split is None else int(split["num_examples"])


def class_counts_of(file_pattern: str) -> np.ndarray | None:
    """dataset.json's class_counts for the split these shards form, else None."""
    files = _files_or_none(file_pattern)
    split = _split_info(read_dataset_info(files), files)
    return None if split is None else np.asarray(split["class_counts"])
