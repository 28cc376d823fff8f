"""prepare under careless input (issue 9): bad label cells, symlinks, foreign files in
out_dir, stale shards of an earlier plan, label conflicts, bad CSVs, worker count."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

from input_pipeline import pipeline, prepare, sources
from input_pipeline.prepare import PrepareConfig, run
from tests.test_prepare import REPO, _config, _fundus, _make_dataset, _rejected, _write_image


def _append_rows(csv_path, rows) -> None:
    with open(csv_path, "a") as f:
        for image, patient, grade in rows:
            f.write(f"{image},{patient},{grade}\n")


def _check_rows(summary, rejected) -> None:
    rows = summary["rows"]
    assert rows["read"] == rows["written"] + rows["rejected"] == rows["written"] + len(rejected)


# ----------------------------------------------------------------------------- labels


def test_nan_inf_and_text_labels_reject_their_row_only(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 2, 3])
    _append_rows(csv_path, [("img_000.png", "q1", "nan"), ("img_001.png", "q2", "inf"),
                            ("img_002.png", "q3", "-inf"), ("img_003.png", "q4", "severe")])
    cfg = _config(tmp_path, csv_path, images)
    summary = run(cfg)
    rejected = _rejected(cfg.out_dir)
    assert {r: reason for r, (_, reason) in rejected.items()} == {
            4: "label 'nan' is not a finite number, column 'grade'",
            5: "label 'inf' is not a finite number, column 'grade'",
            6: "label '-inf' is not a finite number, column 'grade'",
            7: "label 'severe' out of range / not a known class, column 'grade'"}
    assert summary["rows"]["written"] == 4
    _check_rows(summary, rejected)


def test_binary_threshold_never_turns_nan_into_a_class(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 3, "nan", "inf"])
    cfg = _config(tmp_path, csv_path, images, task="binary", positive_threshold=2.0)
    summary = run(cfg)
    assert [reason for _, reason in _rejected(cfg.out_dir).values()] == [
            "label 'nan' is not a finite number, column 'grade'",
            "label 'inf' is not a finite number, column 'grade'"]
    assert summary["splits"]["train"]["num_examples"] + summary["splits"]["val"][
            "num_examples"] + summary["splits"]["test"]["num_examples"] == 2


@pytest.mark.parametrize("adapter,text,label_columns,bad_row,column", [
        ("eyepacs", "image,level\n1_left,0\n1_right,nan\n", (), 1, "level"),
        ("aptos", "id_code,diagnosis\na,inf\nb,2\n", (), 0, "diagnosis"),
        ("idrid", "Image name,Retinopathy grade\nIDRiD_01,NaN\n", (), 0, "Retinopathy grade"),
        ("rfmid", "ID,Disease_Risk,DR\n1,nan,0\n", (), 0, "Disease_Risk"),
        ("odir", "ID,Left-Fundus,Right-Fundus,N,D,G,C,A,H,M,O\n7,7_l.jpg,7_r.jpg,"
                 "0,inf,0,0,0,0,0,0\n", ("D",), 1, "D"),
        ("mexico", "image,patient_id,dme\nimages/a.jpg,1,nan\n", ("dme",), 0, "dme"),
        ("generic", "image,grade\na.png,1e999\n", ("grade",), 0, "grade"),
])
def test_every_csv_adapter_rejects_a_nan_row_naming_the_column(tmp_path, adapter, text,
                                                               label_columns, bad_row, column):
    (tmp_path / "labels.csv").write_text(text)
    task = "binary" if adapter in ("rfmid", "odir", "mexico") else "dr_grade"
    cfg = PrepareConfig(labels_csv=str(tmp_path / "labels.csv"), images_dir=str(tmp_path),
                        out_dir=str(tmp_path / "out"), source=adapter, task=task,
                        label_columns=label_columns)
    source = sources.load_source(adapter, sources.SourceArgs(
            labels_csv=cfg.labels_csv, images_dir=cfg.images_dir, label_columns=label_columns))
    plan = prepare.make_plan(cfg, source)  # reads no image
    reason = plan.table.at[bad_row, "reason"]
    assert reason.endswith(f"is not a finite number, column {column!r}"), reason


def test_cli_data_error_is_one_line_not_help_or_traceback(tmp_path):
    """Errors used to go through absl's UsageError: the whole --help text, then the
    message. (A nan label is no error any more: see the tests above.)"""
    latin = tmp_path / "latin.csv"
    latin.write_bytes("image,grade\nimg_000.png,0\nimg_\xe9.png,1\n".encode("latin-1"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    bad = subprocess.run([sys.executable, "-m", "input_pipeline.prepare",
                          f"--labels_csv={latin}", f"--out_dir={tmp_path}/out",
                          "--label_column=grade", "--workers=1"],
                         cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 1
    # TensorFlow's C++ runtime logs a few start-up lines of its own ("WARNING: All log
    # messages before absl::InitializeLog()", I0000 oneDNN notes); everything else is ours.
    ours = [line for line in bad.stderr.strip().splitlines()
            if not line.startswith(("WARNING: All log messages", "I0000", "W0000", "E0000"))]
    assert ours == [
        f"prepare: error: {latin} line 3: not UTF-8 (byte 0xe9); save the CSV as UTF-8"]
    assert not os.path.exists(tmp_path / "out")


def test_header_only_csv_fails_with_zero_rows_and_writes_nothing(tmp_path):
    (tmp_path / "labels.csv").write_text("image,grade\n")
    cfg = _config(tmp_path, str(tmp_path / "labels.csv"), str(tmp_path))
    with pytest.raises(ValueError, match="0 rows"):
        run(cfg)
    assert not os.path.exists(cfg.out_dir)


# ----------------------------------------------------------------------------- paths


def test_symlinks_escaping_dangling_or_looping_are_rejected(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 0, 1])
    img_dir = tmp_path / "images"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    _write_image(outside / "secret.png", _fundus(20))
    os.symlink(outside / "secret.png", img_dir / "link_out.png")
    os.symlink(outside, img_dir / "dir_out")
    os.symlink(img_dir / "gone.png", img_dir / "dangling.png")
    os.symlink(img_dir / "loop_b.png", img_dir / "loop_a.png")
    os.symlink(img_dir / "loop_a.png", img_dir / "loop_b.png")
    os.symlink(img_dir / "img_000.png", img_dir / "link_in.png")  # stays inside: fine
    _append_rows(csv_path, [("link_out.png", "q1", 0), ("dir_out/secret.png", "q2", 1),
                            ("dangling.png", "q3", 0), ("loop_a.png", "q4", 1),
                            ("link_in.png", "p0", 0)])
    cfg = _config(tmp_path, csv_path, images)
    summary = run(cfg)
    reason = {path: why for path, why in _rejected(cfg.out_dir).values()}
    real = os.path.realpath(outside / "secret.png")
    assert reason == {
            "link_out.png": f"path outside --images_dir (resolves to {real})",
            "dir_out/secret.png": f"path outside --images_dir (resolves to {real})",
            "dangling.png": f"dangling symlink (to {str(img_dir / 'gone.png')!r})",
            "loop_a.png": "symlink loop"}
    assert summary["rows"]["written"] == 5  # link_in.png: same bytes and label as img_000
    assert summary["rejected_reasons"] == {"dangling symlink": 1, "symlink loop": 1,
                                           "path outside --images_dir": 2}
    _check_rows(summary, _rejected(cfg.out_dir))


def test_images_dir_itself_may_be_a_symlink(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 0, 1])
    os.symlink(images, tmp_path / "linked")
    cfg = _config(tmp_path, csv_path, str(tmp_path / "linked"))
    assert run(cfg)["rows"]["written"] == 4


# ----------------------------------------------------------------------------- out_dir


def test_unrelated_files_in_out_dir_survive_runs_and_overwrite(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1] * 4)
    out = tmp_path / "out"
    out.mkdir()
    theirs = ["notes.tmp", "model.tfrecord", "train-final.tfrecord", "dataset.json.bak",
              "x" + prepare.TMP_SUFFIX]
    for name in theirs:
        (out / name).write_text("not prepare's")
    run(_config(tmp_path, csv_path, images, task="binary"))
    run(_config(tmp_path, csv_path, images, task="binary", seed=1, overwrite=True))
    for name in theirs:
        assert (out / name).read_text() == "not prepare's", name


def test_stale_shards_of_an_earlier_plan_are_refused_and_never_read(tmp_path):
    """The issue's 284-vs-142: an earlier plan's shards, its .state gone, then a new plan."""
    csv_path, images = _make_dataset(tmp_path, [0, 1] * 8)
    earlier = run(_config(tmp_path, csv_path, images, out="a", task="binary", num_shards=6))
    out = tmp_path / "out"
    shutil.copytree(tmp_path / "a", out, ignore=shutil.ignore_patterns(".state"))
    cfg = _config(tmp_path, csv_path, images, task="binary", num_shards=3)
    with pytest.raises(ValueError, match="--out_dir: .* holds prepare output with no plan"):
        run(cfg)
    summary = run(dataclasses.replace(cfg, overwrite=True))
    stale = set(earlier["splits"]["train"]["files"]) - set(summary["splits"]["train"]["files"])
    assert stale and not any((out / n).exists() for n in stale)  # --overwrite removed them
    # Stale shards copied back in afterwards are still never read: dataset.json's list is.
    for name in stale:
        shutil.copy(tmp_path / "a" / name, out / name)
    pattern = str(out / "train-*.tfrecord")
    n = summary["splits"]["train"]["num_examples"]
    ds = pipeline.make_dataset(pattern, 1, training=False, image_size=32, task="binary")
    assert sum(1 for _ in ds) == n == pipeline.num_examples(pattern)
    assert pipeline.shard_files(pattern) == [str(out / f) for f in
                                             summary["splits"]["train"]["files"]]
    os.remove(out / summary["splits"]["train"]["files"][0])
    with pytest.raises(FileNotFoundError, match="listed in .*dataset.json but missing"):
        pipeline.shard_files(pattern)


def test_shards_without_dataset_json_are_globbed(tmp_path):
    for name in ("train-00000-of-00001.tfrecord", "other.tfrecord"):
        with tf.io.TFRecordWriter(str(tmp_path / name)):
            pass
    assert pipeline.shard_files(str(tmp_path / "train-*.tfrecord")) == [
            str(tmp_path / "train-00000-of-00001.tfrecord")]


# ----------------------------------------------------------------------------- conflicts


def test_label_conflicts_reject_every_conflicting_row_and_are_listed(tmp_path):
    csv_path, images = _make_dataset(tmp_path, [0, 1, 2, 3, 4, 0])
    img_dir = tmp_path / "images"
    shutil.copy(img_dir / "img_001.png", img_dir / "copy_of_1.png")  # same bytes, other label
    shutil.copy(img_dir / "img_002.png", img_dir / "copy_of_2.png")  # same bytes, same label
    _append_rows(csv_path, [("img_000.png", "p0", 0),       # 6: same file, same label
                            ("img_003.png", "p3", 4),       # 7: same file, other label
                            ("copy_of_1.png", "q1", 3),     # 8: identical bytes, other label
                            ("copy_of_2.png", "q2", 2)])    # 9: identical bytes, same label
    cfg = _config(tmp_path, csv_path, images)
    summary = run(cfg)
    rejected = _rejected(cfg.out_dir)
    assert {r: why for r, (_, why) in rejected.items()} == {
            6: "duplicate row",
            3: "label conflict with row 7", 7: "label conflict with row 3",
            1: "label conflict with row 8 (identical bytes)",
            8: "label conflict with row 1 (identical bytes)"}
    assert summary["label_conflicts"] == [
            {"kind": "same path", "rows": [3, 7], "paths": ["img_003.png"] * 2,
             "labels": ["3", "4"]},
            {"kind": "identical bytes", "rows": [1, 8],
             "paths": ["img_001.png", "copy_of_1.png"], "labels": ["1", "3"]}]
    assert summary["rows"]["label_conflicts"] == 4
    assert summary["rejected_reasons"] == {"duplicate row": 1, "label conflict with row N": 2,
                                           "label conflict with row N (identical bytes)": 2}
    assert summary["split"]["groups_merged_by_identical_bytes"] == 1  # copy_of_2 joins img_002
    _check_rows(summary, rejected)


# ----------------------------------------------------------------------------- workers


def test_default_workers_is_bounded_by_memory_and_cpus():
    gib = 1 << 30
    assert prepare.WORKER_MEMORY_BYTES == 1.5 * gib
    assert prepare.default_workers(memory=3 * gib, cpus=8) == 2
    assert prepare.default_workers(memory=64 * gib, cpus=8) == 8
    assert prepare.default_workers(memory=gib // 2, cpus=8) == 1
    assert prepare.available_memory() > 0  # Linux: /proc/meminfo
