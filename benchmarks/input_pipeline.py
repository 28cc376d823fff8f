"""Input-pipeline throughput: fundusflow's make_dataset vs the usual Keras recipe.

    python -m benchmarks.input_pipeline [--image_sizes=224,384] [--batches=30]

Data: ../shared/data/mexico_fundus (1548 fundus JPEGs at 512 px, label `dme`),
prepared once into bench_data/mexico_prepared with `input_pipeline.prepare`
(falls back to writing the shards directly when prepare fails). Both pipelines
read the same images: the training split's source JPEGs are symlinked into a
class-per-folder tree (bench_data/mexico_folders/{0,1}/) for the baseline.

- fundusflow: `make_dataset(training=True)` over the TFRecords, with the
  augmentation set named in the table (`augment.full_config()` for "full").
- keras: `keras.utils.image_dataset_from_directory` over the JPEGs and the
  equivalent `keras.layers` augmentation applied in `ds.map` (AUTOTUNE), which
  is what a user would otherwise write.

Every measurement runs in its own subprocess so that its peak RSS
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`) is its own. Images/s are timed
over --batches batches after --warmup batches (autotune settles). Not a test.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("source_dir", "../shared/data/mexico_fundus", "Mexico fundus folder.")
flags.DEFINE_string("work_dir", "bench_data", "Prepared shards and the symlink tree.")
flags.DEFINE_list("image_sizes", ["224", "384"], "Model input sizes to measure.")
flags.DEFINE_list("augment_sets", ["full", "basic"], "Augmentation sets (full, basic).")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_integer("warmup", 4, "Untimed batches first.")
flags.DEFINE_integer("batches", 30, "Timed batches (fundusflow).")
flags.DEFINE_integer("baseline_batches", 10, "Timed batches (keras: ~10x slower).")
flags.DEFINE_string("json_out", "", "Optional path for the results as JSON.")
flags.DEFINE_string("worker", "", "Internal: run one measurement ('fundusflow' or 'keras').")
flags.DEFINE_integer("size", 224, "Internal: the worker's image size.")
flags.DEFINE_string("augment_set", "full", "Internal: the worker's augmentation set.")


# ----------------------------------------------------------------------------- data


def _prepared_dir() -> str:
    return os.path.join(FLAGS.work_dir, "mexico_prepared")


def _prepare_shards() -> None:
    """Runs input_pipeline.prepare once; falls back to direct shard writing."""
    out = _prepared_dir()
    if os.path.exists(os.path.join(out, "dataset.json")):
        return
    cmd = [sys.executable, "-m", "input_pipeline.prepare",
           f"--labels_csv={FLAGS.source_dir}/labels.csv", f"--images_dir={FLAGS.source_dir}",
           "--task=binary", "--label_column=dme", f"--out_dir={out}"]
    logging.info("Preparing shards: %s", " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        logging.warning("prepare failed; writing the shards directly from the JPEGs")
        _write_shards_directly(out)


def _write_shards_directly(out: str) -> None:
    """Fallback: every labelled JPEG as-is into train-0000{0,1}-of-00002.tfrecord."""
    import pandas as pd
    import tensorflow as tf

    from input_pipeline import features

    table = pd.read_csv(os.path.join(FLAGS.source_dir, "labels.csv"))
    os.makedirs(out, exist_ok=True)
    names = [f"train-{i:05d}-of-00002.tfrecord" for i in range(2)]
    writers = [tf.io.TFRecordWriter(os.path.join(out, n)) for n in names]
    for i, row in enumerate(table.itertuples()):
        with open(os.path.join(FLAGS.source_dir, row.image), "rb") as f:
            data = f.read()
        writers[i % 2].write(features.serialize_example(
                data, int(row.dme), height=512, width=512, patient_id=str(row.patient_id),
                source=row.image))
    for w in writers:
        w.close()
    counts = table["dme"].value_counts().sort_index().tolist()
    info = {"task": "binary", "num_classes": 2, "image_size": 512, "splits": {"train": {
            "num_examples": len(table), "class_counts": counts, "files": names}}}
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(info, f, indent=1)


def _train_sources() -> list[tuple[str, int]]:
    """(source path relative to source_dir, label) of every training record."""
    import tensorflow as tf

    from input_pipeline import features, pipeline

    files = pipeline.shard_files(os.path.join(_prepared_dir(), "train-*.tfrecord"))
    out = []
    for record in tf.data.TFRecordDataset(files):
        f = features.parse_example(record, "binary")
        out.append((f["source"].numpy().decode(), int(f["label"])))
    return out


def _folder_tree() -> str:
    """bench_data/mexico_folders/{label}/{name}.jpg symlinks to the training JPEGs."""
    root = os.path.join(FLAGS.work_dir, "mexico_folders")
    if os.path.isdir(root):
        return root
    for source, label in _train_sources():
        os.makedirs(os.path.join(root, str(label)), exist_ok=True)
        target = os.path.abspath(os.path.join(FLAGS.source_dir, source))
        os.symlink(target, os.path.join(root, str(label), os.path.basename(source)))
    return root


# -------------------------------------------------------------------------- pipelines


def _fundusflow_dataset(size: int, augment_set: str):
    from input_pipeline import augment, pipeline

    config = augment.full_config() if augment_set == "full" else augment.AugmentConfig()
    return pipeline.make_dataset(os.path.join(_prepared_dir(), "train-*.tfrecord"),
                                 FLAGS.batch_size, training=True, image_size=size,
                                 task="binary", num_classes=2, augment_config=config)


def _keras_layers(augment_set: str) -> list:
    """Keras layers matching AugmentConfig() ("basic") or augment.full_config()."""
    import keras

    layers = [keras.layers.RandomRotation(0.5, fill_mode="constant"),
              keras.layers.RandomZoom((-0.1, 0.1), fill_mode="constant"),
              keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant"),
              keras.layers.RandomFlip("horizontal_and_vertical"),
              keras.layers.RandomBrightness(0.2, value_range=(0, 255)),
              keras.layers.RandomContrast(0.2, value_range=(0, 255)),
              keras.layers.RandomSaturation(0.2, value_range=(0, 255)),
              keras.layers.RandomHue(0.02, value_range=(0, 255))]
    if augment_set == "full":
        layers += [keras.layers.RandomShear(0.09, 0.0, fill_mode="constant"),
                   keras.layers.RandomSharpness(0.3, value_range=(0, 255)),
                   keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5),
                   keras.layers.RandomGaussianBlur(0.2, sigma=1.0, value_range=(0, 255)),
                   keras.layers.RandomErasing(0.25, scale=(0.02, 0.1), value_range=(0, 255))]
    return layers


def _keras_dataset(size: int, augment_set: str):
    import keras
    import tensorflow as tf

    ds = keras.utils.image_dataset_from_directory(
            _folder_tree(), image_size=(size, size), batch_size=FLAGS.batch_size,
            shuffle=True, seed=0, verbose=False)
    augmenter = keras.Sequential(_keras_layers(augment_set))
    ds = ds.repeat().map(lambda x, y: (augmenter(x, training=True), y),
                         num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _measure(worker: str, size: int, augment_set: str) -> dict:
    build = _fundusflow_dataset if worker == "fundusflow" else _keras_dataset
    iterator = iter(build(size, augment_set))
    for _ in range(FLAGS.warmup):
        next(iterator)
    start, cpu_start, images = time.perf_counter(), _cpu_seconds(), 0
    for _ in range(FLAGS.batches if worker == "fundusflow" else FLAGS.baseline_batches):
        images += int(next(iterator)[0].shape[0])
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    return {"pipeline": worker, "size": size, "augment": augment_set,
            "images_per_s": images / seconds, "images_per_cpu_s": images / cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- driver


def _run_worker(worker: str, size: int, augment_set: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.input_pipeline", f"--worker={worker}",
           f"--size={size}", f"--augment_set={augment_set}", f"--work_dir={FLAGS.work_dir}",
           f"--source_dir={FLAGS.source_dir}", f"--batch_size={FLAGS.batch_size}",
           f"--warmup={FLAGS.warmup}", f"--batches={FLAGS.batches}",
           f"--baseline_batches={FLAGS.baseline_batches}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _table(rows: list[dict]) -> str:
    cores = os.cpu_count() or 1
    head = ("| size | augment | fundusflow img/s | keras img/s | ratio | fundusflow img/s/core "
            "| fundusflow img/CPU-s | keras img/CPU-s | CPU ratio | fundusflow RSS MB "
            "| keras RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (size, augment_set), pair in _pairs(rows).items():
        ff, ke = pair["fundusflow"], pair["keras"]
        cells = [size, augment_set, f"{ff['images_per_s']:.1f}", f"{ke['images_per_s']:.1f}",
                 f"{ff['images_per_s'] / ke['images_per_s']:.1f}x",
                 f"{ff['images_per_s'] / cores:.1f}", f"{ff['images_per_cpu_s']:.1f}",
                 f"{ke['images_per_cpu_s']:.1f}",
                 f"{ff['images_per_cpu_s'] / ke['images_per_cpu_s']:.1f}x",
                 f"{ff['peak_rss_mb']:.0f}", f"{ke['peak_rss_mb']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _pairs(rows: list[dict]) -> dict:
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((r["size"], r["augment"]), {})[r["pipeline"]] = r
    return pairs


def main(_):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if FLAGS.worker:
        print(json.dumps(_measure(FLAGS.worker, FLAGS.size, FLAGS.augment_set)))
        return
    _prepare_shards()
    _folder_tree()
    rows = []
    for size in (int(s) for s in FLAGS.image_sizes):
        for augment_set in FLAGS.augment_sets:
            for worker in ("fundusflow", "keras"):
                rows.append(_run_worker(worker, size, augment_set))
                logging.info("%s", rows[-1])
    print(f"batch {FLAGS.batch_size}, {FLAGS.batches} (keras {FLAGS.baseline_batches}) timed "
          f"batches after {FLAGS.warmup}, "
          f"{os.cpu_count()} cores; full = augment.full_config() / keras equivalents")
    print(_table(rows))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
