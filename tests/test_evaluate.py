"""evaluate.py end to end on a tiny workdir trained for 1 epoch on 32 px shards."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import gin
import numpy as np
import pytest

from evaluation import run
from tests.test_train import DEBUG_GIN, REPO, write_shards


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from training import experiment

    data_dir = write_shards(str(tmp_path_factory.mktemp("data")),
                            counts={"train": 40, "val": 30, "test": 30})
    w = tmp_path_factory.mktemp("run") / "w"
    gin.clear_config()
    gin.parse_config_files_and_bindings([DEBUG_GIN], [f"train.data_dir = '{data_dir}'",
                                                      "train.epochs = 1"])
    experiment.train(str(w))
    gin.clear_config()
    return w


@pytest.fixture(scope="module")
def evaluated(workdir):
    out = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"),
                          f"--workdir={workdir}", "--tta", "--n_boot=50",
                          "--gradcam_per_kind=2"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir / "eval", out.stdout


def test_files_and_report_location(evaluated):
    eval_dir, stdout = evaluated
    assert f"Report: {eval_dir / 'report.html'}" in stdout
    for name in ("metrics.json", "thresholds.json", "calibration.json", "report.html",
                 "predictions_test.csv", "roc.png", "reliability.png", "confusion_matrix.png"):
        assert (eval_dir / name).is_file(), name
    assert len(list((eval_dir / "gradcam").glob("*.png"))) >= 2
    assert list((eval_dir.parent / "tensorboard" / "eval").glob("events.out.tfevents.*"))


def test_metrics_json_keys(evaluated):
    m = json.loads((evaluated[0] / "metrics.json").read_text())
    assert m["task"] == "dr_grade" and m["split"] == "test" and m["tta"] is True
    assert m["num_examples"] == 30
    for key in ("qwk", "accuracy", "weighted_f1", "referable_auc", "referable_sensitivity",
                "referable_specificity"):
        assert key in m["metrics"]
    assert set(m["confidence_intervals"]) == set(m["headline"])
    assert np.array(m["confusion_matrix"]).sum() == 30
    assert m["calibration"]["temperature"] > 0


def test_thresholds_json_is_an_applicable_rule(evaluated):
    t = json.loads((evaluated[0] / "thresholds.json").read_text())
    assert t["task"] == "dr_grade" and t["head"] == "coral" and t["tuned_on"] == "val"
    cuts = t["decision"]["cutpoints"]
    assert t["decision"]["type"] == "ordinal_cutpoints" and len(cuts) == 4
    assert all(a < b for a, b in zip(cuts, cuts[1:], strict=False))


def test_predictions_csv_matches_metrics(evaluated):
    with open(evaluated[0] / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    m = json.loads((evaluated[0] / "metrics.json").read_text())
    assert len(rows) == 30 and {"source", "label", "prediction", "p_0", "p_4"} <= set(rows[0])
    acc = np.mean([r["label"] == r["prediction"] for r in rows])
    assert acc == pytest.approx(m["metrics"]["accuracy"])


def test_ensemble_of_one_workdir_twice_is_that_workdir(evaluated, workdir, tmp_path):
    """evaluation.ensemble reuses evaluate's predictions, calibration and tuner: the mean of
    two identical members is evaluate.py's own result, image by image."""
    from evaluation import ensemble

    result = ensemble.ensemble([str(workdir), str(workdir)], str(tmp_path / "e"), "test",
                               tta=True, n_boot=50)
    single = json.loads((evaluated[0] / "metrics.json").read_text())
    for name in ("qwk", "accuracy", "argmax_accuracy", "macro_auc"):
        assert result["metrics"][name] == pytest.approx(single["metrics"][name]), name
    assert result["temperatures"] == [pytest.approx(single["calibration"]["temperature"])] * 2
    assert result["member_metrics"][1]["qwk"] == pytest.approx(single["metrics"]["qwk"])

    def read(path):
        with open(path) as f:
            return list(csv.DictReader(f))

    mine, theirs = read(tmp_path / "e" / "predictions_test.csv"), read(
        evaluated[0] / "predictions_test.csv")
    assert [r["prediction"] for r in mine] == [r["prediction"] for r in theirs]
    for key in ("p_0", "p_2", "p_4"):
        np.testing.assert_allclose([float(r[key]) for r in mine],
                                   [float(r[key]) for r in theirs], atol=2e-6)
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["members"] == [
        str(workdir)] * 2


