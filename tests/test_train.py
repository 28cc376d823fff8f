"""training/experiment.py + train.py end to end on tiny synthetic shards (32 px).

One in-process 2-epoch run (module fixture) is shared by the artefact, rebuild and
workdir tests; kill/resume and determinism run train.py in subprocesses (kill -9,
and op determinism is process-global).
"""

import csv
import json
import os
import signal
import subprocess
import sys

import cv2
import gin
import numpy as np
import pytest

from input_pipeline import features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG_GIN = os.path.join(REPO, "configs", "debug.gin")
INJECT = os.path.join(REPO, "tests", "reliability", "inject.py")  # fault injection
SIZE, K = 32, 5


def _image(label: int, rng) -> bytes:
    """A disc whose brightness grows with the grade: learnable in a few steps."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    cv2.circle(img, (SIZE // 2, SIZE // 2), SIZE // 2 - 1, (40 + 50 * label, 30, 20), -1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def write_shards(out_dir, counts={"train": 64, "val": 24}, seed=0,  # noqa: B006
                 task="dr_grade") -> str:
    """Writes {split}-00000-of-00001.tfrecord + dataset.json (K=5 grades, or 3 labels)."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    splits = {}
    k = 3 if task == "multilabel" else K
    for split, n in counts.items():
        grades = np.arange(n) % K
        # multilabel: label c present when the grade exceeds c (so it's learnable).
        labels = (grades[:, None] > np.arange(k)).astype(int) if task == "multilabel" else grades
        name = f"{split}-00000-of-00001.tfrecord"
        with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as w:
            for i, (g, y) in enumerate(zip(grades, labels, strict=True)):
                w.write(features.serialize_example(
                    _image(int(g), rng), y.tolist() if y.ndim else int(y), height=SIZE,
                    width=SIZE, source=f"{split}{i}.png"))
        c = (labels.sum(0) if labels.ndim == 2 else np.bincount(labels, minlength=k)).tolist()
        splits[split] = {"num_examples": n, "class_counts": c,
                         "class_counts_before_balance": c, "files": [name]}
    info = {"task": task, "num_classes": k, "class_names": [str(i) for i in range(k)],
            "label_columns": ["dr_grade"], "image_size": SIZE, "image_format": "png",
            "splits": splits}
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(info, f)
    return out_dir


def _history(workdir) -> list[dict]:
    with open(os.path.join(workdir, "history.csv")) as f:
        return list(csv.DictReader(f))


def _train_in_process(workdir, data_dir, *bindings, resume=False):
    from training import experiment

    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [DEBUG_GIN], [f"train.data_dir = '{data_dir}'", *bindings])
    return experiment.train(str(workdir), resume=resume)


def _train_cmd(workdir, data_dir, *bindings, resume=False) -> list[str]:
    cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--gin_file={DEBUG_GIN}",
           f"--workdir={workdir}", f"--gin_bindings=train.data_dir = '{data_dir}'"]
    cmd += [f"--gin_bindings={b}" for b in bindings]
    return cmd + (["--resume"] if resume else [])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("data")))


