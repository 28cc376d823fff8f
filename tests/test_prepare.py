"""prepare: round trip, bad input, config errors, resume after kill -9, balance, splits."""

import collections
import csv
import json
import os

import cv2
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from input_pipeline import features, preprocessing, sources
from input_pipeline.prepare import TMP_SUFFIX, PrepareConfig, preprocess_config, run
from tests.reliability import prepare_child
from tests.serving_helpers import garbage_scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fundus(i: int, size: int = 64) -> np.ndarray:
    """uint8 RGB [size, size, 3]: a bright disc on black with an index-dependent mark."""
    img = np.zeros((size, size, 3), np.uint8)
    cv2.circle(img, (size // 2, size // 2), size // 2 - 4, (180, 90 + i % 100, 40), -1)
    cv2.line(img, (10, 10 + i % 40), (50, 30), (255, 255, 255), 2)
    cv2.putText(img, str(i), (20, 45), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    return img


def _write_image(path, img) -> None:
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 and img.shape[2] == 3 else img
    assert cv2.imwrite(str(path), bgr)


def _make_dataset(tmp_path, labels, patients=None, ext="png"):
    """Writes images/<i>.<ext> and labels.csv (image,patient_id,grade); returns paths."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    rows = []
    for i, label in enumerate(labels):
        name = f"img_{i:03d}.{ext}"
        _write_image(images / name, _fundus(i))
        rows.append({"image": name, "patient_id": patients[i] if patients else f"p{i}",
                     "grade": str(label)})
    csv_path = tmp_path / "labels.csv"
    pd.DataFrame(rows).to_csv(csv_path, index=False)
    return str(csv_path), str(images)


def _config(tmp_path, csv_path, images_dir, out="out", **kw) -> PrepareConfig:
    kw = {"label_columns": ("grade",), "image_size": 64, "crop": "none", "workers": 1, **kw}
    return PrepareConfig(labels_csv=csv_path, images_dir=images_dir,
                         out_dir=str(tmp_path / out), **kw)


def _records(out_dir, summary, split):
    """Parsed examples of one split: dicts of numpy values plus the raw record bytes."""
    out = []
    for name in summary["splits"][split]["files"]:
        for raw in tf.data.TFRecordDataset(os.path.join(out_dir, name)):
            ex = features.parse_example(raw, summary["task"], summary["num_classes"])
            rec = {k: v.numpy() for k, v in ex.items()}
            rec.update(raw=raw.numpy(), patient_id=rec["patient_id"].decode(),
                       source=rec["source"].decode())
            out.append(rec)
    return out


def _all_records(out_dir, summary):
    return {s: _records(out_dir, summary, s) for s in ("train", "val", "test")}


def _rejected(out_dir) -> dict[int, tuple[str, str]]:
    with open(os.path.join(out_dir, "rejected.csv")) as f:
        return {int(r["row"]): (r["path"], r["reason"]) for r in csv.DictReader(f)}


def test_round_trip_labels_patients_and_pixels(tmp_path):
    labels = [0, 1, 2, 3, 4] * 4
    patients = [f"pat{i // 2}" for i in range(20)]
    csv_path, images = _make_dataset(tmp_path, labels, patients)
    cfg = _config(tmp_path, csv_path, images)
    summary = run(cfg)
    assert summary["rows"] == {"read": 20, "written": 20, "rejected": 0,
                               "skipped_unknown_label": 0, "label_conflicts": 0}
    assert summary["label_conflicts"] == []
    records = [r for rs in _all_records(cfg.out_dir, summary).values() for r in rs]
    assert sorted(r["source"] for r in records) == [f"img_{i:03d}.png" for i in range(20)]
    pcfg = preprocess_config(cfg)
    for r in records:
        i = int(r["source"][4:7])
        assert r["label"] == labels[i] and r["patient_id"] == patients[i]
        path = os.path.join(images, r["source"])
        # The stored bytes are exactly the JPEG process_image makes ...
        expected = preprocessing.process_image(path, pcfg)[1]["jpeg"]
        assert r["image_bytes"] == expected
        # ... and with crop=none at the source size they decode to the source pixels (JPEG).
        decoded = tf.io.decode_jpeg(r["image_bytes"]).numpy()
        assert decoded.shape == (64, 64, 3)
        assert np.abs(decoded.astype(int) - _fundus(i)).mean() < 4
    with open(os.path.join(cfg.out_dir, "dataset.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert on_disk["class_names"] == ["0", "1", "2", "3", "4"]
    # Everything the export's serving graph must reproduce is recorded.
    assert on_disk["preprocessing"] == {
        "crop": cfg.crop, "clahe": None, "clahe_clip_limit": pcfg.clahe_clip_limit,
        "clahe_tile_grid": pcfg.clahe_tile_grid, "ben_graham": False,
        "ben_graham_sigma": pcfg.ben_graham_sigma, "jpeg_quality": 95}
    assert sum(s["num_examples"] for s in on_disk["splits"].values()) == 20
    assert np.sum([s["class_counts"] for s in on_disk["splits"].values()], axis=0).tolist() == \
        [4] * 5
    assert _rejected(cfg.out_dir) == {}


def test_other_plan_in_out_dir_is_refused_unless_overwrite(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1] * 4)
    run(_config(tmp_path, csv_path, images, task="binary"))
    with pytest.raises(ValueError, match="--out_dir"):
        run(_config(tmp_path, csv_path, images, task="binary", seed=3))
    summary = run(_config(tmp_path, csv_path, images, task="binary", seed=3, overwrite=True))
    assert summary["split"]["seed"] == 3 and summary["rows"]["written"] == 8


def test_every_bad_input_is_rejected_with_its_reason(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 2, 3])
    img_dir = tmp_path / "images"
    jpeg = cv2.imencode(".jpg", _fundus(7))[1].tobytes()
    (img_dir / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (img_dir / "zero.png").write_bytes(b"")
    (img_dir / "text.jpg").write_bytes(b"this is not an image\n")
    _write_image(img_dir / "gray16.png", (_fundus(8)[..., 0].astype(np.uint16) * 257))
    _write_image(img_dir / "gray.png", _fundus(9)[..., 1])
    rgba = cv2.cvtColor(cv2.cvtColor(_fundus(10), cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2BGRA)
    _write_image(img_dir / "rgba.png", rgba)
    _write_image(img_dir / "huge.png", np.zeros((8000, 8000), np.uint8))  # 64 MP
    _write_image(img_dir / "inside_abs.png", _fundus(11))
    _write_image(tmp_path / "outside.png", _fundus(12))
    _write_image(img_dir / "bad_label.png", _fundus(13))
    _write_image(img_dir / "no_label.png", _fundus(14))
    extra = [("missing.png", "0"), ("zero.png", "0"), ("truncated.jpg", "1"), ("text.jpg", "1"),
             ("gray16.png", "2"), ("gray.png", "2"), ("rgba.png", "3"), ("huge.png", "3"),
             ("bad_label.png", "7"), ("no_label.png", ""), ("img_000.png", "0"),
             ("../outside.png", "0"), (str(tmp_path / "outside.png"), "0"),
             (str(img_dir / "inside_abs.png"), "4")]
    with open(csv_path, "a") as f:
        for path, label in extra:
            f.write(f"{path},x{path[-9:]},{label}\n")
    cfg = _config(tmp_path, csv_path, images)
    summary = run(cfg)
    rejected = _rejected(cfg.out_dir)
    reason = {path: rejected[4 + i][1] for i, (path, _) in enumerate(extra) if 4 + i in rejected}
    assert reason["img_000.png"] == "duplicate row"
    assert reason["../outside.png"] == "path outside --images_dir"
    assert reason[str(tmp_path / "outside.png")] == "path outside --images_dir"
    assert reason["no_label.png"] == f"{sources.UNKNOWN_LABEL}, column 'grade'"
    assert "out of range" in reason["bad_label.png"]
    for path in ("missing.png", "zero.png", "truncated.jpg", "text.jpg", "huge.png"):
        assert reason[path], path  # process_image's own wording
    written = {r["source"] for rs in _all_records(cfg.out_dir, summary).values() for r in rs}
    assert written == {f"img_{i:03d}.png" for i in range(4)} | {
            "gray16.png", "gray.png", "rgba.png", "inside_abs.png"}
    rows = summary["rows"]
    assert (rows["read"], rows["written"], rows["rejected"]) == (18, 8, 10)
    assert rows["skipped_unknown_label"] == 1 and len(rejected) == 10
    assert sum(summary["rejected_reasons"].values()) == 10


@pytest.mark.parametrize("overrides,message", [
        ({"label_columns": ("dr_grade",)}, "'dr_grade'"),
        ({"task": "regression"}, "--task"),
        ({"split": "0.5,0.6,0.1"}, "--split"),
        ({"crop": "square"}, "--crop"),
        ({"label_map": "none=0"}, "--label_map"),
        ({"split_column": "fold"}, "'fold'"),
        ({"source": "eyepacs", "label_columns": ()}, "'image'"),
        ({"positive_threshold": 2.0}, "--positive_threshold"),
])
def test_config_errors_stop_before_any_image_work(tmp_path, monkeypatch, overrides, message):
    csv_path, images = _make_dataset(tmp_path, [0, 1])

    def no_image_work(*args, **kw):
        raise AssertionError("process_image called despite a configuration error")

    monkeypatch.setattr(preprocessing, "process_image", no_image_work)
    with pytest.raises(ValueError, match=message):
        run(_config(tmp_path, csv_path, images, **overrides))
    out = tmp_path / "out"
    assert not out.exists() or not list(out.glob("*.tfrecord*"))


def test_worker_exceptions_become_rejections(tmp_path, monkeypatch):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 0, 1])
    real = preprocessing.process_image

    def flaky(path, config):
        if path.endswith("img_001.png"):
            raise preprocessing.ImageError("image too large to decode safely")
        if path.endswith("img_002.png"):
            raise RuntimeError("codec crashed")
        return real(path, config)

    monkeypatch.setattr(preprocessing, "process_image", flaky)
    cfg = _config(tmp_path, csv_path, images, task="binary")
    summary = run(cfg)
    rejected = _rejected(cfg.out_dir)
    assert rejected[1] == ("img_001.png", "image too large to decode safely")
    assert rejected[2][1] == "unexpected error: RuntimeError: codec crashed"
    assert summary["rows"]["written"] == 2


def _shard_bytes(out_dir) -> dict[str, bytes]:
    return {n: open(os.path.join(out_dir, n), "rb").read()
            for n in sorted(os.listdir(out_dir)) if n.endswith(".tfrecord")}


def _without_timing(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "timing"}


def test_resume_after_kill_9_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL while the second shard's partial file is being written (the fault
    point is set from the test side, tests/reliability/prepare_child.py): the
    re-run keeps the finished shard, redoes the rest, deletes only its own partial
    file and equals an uninterrupted run byte for byte."""
    csv_path, images = _make_dataset(tmp_path, [0, 1, 2, 3] * 4)
    opts = {"task": "dr_grade", "num_shards": 4, "split": "0.5,0.25,0.25"}
    killed = _config(tmp_path, csv_path, images, out="killed", **opts)
    os.makedirs(killed.out_dir)
    unrelated = os.path.join(killed.out_dir, "notes.tmp")
    open(unrelated, "w").close()  # not prepare's: must survive every run
    flags = [f"--labels_csv={csv_path}", f"--images_dir={images}",
             f"--out_dir={killed.out_dir}", "--task=dr_grade", "--label_column=grade",
             "--image_size=64", "--crop=none", "--num_shards=4", "--split=0.5,0.25,0.25",
             "--workers=1"]
    # The first shard holds 4 records: hang at the 2nd record of the second one.
    outcome = prepare_child.kill_at("record", 6, flags, str(tmp_path / "marker"))
    assert outcome == "killed"
    partial = "train-00001-of-00002.tfrecord" + TMP_SUFFIX
    assert sorted(os.listdir(killed.out_dir)) == [
            ".state", "notes.tmp", "train-00000-of-00002.tfrecord", partial]
    first = os.stat(os.path.join(killed.out_dir, "train-00000-of-00002.tfrecord"))

    resumed = run(killed)
    reference = run(_config(tmp_path, csv_path, images, out="reference", **opts))
    assert _shard_bytes(killed.out_dir) == _shard_bytes(str(tmp_path / "reference"))
    assert _without_timing(resumed) == _without_timing(reference)
    again = os.stat(os.path.join(killed.out_dir, "train-00000-of-00002.tfrecord"))
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not redone
    assert not [n for n in os.listdir(killed.out_dir) if n.endswith(TMP_SUFFIX)]
    assert os.path.exists(unrelated)
    assert len(_shard_bytes(killed.out_dir)) == 4


def test_quality_thresholds_are_flags_and_recorded(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 2, 3])
    default = run(_config(tmp_path, csv_path, images, out="default"))
    assert default["quality_flags"].get("quality_too_dark", 0) == 0
    strict = run(_config(tmp_path, csv_path, images, out="strict", dark_threshold=255.0,
                         small_field_pixels=10_000.0))
    written = strict["rows"]["written"]
    assert strict["quality_flags"] == {"quality_small_field": written,
                                       "quality_too_dark": written}
    assert strict["quality_thresholds"] == {"dark_threshold": 255.0,
                                            "small_field_fraction": 0.5,
                                            "small_field_pixels": 10_000.0}
    with pytest.raises(ValueError, match="--dark_threshold"):
        run(_config(tmp_path, csv_path, images, out="bad", dark_threshold=300.0))


def test_upsampling_only_in_train_and_reuses_bytes(tmp_path):
    labels = [0] * 30 + [1] * 10
    csv_path, images = _make_dataset(tmp_path, labels)
    cfg = _config(tmp_path, csv_path, images, task="binary", balance="upsample", num_shards=3)
    summary = run(cfg)
    train = summary["splits"]["train"]
    before, after = train["class_counts_before_balance"], train["class_counts"]
    assert before[0] > before[1] and after == [before[0], before[0]]
    records = _all_records(cfg.out_dir, summary)
    assert len(records["train"]) == train["num_examples"] == sum(after)
    by_source = collections.defaultdict(set)
    for r in records["train"]:
        by_source[r["source"]].add(r["raw"])
    assert len(by_source) == sum(before)
    assert all(len(v) == 1 for v in by_source.values())  # repeats are the same bytes
    for split in ("val", "test"):
        s = summary["splits"][split]
        assert s["class_counts"] == s["class_counts_before_balance"]
        assert len({r["source"] for r in records[split]}) == len(records[split])
    assert summary["rows"]["written"] == 40 and summary["balance"] == "upsample"


def test_grouped_split_keeps_patients_and_identical_files_together(tmp_path):
    labels = [i % 3 for i in range(36)]
    labels[5] = labels[0]  # the copy below keeps its label (else: a rejected label conflict)
    patients = [f"p{i // 3}" for i in range(36)]
    csv_path, images = _make_dataset(tmp_path, labels, patients)
    # Byte-identical copies under other patients must follow their original.
    for i, j in ((0, 5), (3, 33)):
        src = os.path.join(images, f"img_{i:03d}.png")
        dst = os.path.join(images, f"img_{j:03d}.png")
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read())
    # A listed (not byte-identical) duplicate joins p2 and p7 as well.
    dup_csv = tmp_path / "duplicates.csv"
    dup_csv.write_text("group,md5_of_original,image,patient_id\n"
                       "0,x,img_006.png,p2\n0,x,img_021.png,p7\n")
    cfg = _config(tmp_path, csv_path, images, task="multiclass", split="0.6,0.2,0.2",
                  duplicates_csv=str(dup_csv))
    summary = run(cfg)
    split_of = collections.defaultdict(set)
    for split, rs in _all_records(cfg.out_dir, summary).items():
        for r in rs:
            split_of[r["patient_id"]].add(split)
            split_of[r["source"]].add(split)
    assert all(len(v) == 1 for v in split_of.values())
    assert split_of["img_000.png"] == split_of["img_005.png"]
    assert split_of["p0"] == split_of["p1"]  # joined through the duplicate file
    assert split_of["p1"] == split_of["p11"]
    assert split_of["p2"] == split_of["p7"]
    assert summary["split"]["groups_merged_by_identical_bytes"] == 2
    assert summary["split"]["groups_merged_by_duplicates_csv"] == 1
    assert summary["split"]["num_groups"] == 9 and summary["split"]["straddling_groups"] == 0
    assert {s: v["num_examples"] > 0 for s, v in summary["splits"].items()} == {
            "train": True, "val": True, "test": True}


def test_min_class_count_single_label_and_multilabel(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 2, 0, 1, 2, 0, 1, 3])
    cfg = _config(tmp_path, csv_path, images, task="multiclass", min_class_count=2)
    summary = run(cfg)
    assert summary["dropped_classes"] == ["3"] and summary["class_names"] == ["0", "1", "2"]
    assert _rejected(cfg.out_dir) == {8: ("img_008.png", "class dropped (min_class_count)")}
    df = pd.read_csv(csv_path)
    df["a"], df["b"], df["c"] = [1, 0] * 4 + [1], [0, 1] * 4 + [1], [0] * 8 + [1]
    df.to_csv(csv_path, index=False)
    cfg = _config(tmp_path, csv_path, images, out="ml", task="multilabel",
                  label_columns=("a", "b", "c"), min_class_count=2)
    summary = run(cfg)
    assert summary["dropped_classes"] == ["c"] and summary["num_classes"] == 2
    assert summary["split"]["method"] == "grouped_iterative_stratified"
    records = [r for rs in _all_records(cfg.out_dir, summary).values() for r in rs]
    assert len(records) == 9 and all(r["label"].shape == (2,) for r in records)
    last = next(r for r in records if r["source"] == "img_008.png")
    assert last["label"].tolist() == [1.0, 1.0]


