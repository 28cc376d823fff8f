"""input_pipeline.pipeline: make_dataset on tiny synthetic shards."""

import json

import cv2
import numpy as np
import pytest
import tensorflow as tf

from input_pipeline import augment, features, pipeline

SRC = 40  # source image size in the shards
NUM = 22  # examples: 11 per shard, so batches of 4 leave a remainder


def _image(i: int) -> np.ndarray:
    """uint8 RGB [SRC, SRC, 3]: orange disc on black, colour and spot vary with i."""
    img = np.zeros((SRC, SRC, 3), np.uint8)
    cv2.circle(img, (SRC // 2, SRC // 2), SRC // 2 - 1, (200 + i, 100 + 3 * i, 30), -1)
    cv2.circle(img, (10 + i % 20, 15), 4, (255, 230, 160), -1)
    return img


def _encode(img: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def _write(directory, split: str, labels: list, ext=lambda i: ".jpg") -> dict:
    """Two shards of `split`; returns {source: encoded bytes}."""
    written, names = {}, [f"{split}-{s:05d}-of-00002.tfrecord" for s in range(2)]
    for s, name in enumerate(names):
        with tf.io.TFRecordWriter(str(directory / name)) as writer:
            for i in range(s, len(labels), 2):
                data = _encode(_image(i), ext(i))
                source = f"img_{i:03d}{ext(i)}"
                written[source] = data
                writer.write(features.serialize_example(
                        data, labels[i], height=SRC, width=SRC, patient_id=f"p{i // 2}",
                        source=source))
    return {"files": names, "num_examples": len(labels), "written": written}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    labels = [i % 3 for i in range(NUM)]
    train = _write(d, "train", labels, ext=lambda i: ".png" if i % 5 == 0 else ".jpg")
    counts = np.bincount(labels, minlength=3).tolist()
    info = {"task": "multiclass", "num_classes": 3, "image_size": SRC, "splits": {
            "train": {"num_examples": NUM, "class_counts": counts, "files": train["files"]}}}
    (d / "dataset.json").write_text(json.dumps(info))
    return {"dir": d, "pattern": str(d / "train-*.tfrecord"), "written": train["written"]}


def _make(shards, **kw):
    args = dict(file_pattern=shards["pattern"], batch_size=4, training=False, image_size=32,
                task="multiclass", num_classes=3)
    return pipeline.make_dataset(**{**args, **kw})


def _reference(data: bytes, size: int) -> np.ndarray:
    """numpy/OpenCV reference of decode + preprocess."""
    img = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR),
                       cv2.COLOR_BGR2RGB).astype(np.float32)
    shrink = size <= img.shape[0]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interpolation)


@pytest.mark.parametrize("size", [24, 56])  # area when shrinking, bilinear when enlarging
def test_eval_images_match_a_numpy_reference(shards, size):
    seen = 0
    for batch in _make(shards, image_size=size, with_info=True):
        for image, source in zip(batch["image"].numpy(), batch["source"].numpy(), strict=True):
            ref = _reference(shards["written"][source.decode()], size)
            assert image.dtype == np.float32 and image.shape == (size, size, 3)
            assert np.abs(image - ref).mean() < 0.5  # JPEG decoders may differ by ~1 level
            assert np.abs(image - ref).max() <= 3.0
            seen += 1
    assert seen == NUM


def test_eval_yields_every_example_once_with_info(shards):
    batches = list(_make(shards, with_info=True))
    sources = np.concatenate([b["source"].numpy() for b in batches])
    assert sorted(s.decode() for s in sources) == sorted(shards["written"])
    assert [b["label"].shape[0] for b in batches][-1] == NUM % 4  # remainder kept
    assert batches[0]["patient_id"].dtype == tf.string


def test_training_batches_are_static_augmented_and_in_range(shards):
    ds = _make(shards, training=True, augment_config=augment.full_config(), seed=1)
    image_spec, label_spec = ds.element_spec
    assert image_spec.shape.as_list() == [4, 32, 32, 3]  # drop_remainder: static batch dim
    assert label_spec.shape.as_list() == [4] and label_spec.dtype == tf.int32
    images = np.concatenate([b[0].numpy() for b in ds.take(8)])  # repeats past one epoch
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 255


def test_deterministic_mode_gives_identical_batches(shards):
    def batches(seed):
        ds = _make(shards, training=True, seed=seed, deterministic=True,
                   augment_config=augment.full_config())
        return [(x.numpy(), y.numpy()) for x, y in ds.take(7)]
    first, second, other = batches(5), batches(5), batches(6)
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other, strict=True))


def test_uint8_training_batches_are_the_rounded_float_batches(shards):
    def batches(pixel_dtype):
        ds = _make(shards, training=True, seed=3, deterministic=True, pixel_dtype=pixel_dtype)
        return [x.numpy() for x, _ in ds.take(3)]
    for f, u in zip(batches("float32"), batches("uint8"), strict=True):
        assert u.dtype == np.uint8
        np.testing.assert_array_equal(u, np.round(f).astype(np.uint8))
        assert np.abs(u - f).max() <= 0.5 and f.max() > 1  # real images, not all black
    with pytest.raises(ValueError, match="pixel_dtype"):
        _make(shards, pixel_dtype="float16")


