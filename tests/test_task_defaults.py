"""Every task is correct by default: dr_grade, binary, multiclass and multilabel each
prepare, train (no monitor/loss/head bound), evaluate and export on tiny synthetic data;
a monitor the task never logs fails before the workdir exists; augmentation defaults
follow dataset.json's modality; training_summary.json has steady-state throughput.
"""

import json
import os

import gin
import numpy as np
import pytest

from input_pipeline import augment, synthetic
from input_pipeline.prepare import PrepareConfig, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_GIN = os.path.join(REPO, "configs", "debug.gin")
# task -> prepare options on the synthetic demo CSV (dr_grade, referable, disease columns).
TASKS = {
    "dr_grade": dict(label_columns=("dr_grade",)),
    "binary": dict(label_columns=("referable",)),
    "multiclass": dict(label_columns=("dr_grade",), class_names=("0", "1", "2", "3", "4")),
    "multilabel": dict(label_columns=("drusen", "tessellation", "cupping")),
}
EXPECTED_MONITOR = {"dr_grade": "val_qwk", "binary": "val_auc", "multiclass": "val_macro_f1",
                    "multilabel": "val_map"}


@pytest.fixture(autouse=True)
def _clean_gin():
    """Training and evaluation parse gin configs: leave none behind for other modules."""
    yield
    gin.clear_config()


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    synthetic.generate(out, num_images=40, image_size=64, seed=0)
    return out


def _prepare(raw, out_dir, task, **kw) -> str:
    cfg = PrepareConfig(labels_csv=str(raw / "labels.csv"), images_dir=str(raw),
                        out_dir=str(out_dir), task=task, image_size=40, workers=1,
                        split="0.6,0.2,0.2", **{**TASKS[task], **kw})
    run(cfg)
    return str(out_dir)


def _train(workdir, data_dir, *bindings) -> dict:
    from training import experiment

    gin.clear_config()
    gin.parse_config_files_and_bindings([DEBUG_GIN], [f"train.data_dir = '{data_dir}'",
                                                      *bindings])
    return experiment.train(str(workdir))


@pytest.mark.parametrize("task", list(TASKS))
def test_task_trains_evaluates_and_exports_with_defaults(task, raw, tmp_path):
    from evaluation import run as eval_run
    from serving import exporting

    data_dir = _prepare(raw, tmp_path / "data", task)
    summary = _train(tmp_path / "w", data_dir)
    assert summary["monitor"] == EXPECTED_MONITOR[task] and summary["task"] == task
    assert summary["best_epoch"] in (1, 2) and np.isfinite(summary["best_metric"])
    # Steady state leaves the first (compiling) epoch out: its own figure beside the overall.
    assert summary["images_per_s_steady"] > 0 and summary["images_per_s"] > 0
    report = eval_run.evaluate(str(tmp_path / "w"), "test", n_boot=10, gradcam_per_kind=1)
    assert report.exists()
    metrics = json.loads((tmp_path / "w" / "eval" / "metrics.json").read_text())
    assert metrics  # the task's metrics were computed on the test split
    out = exporting.export_workdir(str(tmp_path / "w"), str(tmp_path / "export"), 1)
    assert (out / "saved_model.pb").exists()


def test_wrong_monitor_fails_before_the_workdir_naming_what_exists(raw, tmp_path):
    data_dir = _prepare(raw, tmp_path / "data", "binary")
    with pytest.raises(ValueError, match=r"val_qwk.*binary.*available: .*val_auc"):
        _train(tmp_path / "w", data_dir, "train.monitor = 'val_qwk'")
    assert not (tmp_path / "w").exists()
    with pytest.raises(ValueError, match="tune_thresholds_each_epoch is for multilabel"):
        _train(tmp_path / "w", data_dir, "train.tune_thresholds_each_epoch = True")
    assert not (tmp_path / "w").exists()


def test_augmentation_defaults_follow_the_modality(raw, tmp_path):
    from input_pipeline import modality

    gin.clear_config()
    fundus, oct_ = (augment.config_for_modality(m) for m in ("fundus", "oct"))
    assert fundus == augment.AugmentConfig()  # fundus photographs: as before
    assert (oct_.fundus_aware, oct_.vflip, oct_.rotation_degrees) == (False, False, 10.0)
    assert (oct_.hue, oct_.saturation, oct_.hflip) == (0.0, 0.0, True)
    # A gin binding still wins over the modality's default.
    gin.parse_config(["AugmentConfig.rotation_degrees = 5.0", "AugmentConfig.hue = 0.05"])
    bound = augment.config_for_modality("oct")
    assert (bound.rotation_degrees, bound.hue, bound.vflip) == (5.0, 0.05, False)
    gin.clear_config()
    # dataset.json records it; an older one without the key falls back on its crop.
    info = json.loads(open(os.path.join(_prepare(raw, tmp_path / "d", "binary", crop="none"),
                                        "dataset.json")).read())
    assert info["modality"] == "other" and modality.modality_of(info) == "other"
    assert modality.modality_of({"preprocessing": {"crop": "fundus"}}) == "fundus"
    assert modality.modality_of({"preprocessing": {"crop": "none"}}) == "other"


def test_oct_augmentation_keeps_the_whole_b_scan():
    """The fundus mask would zero the corners (~28 % of the square) of every B-scan."""
    import tensorflow as tf

    image = tf.fill([32, 32, 3], 200.0)
    seed = tf.constant([1, 2], tf.int64)
    quiet = dict(rotation_degrees=0.0, translate=0.0, scale_range=(1.0, 1.0), brightness=0.0,
                 contrast=0.0, saturation=0.0, hue=0.0)
    gin.clear_config()
    masked = augment.augment(image, augment.AugmentConfig(**quiet), seed).numpy()
    oct_cfg = augment.AugmentConfig(**{**augment.MODALITY_DEFAULTS["oct"], **quiet})
    kept = augment.augment(image, oct_cfg, seed).numpy()
    assert (masked == 0).mean() > 0.15
    assert (kept == 200.0).all()