def test_min_class_count_dr_grade_keeps_grade_numbers(tmp_path):
    # Grade 1 has one row: dropping it would renumber 2,3,4 -> 1,2,3 (referable would
    # silently mean original grade >= 3), so prepare refuses before reading images.
    csv_path, images = _make_dataset(tmp_path, [0, 0, 1, 2, 2, 3, 3, 4, 4])
    with pytest.raises(ValueError, match=r"grade\(s\) 1 \(1 rows\).*ordinal scale"):
        run(_config(tmp_path, csv_path, images, task="dr_grade", min_class_count=2))
    assert not os.path.exists(tmp_path / "out" / "dataset.json")
    # The highest grade alone is rare: dropped, and grades 0-3 keep their numbers.
    csv_path, images = _make_dataset(tmp_path, [0, 0, 1, 1, 2, 2, 3, 3, 4])
    cfg = _config(tmp_path, csv_path, images, out="top", task="dr_grade", min_class_count=2)
    summary = run(cfg)
    assert summary["dropped_classes"] == ["4"] and summary["class_names"] == ["0", "1", "2", "3"]
    records = [r for rs in _all_records(cfg.out_dir, summary).values() for r in rs]
    assert sorted((r["source"], int(r["label"])) for r in records) == [
        (f"img_{i:03d}.png", g) for i, g in enumerate([0, 0, 1, 1, 2, 2, 3, 3])]