def test_cache_gives_the_same_eval_images(shards):
    plain = [b[0].numpy() for b in _make(shards)]
    ds = _make(shards, cache=True)
    for _ in range(2):  # the second pass reads from the cache
        cached = [b[0].numpy() for b in ds]
        for a, b in zip(plain, cached, strict=True):
            np.testing.assert_array_equal(a, b)


def test_cached_training_equals_streamed_training_in_deterministic_mode(shards):
    # Same seed: same shuffle permutation and per-index augmentation seeds, whether
    # the shuffle buffer holds encoded records or cached preprocessed images. (Later
    # epochs differ: the cache replays the first epoch's shard order.)
    def batches(cache):
        ds = _make(shards, training=True, seed=2, deterministic=True, cache=cache)
        return [x.numpy() for x, _ in ds.take(NUM // 4)]  # the first epoch
    for a, b in zip(batches(False), batches(True), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cache_auto_uses_the_dataset_json_estimate(shards):
    split = {"num_examples": 1000}
    assert pipeline._should_cache("auto", split, 224, limit_gb=4.0)  # 0.6 GB
    assert not pipeline._should_cache("auto", split, 224, limit_gb=0.1)
    assert not pipeline._should_cache("auto", None, 224, limit_gb=4.0)  # unknown: stream
    files = sorted(str(p) for p in shards["dir"].glob("train-*.tfrecord"))
    assert pipeline._split_info(pipeline.read_dataset_info(files), files)["num_examples"] == NUM
    assert pipeline.num_examples(shards["pattern"]) == NUM


def test_class_balanced_sampling_reads_counts_from_dataset_json(tmp_path):
    labels = [0] * 16 + [1] * 4 + [2] * 2
    info = _write(tmp_path, "train", labels)
    meta = {"splits": {"train": {"num_examples": len(labels), "files": info["files"],
                                 "class_counts": [16, 4, 2]}}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    ds = pipeline.make_dataset(str(tmp_path / "train-*"), 16, True, 16, "multiclass", 3,
                               sampling="class_balanced", augment_config=augment.AugmentConfig(
                                       randaugment_layers=0, rotation_degrees=0))
    labels_out = np.concatenate([y.numpy() for _, y in ds.take(12)])
    fractions = np.bincount(labels_out, minlength=3) / len(labels_out)
    np.testing.assert_allclose(fractions, [1 / 3] * 3, atol=0.08)


def test_multilabel_labels_and_keep_keys(tmp_path):
    labels = [[i % 2, (i // 2) % 2, 0, 1] for i in range(6)]
    _write(tmp_path, "val", labels)
    ds = pipeline.make_dataset(str(tmp_path / "val-*"), 4, False, 16, "multilabel", 4,
                               keep_keys=("image", "label", "source"))
    assert set(ds.element_spec) == {"image", "label", "source"}
    got = np.concatenate([b["label"].numpy() for b in ds])
    assert got.dtype == np.float32 and got.shape == (6, 4)
    assert sorted(map(tuple, got.astype(int).tolist())) == sorted(map(tuple, labels))


def test_sampling_must_fit_the_task(shards):
    with pytest.raises(ValueError, match="use 'class_balanced'"):
        _make(shards, training=True, sampling="rarest_label")
    with pytest.raises(ValueError, match="use 'rarest_label'"):
        _make(shards, training=True, sampling="class_balanced", task="multilabel")
    with pytest.raises(ValueError, match="Unknown sampling"):
        _make(shards, training=True, sampling="sqrt")


def test_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        pipeline.make_dataset(str(tmp_path / "none-*"), 4, False, 16, "binary", 2)


def test_preprocess_image_contract():
    out = pipeline.preprocess_image(tf.zeros([30, 50, 3], tf.uint8), 20)
    assert out.shape == (20, 20, 3) and out.dtype == tf.float32
    f = pipeline.preprocess(pipeline.decode({"image_bytes": tf.constant(_encode(_image(0), ".png")),
                                             "label": tf.constant(1)}), 20)
    assert set(f) == {"image", "label"}
    np.testing.assert_allclose(f["image"].numpy(), _reference(_encode(_image(0), ".png"), 20),
                               atol=1e-3)


def test_make_grid_tiles_images_and_writes_labels():
    from input_pipeline.inspect import _label_text, make_grid
    images = np.zeros((5, 32, 32, 3), np.float32)
    grid = make_grid(images, [0, 1, 2, 1, 0], class_names=["a", "b", "c"])
    assert grid.shape == (64, 96, 3) and grid.dtype == np.uint8
    assert grid[:16, :16].max() > 100  # the (antialiased) label text on the first tile
    assert grid[32:, 64:].max() == 0  # the empty sixth cell
    assert _label_text(np.array([0.0, 1.0, 1.0]), ["x", "y", "z"]) == "y,z"
    assert _label_text(np.zeros(3)) == "-"


def test_inspect_writes_a_grid_png(shards, tmp_path):
    from input_pipeline.inspect import write_grid
    out = tmp_path / "grid.png"
    grid = write_grid(str(shards["dir"]), "train", 24, 6, str(out))
    assert grid.shape == (48, 72, 3)
    np.testing.assert_array_equal(cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB), grid)