def test_gallery_indices():
    correct = np.array([True, False, True, True, False])
    idx = run.gallery_indices(correct, per_kind=2)
    assert sorted(correct[idx].tolist()) == [False, False, True, True]
    assert len(run.gallery_indices(np.array([True]), per_kind=3)) == 1


# ------------------------------------------------- other tasks (untrained model, no training)

def _write_split(out_dir, split, labels, rng):
    import cv2
    import tensorflow as tf

    from input_pipeline import features

    name = f"{split}-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as w:
        for i, y in enumerate(labels):
            img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
            png = cv2.imencode(".png", img)[1].tobytes()
            label = [int(v) for v in y] if np.ndim(y) else int(y)
            w.write(features.serialize_example(png, label, height=32, width=32,
                                               patient_id=f"p{i // 2}", source=f"{split}{i}.png"))


@pytest.mark.parametrize("task,k,head,rule_type", [
    ("multilabel", 3, "sigmoid", "per_class_thresholds"),
    ("binary", 2, "sigmoid", "binary_threshold"),
    ("multiclass", 3, "softmax", "argmax"),
])
def test_other_tasks_in_process(tmp_path, monkeypatch, task, k, head, rule_type):
    from models.registry import build_model
    from training import experiment

    rng = np.random.default_rng(0)
    for split in ("val", "test"):
        labels = (rng.random((16, k)) < 0.5).astype(int) if task == "multilabel" \
            else np.arange(16) % k
        _write_split(str(tmp_path), split, labels, rng)
    names = [f"c{i}" for i in range(k)]
    info = {"task": task, "num_classes": k, "class_names": names}
    config = {"task": task, "head": head, "data_dir": str(tmp_path), "batch_size": 8,
              "image_size": 32}
    model = build_model("resnetv2_lite", task, k, 32, widths=(8,))
    monkeypatch.setattr(experiment, "build_from_config", lambda w: (model, info, config))

    path = run.evaluate(str(tmp_path / "w"), n_boot=10, gradcam_per_kind=1)
    eval_dir = tmp_path / "w" / "eval"
    assert path == eval_dir / "report.html" and path.is_file()
    m = json.loads((eval_dir / "metrics.json").read_text())
    assert m["task"] == task and m["num_examples"] == 16 and m["num_patients"] == 8
    assert set(m["confidence_intervals"]) == set(m["headline"])
    assert json.loads((eval_dir / "thresholds.json").read_text())["decision"]["type"] == rule_type
    with open(eval_dir / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and rows[3]["patient_id"] == "p1"
    assert ("pred_c2" in rows[0]) == (task == "multilabel")


# ------------------------------------------------- external validation, served = evaluated

def _relative_copy(workdir, tmp_path):
    """W and its data under one project dir, the stored data_dir made relative to it (as
    `make demo` stores it); W/eval/ left out."""
    project = tmp_path / "project"
    w = project / "runs" / "w"
    shutil.copytree(workdir, w, ignore=shutil.ignore_patterns("eval", "tensorboard"))
    config = (w / "operative_config.gin").read_text()
    data_dir = re.search(r"train.data_dir = '([^']+)'", config).group(1)
    shutil.copytree(data_dir, project / "data")
    (w / "operative_config.gin").write_text(config.replace(data_dir, "data"))
    return w


def test_external_validation_from_another_directory(workdir, tmp_path, monkeypatch):
    w = _relative_copy(workdir, tmp_path)
    external = write_shards(str(tmp_path / "aptos_like"), counts={"test": 20}, seed=5)
    monkeypatch.chdir(tmp_path)  # neither the project dir nor the repo

    path = run.evaluate(str(w), "test", external, n_boot=20, gradcam_per_kind=1)
    out = w / "eval" / "external" / "aptos_like"
    assert path == out / "report.html" and path.is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["external"] is True and m["split"] == "test" and m["num_examples"] == 20
    assert m["data_dir"] == external and m["ci_unit"] == "image" and m["num_patients"] is None
    # Tuned on W's own val split (found through the relative path), never on the external set.
    own = str(tmp_path / "project" / "data")
    assert m["decision_origin"].startswith(f"tuned on the validation split of {own}")
    served = json.loads((w / "eval" / "thresholds.json").read_text())
    assert served["tuned_on"] == "val" and served["data_dir"] == own
    assert served["tta"] is False
    assert json.loads((out / "thresholds.json").read_text())["decision"] == served["decision"]
    assert not (w / "eval" / "metrics.json").exists()  # W's own evaluation left alone
    page = path.read_text()
    assert "external validation" in page and "image-level bootstrap" in page

    # A served rule is applied as it is: cut-points below any expected grade -> all grade 4.
    served["decision"]["cutpoints"] = [-4.0, -3.0, -2.0, -1.0]
    (w / "eval" / "thresholds.json").write_text(json.dumps(served))
    run.evaluate(str(w), "test", external, n_boot=0, gradcam_per_kind=0)
    with open(out / "predictions_test.csv") as f:
        assert {r["prediction"] for r in csv.DictReader(f)} == {"4"}
    m = json.loads((out / "metrics.json").read_text())
    assert m["decision_origin"].startswith(f"read from {w / 'eval' / 'thresholds.json'}")
    with pytest.raises(ValueError, match="tuned with tta=False"):
        run.evaluate(str(w), "test", external, tta=True, n_boot=0)


@pytest.mark.parametrize("change,message", [
    ({"class_names": ["0", "1", "2", "3", "X"]}, r"5 classes \['0', '1', '2', '3', 'X'\], the "
                                                  r"model has 5"),
    ({"class_names": ["0", "1"], "num_classes": 2}, "2 classes"),
    ({"task": "multiclass"}, "task 'multiclass', the model's is 'dr_grade'"),
    ({"preprocessing": {"crop": "none"}}, "prepared differently.*crop: model 'fundus' vs 'none'"),
])
def test_external_data_must_match_the_model(tmp_path, monkeypatch, change, message):
    from training import experiment

    info = {"task": "dr_grade", "num_classes": 5, "class_names": list("01234"),
            "image_size": 32, "preprocessing": {"crop": "fundus"}}
    config = {"task": "dr_grade", "head": "coral", "data_dir": str(tmp_path / "own"),
              "image_size": 32, "batch_size": 8}
    monkeypatch.setattr(experiment, "build_from_config", lambda w: (None, info, config))
    ext = tmp_path / "ext"
    ext.mkdir()
    (ext / "dataset.json").write_text(json.dumps({**info, **change}))
    with pytest.raises(ValueError, match=message):
        run.evaluate(str(tmp_path / "w"), "test", str(ext))
    with pytest.raises(FileNotFoundError, match="must be a prepare.py output"):
        run.evaluate(str(tmp_path / "w"), "test", str(tmp_path))


def test_export_graph_reproduces_evaluate_with_tta(evaluated, workdir):
    """The served graph (TTA from thresholds.json) on the evaluated images gives
    predictions_test.csv's decisions and probabilities."""
    import tensorflow as tf

    from serving import exporting
    from training import experiment

    model, spec, _ = exporting.load_workdir(workdir)
    assert spec.tta is True
    _, info, config = experiment.build_from_config(str(workdir))
    graph = tf.function(exporting.tensor_fn(model, spec))
    probs, grades = [], []
    for batch in run._dataset(config["data_dir"], "test", config, info):
        out = graph(batch["image"])
        probs.append(out["probabilities"].numpy())
        grades.append(out["grade"].numpy())
    with open(evaluated[0] / "predictions_test.csv") as f:
        rows = list(csv.DictReader(f))
    np.testing.assert_array_equal(np.concatenate(grades), [int(r["prediction"]) for r in rows])
    want = np.array([[float(r[f"p_{k}"]) for k in range(5)] for r in rows])
    np.testing.assert_allclose(np.concatenate(probs), want, atol=2e-6)