def test_modality_is_recorded_from_the_flag_or_the_crop(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 0, 1])
    kw = dict(task="binary", split="0.5,0.25,0.25")
    assert run(_config(tmp_path, csv_path, images, out="a", **kw))["modality"] == "other"
    assert run(_config(tmp_path, csv_path, images, out="b", crop="fundus",
                       **kw))["modality"] == "fundus"
    assert run(_config(tmp_path, csv_path, images, out="c", modality="oct",
                       **kw))["modality"] == "oct"
    with pytest.raises(ValueError, match="--modality"):
        run(_config(tmp_path, csv_path, images, out="d", modality="xray", **kw))


def test_npz_source_keeps_official_splits(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.arange(n).reshape(n, 1) % 5
    np.savez(tmp_path / "retinamnist.npz", **arrays)
    cfg = PrepareConfig(labels_csv=str(tmp_path / "retinamnist.npz"), out_dir=str(tmp_path / "o"),
                        source="npz", task="dr_grade", image_size=28, crop="none", workers=1)
    summary = run(cfg)
    assert {s: v["num_examples"] for s, v in summary["splits"].items()} == {
            "train": 6, "val": 2, "test": 2}
    assert summary["split"]["method"] == "column"
    assert summary["splits"]["train"]["class_counts"] == [2, 1, 1, 1, 1]


def _mexico_sample(shared_data, tmp_path):
    """30 rows of the Mexican fundus set: 15 with a known dr, 15 without."""
    root = shared_data / "mexico_fundus"
    df = pd.read_csv(root / "labels.csv", dtype=str, keep_default_na=False)
    sample = pd.concat([df[df.dr != ""].head(15), df[df.dr == ""].head(15)])
    path = tmp_path / "labels.csv"
    sample.to_csv(path, index=False)
    return str(path), str(root), sample.reset_index(drop=True)


def test_mexico_sample_binary_dme(shared_data, tmp_path):
    csv_path, root, sample = _mexico_sample(shared_data, tmp_path)
    cfg = PrepareConfig(labels_csv=csv_path, images_dir=root, out_dir=str(tmp_path / "dme"),
                        source="mexico", task="binary", label_columns=("dme",), image_size=64,
                        workers=2)
    summary = run(cfg)
    rows = summary["rows"]
    assert rows["read"] == 30 and rows["written"] + rows["rejected"] == 30
    assert rows["skipped_unknown_label"] == 0
    records = [r for rs in _all_records(cfg.out_dir, summary).values() for r in rs]
    assert len(records) == rows["written"]
    truth = dict(zip(sample.image, zip(sample.dme, sample.patient_id, strict=True), strict=True))
    for r in records:
        assert (str(r["label"]), r["patient_id"]) == truth[r["source"]]


def test_mexico_sample_multiclass_dr_rejects_unknown(shared_data, tmp_path):
    csv_path, root, sample = _mexico_sample(shared_data, tmp_path)
    cfg = PrepareConfig(labels_csv=csv_path, images_dir=root, out_dir=str(tmp_path / "dr"),
                        source="mexico", task="multiclass", label_columns=("dr",),
                        image_size=64, workers=1)
    summary = run(cfg)
    assert summary["class_names"] == ["none", "npdr", "pdr"]
    assert summary["rows"]["skipped_unknown_label"] == 15
    unknown = {i: (sample.image[i], f"{sources.UNKNOWN_LABEL}, column 'dr'")
               for i in range(15, 30)}
    rejected = _rejected(cfg.out_dir)
    assert {i: rejected[i] for i in unknown} == unknown
    records = [r for rs in _all_records(cfg.out_dir, summary).values() for r in rs]
    names = summary["class_names"]
    truth = dict(zip(sample.image, sample.dr.str.lower(), strict=True))
    assert all(names[r["label"]] == truth[r["source"]] for r in records)
    assert summary["rows"]["written"] == len(records) == 30 - len(rejected)


def test_upsample_plan_golden():
    from input_pipeline.prepare import _upsample

    assert _upsample([10, 11, 12, 13], [0, 0, 0, 1], 2, multilabel=False) == [13, 13]
    # Multi-label: row 4 is the only positive of the rare label B (its rarest label), so it
    # is repeated until B has as many positives as A; its copies also count for A.
    labels = [(1, 0), (1, 0), (1, 0), (1, 0), (1, 1), (0, 0)]
    assert _upsample(list(range(6)), labels, 2, multilabel=True) == [4, 4, 4, 4]


def test_conversions_recorded_and_corrupt_jpeg_rejected(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 2, 3])
    img_dir = tmp_path / "images"
    _write_image(img_dir / "gray16.png", _fundus(8)[..., 0].astype(np.uint16) * 257)
    bgra = cv2.cvtColor(cv2.cvtColor(_fundus(9), cv2.COLOR_RGB2BGR), cv2.COLOR_BGR2BGRA)
    _write_image(img_dir / "rgba.png", bgra)
    (img_dir / "garbage.jpg").write_bytes(garbage_scan(cv2.imencode(".jpg", _fundus(7))[1]
                                                        .tobytes()))
    with open(csv_path, "a") as f:
        f.write("gray16.png,q1,0\nrgba.png,q2,1\ngarbage.jpg,q3,2\n")
    cfg = _config(tmp_path, csv_path, images)
    summary = run(cfg)
    assert _rejected(cfg.out_dir) == {6: ("garbage.jpg", "corrupt JPEG data (broken marker "
                                          "structure or garbage in the scan data)")}
    assert summary["conversions"] == {"16bit->8bit": 1, "alpha->black": 1, "gray->rgb": 1}
    rows = pd.read_csv(os.path.join(cfg.out_dir, "conversions.csv"))
    assert rows.values.tolist() == [[4, "gray16.png", "16bit->8bit;gray->rgb"],
                                    [5, "rgba.png", "alpha->black"]]