RUN = ("train.tensorboard = True", "train.epochs = 3", "train.deterministic = True",
       "train.freeze_backbone_epochs = 1", "train.backbone_lr_factor = 0.1",
       "train.dropout = 0.2", "train.bn_recalibration_batches = 2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    """A deterministic two-stage run: epoch 0 head only, epochs 1-2 both LR groups."""
    from tensorflow.python.framework import config as tf_config

    workdir = tmp_path_factory.mktemp("run") / "w"
    summary = _train_in_process(workdir, data_dir, *RUN)
    yield workdir, summary
    tf_config.disable_op_determinism()  # process-global: don't leak into other tests


def test_training_lowers_loss_and_writes_every_artefact(trained):
    workdir, summary = trained
    rows = _history(workdir)
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    # Fine-tuning (epochs 2-3, backbone unfrozen) lowers the loss. Across stages the
    # comparison is noise: epoch 1 trains the head alone on another data stream.
    assert float(rows[-1]["loss"]) < float(rows[1]["loss"])
    for name in ("config.gin", "operative_config.gin", "dataset.json", "model.keras",
                 "training_summary.json", "checkpoints/best.weights.h5",
                 "checkpoints/best.json", "checkpoints/epoch_001.weights.h5",
                 "checkpoints/epoch_003.weights.h5"):
        assert os.path.getsize(workdir / name) > 0, name
    assert not (workdir / "backup").exists()  # removed once training completed
    operative = (workdir / "operative_config.gin").read_text()
    assert "train.model = 'resnetv2_lite'" in operative
    assert "resnetv2_lite.widths = (8, 16)" in operative
    events = [f for _, _, fs in os.walk(workdir / "tensorboard") for f in fs if "tfevents" in f]
    assert len(events) >= 3  # train, validation, images (input grid + confusion matrices)
    assert summary["epochs_run"] == 3 and summary["resumed"] is False
    best = json.loads((workdir / "checkpoints/best.json").read_text())
    assert summary["best_epoch"] == best["best_epoch"]
    assert summary["best_metric"] == pytest.approx(max(float(r["val_qwk"]) for r in rows))
    assert summary["images_per_s"] > 0


def test_two_stages_keep_epochs_continuous_with_group_rates(trained):
    workdir, summary = trained
    rows = _history(workdir)
    # Stage 1 trains the head alone (backbone LR logged as 0), stage 2 both groups with
    # the backbone at 0.1 x the head's rate; each group's optimizer stepped every batch.
    assert float(rows[0]["lr_backbone"]) == 0.0 and float(rows[0]["lr_head"]) > 0
    assert float(rows[1]["lr_backbone"]) == pytest.approx(0.1 * float(rows[1]["lr_head"]))
    steps = 64 // 8
    assert summary["optimizer_iterations"] == {"backbone": 2 * steps, "head": 2 * steps}


def test_stages_plan():
    from training import experiment

    stages = experiment.plan_stages(5, 2, 0.1)
    assert [(s.start, s.end, s.train_backbone, s.lr_factor) for s in stages] == [
        (0, 2, False, 1.0), (2, 5, True, 0.1)]
    assert len(experiment.plan_stages(5, 0, 0.1)) == 1


def test_deterministic_runs_give_identical_history(trained, tmp_path, data_dir):
    workdir, _ = trained
    _train_in_process(tmp_path / "w", data_dir, *RUN)
    assert _history(tmp_path / "w") == _history(workdir)


def test_build_from_config_rebuilds_the_best_model(trained):
    import keras

    from training import experiment

    workdir, summary = trained
    model, info, config = experiment.build_from_config(str(workdir))
    assert config["task"] == "dr_grade" and config["head"] == "coral"
    assert config["image_size"] == SIZE and info["num_classes"] == K
    saved = keras.models.load_model(workdir / "model.keras", compile=False)
    x = np.random.default_rng(1).uniform(0, 255, (4, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), saved.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(model.get_weights(), saved.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_existing_workdir_without_resume_is_refused(trained, data_dir):
    workdir, _ = trained
    with pytest.raises(FileExistsError, match="--resume"):
        _train_in_process(workdir, data_dir)


def test_shadowed_build_model_binding_is_an_error(tmp_path, data_dir):
    for binding in ("build_model.dropout = 0.5", "make_dataset.batch_size = 4"):
        with pytest.raises(ValueError, match="train.<arg>"):
            _train_in_process(tmp_path / "w", data_dir, binding)
        assert not (tmp_path / "w").exists()  # refused before the workdir was made


def test_multilabel_run_with_pos_weight_monitors_auc(tmp_path):
    data = write_shards(str(tmp_path / "data"), task="multilabel")
    summary = _train_in_process(tmp_path / "w", data, "train.monitor = 'val_auc'",
                                "train.pos_weight = True", "train.tensorboard = True",
                                "train.epochs = 1", "train.steps_per_epoch = 2")
    assert summary["task"] == "multilabel" and summary["head"] == "sigmoid"
    assert summary["monitor"] == "val_auc" and summary["mode"] == "max"
    assert 0.0 <= summary["best_metric"] <= 1.0
    row = _history(tmp_path / "w")[0]
    assert {"val_auc", "val_map", "val_macro_f1"} <= set(row)


@pytest.mark.slow
def test_killed_run_resumes_at_the_right_epoch(tmp_path, data_dir):
    workdir = tmp_path / "w"
    # kill -9 mid-epoch 1 (batch 3), injected from outside train.py's code.
    res = subprocess.run([sys.executable, INJECT, "kill_at_batch:1:3", "--",
                          *_train_cmd(workdir, data_dir)[1:]], capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    meta = json.loads((workdir / "backup/stage_0/training_metadata.json").read_text())
    assert meta["epoch"] == 1
    assert [int(r["epoch"]) for r in _history(workdir)] == [0]

    res = subprocess.run(_train_cmd(workdir, data_dir, resume=True), capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((workdir / "training_summary.json").read_text())
    assert summary["resumed"] is True
    assert [int(r["epoch"]) for r in _history(workdir)] == [0, 1]
    # Optimizer state came back: epoch 0's 8 steps + epoch 1's 8 after the resume
    # (a fresh optimizer would report 8).
    assert summary["optimizer_iterations"] == {"adamw": 2 * 8}


# ----------------------------------------------------------------------------- unit tests


def _tiny_model():
    import keras

    x = keras.Input((2,))
    model = keras.Model(x, keras.layers.Dense(1)(x))
    model.compile(optimizer="sgd", loss="mse")
    return model


def test_best_checkpoint_skips_nan_epochs_and_persists_state(tmp_path):
    from training import callbacks as cb

    model = _tiny_model()
    ckpt = cb.BestCheckpoint(str(tmp_path), "val_qwk", "max", every_n_epochs=2)
    ckpt.set_model(model)
    ckpt.on_epoch_end(0, {"loss": 1.0, "val_qwk": 0.5})
    good = [w.copy() for w in model.get_weights()]
    stamp = os.path.getmtime(tmp_path / "best.weights.h5")
    model.set_weights([np.full_like(w, np.nan) for w in good])
    ckpt.on_epoch_end(1, {"loss": float("nan"), "val_qwk": 0.9})  # NaN: nothing written
    assert os.path.getmtime(tmp_path / "best.weights.h5") == stamp
    assert not (tmp_path / "epoch_002.weights.h5").exists()
    model.set_weights(good)
    ckpt.on_epoch_end(1, {"loss": 0.9, "val_qwk": 0.4})  # finite, not better
    assert (tmp_path / "epoch_002.weights.h5").exists()
    state = json.loads((tmp_path / "best.json").read_text())
    assert state == {"monitor": "val_qwk", "mode": "max", "best": 0.5, "best_epoch": 1,
                     "last_epoch": 2}
    resumed = cb.BestCheckpoint(str(tmp_path), "val_qwk", "max")  # as after a restart
    assert resumed.state["best"] == 0.5
    stopper = cb.ResumableEarlyStopping(resumed, stage_start=0, patience=3)
    stopper.set_model(model)
    stopper.on_train_begin()
    assert stopper.best == 0.5 and stopper.wait == 1


def test_balanced_class_weights_and_pos_weight():
    from training import experiment

    info = {"splits": {"train": {"num_examples": 100, "class_counts": [80, 20]}}}
    assert experiment._class_weights("balanced", "binary", info) == {0: 0.625, 1: 2.5}
    assert experiment._class_weights(None, "binary", info) is None
    with pytest.raises(ValueError, match="pos_weight"):
        experiment._class_weights("balanced", "multilabel", info)
    info = {"splits": {"train": {"num_examples": 100, "class_counts": [50, 1, 0]}}}
    loss = experiment._build_loss(None, "multilabel", "sigmoid", info, None, True, 10.0)
    y_true = np.array([[0, 1, 0]], "float32")
    y_pred = np.array([[0.0, 0.0, 0.0]], "float32")
    unweighted = experiment._build_loss(None, "multilabel", "sigmoid", info, None, False, 10.0)
    # Only the positive label 1 (pos_weight clamp 10) is up-weighted: (1 + 10 + 1) / 3 = 4x.
    assert float(loss(y_true, y_pred)) == pytest.approx(4 * float(unweighted(y_true, y_pred)))
