"""training/multistep.py: k training steps in one scanned jitted call (JAX)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from training import multistep, train_function

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per epoch of 3, for k = 4: {steps_per_epoch: (scanned calls, single-step calls)}.
# 8 steps: two scans. 6: a scan, then the epoch's last 2 steps singly (Keras' loop would
# take 4 there: 8 steps per epoch). One pass (0) over 7 batches: a scan, then the 3 left
# before the data ends.
_CALLS = {"8": (2, 0), "6": (1, 2), "0": (1, 3)}


def _jax_env(devices: int = 1) -> dict:
    # Fewer XLA passes: compiling (initializers, steps, scans) is most of these runs'
    # time on CPU and halves; both sides of every comparison run with it.
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


# experiment.train on the GPU's path (augmenting inside the step: its random state is
# carried through the scan), two LR groups and EMA, device_prefetch feeding the steps;
# 2 epochs of 6 steps. With 2 devices, "auto" is DataParallel over both.
_TRAIN = ["train.jit_compile = True", "train.device_prefetch = 2", "train.steps_per_epoch = 6",
          "train.epochs = 2", "train.augment_on = 'device'", "train.backbone_lr_factor = 0.1",
          "train.use_ema = True", "train.deterministic = True"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One JAX child (tests/multistep_run.py) for every test here: one start, not three."""
    from tests.test_train import write_shards

    folder = tmp_path_factory.mktemp("multistep")
    data_dir = write_shards(str(folder / "data"))
    out = subprocess.run([sys.executable, "-m", "tests.multistep_run", data_dir,
                          str(folder / "w"), *_TRAIN], cwd=REPO, env=_jax_env(devices=2),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _assert_same_training(one: dict, other: dict) -> None:
    # (float noise only: one step more or less, or a batch out of order, moves these
    # weights by ~1e-2)
    for w1, w4 in zip(one["weights"], other["weights"], strict=True):
        np.testing.assert_allclose(np.array(w4), np.array(w1), rtol=1e-5, atol=1e-6)
    assert other["logs"].keys() == one["logs"].keys() == {"loss", "mae"}
    for name, value in one["logs"].items():
        np.testing.assert_allclose(other["logs"][name], value, rtol=1e-5)
    # what batch callbacks (TerminateOnNaN) see: the epoch's last step's logs
    assert len(other["batch_logs"]) == len(one["batch_logs"]) == 3
    for logs1, logs4 in zip(one["batch_logs"], other["batch_logs"], strict=True):
        assert logs4.keys() == logs1.keys() == {"loss", "mae"}
        np.testing.assert_allclose([logs4[n] for n in logs1], list(logs1.values()), rtol=1e-5)


@pytest.mark.parametrize("where", ["one_device", "data_parallel"])
def test_four_steps_per_call_train_what_one_step_per_call_trains(runs, where):
    """3 epochs with steps_per_execution 4 vs 1: same weights (BatchNorm's moving
    statistics, Adam's slots carried through the scan) and final logs, whether 4 divides
    the epoch (8 steps, under DataParallel) or not (6) or the data ends mid-execution
    (one pass over 7 batches); with device_prefetch feeding it;
    under DataParallel over 2 devices, whose state shardings fit decides. The scan is
    really used: the dispatches per epoch are counted."""
    assert set(runs[where]) == ({"6", "0"} if where == "one_device" else {"8"})
    for s, by_k in runs[where].items():
        assert by_k["1"]["calls"] == {"scan": 0, "single": 0}  # k = 1: Keras' step
        assert not np.allclose(np.array(by_k["1"]["weights"][0]), 0)
        scans, singles = _CALLS[s]
        for name in [n for n in by_k if n != "1"]:
            _assert_same_training(by_k["1"], by_k[name])
            assert by_k[name]["calls"] == {"scan": 3 * scans, "single": 3 * singles}, (s, name)
    if where == "one_device":
        assert "4_prefetch" in runs[where]["6"]


def test_stackable_needs_one_structure_shape_and_dtype():
    a = (np.zeros((4, 3), "float32"), np.zeros((4, 1), "float32"))
    assert multistep._stackable([a, a])
    assert not multistep._stackable([a, (np.zeros((2, 3), "float32"), a[1])])  # short batch
    assert not multistep._stackable([a, (a[0], a[1].astype("float16"))])
    assert not multistep._stackable([a, (a[0], a[1], np.ones(4, "float32"))])  # + weights


def test_resolve_checks_a_given_count_and_on_tensorflow_one_not_dividing_the_epoch():
    assert multistep.resolve(1, 7) == 1
    assert multistep.resolve(4, 8) == 4
    with pytest.raises(ValueError, match="steps_per_execution must be >= 1"):
        multistep.resolve(0, 8)
    with pytest.raises(ValueError, match="does not divide the 6 steps per epoch"):
        multistep.resolve(4, 6)  # tests run on the TF backend


def test_resolve_default_is_one_off_an_accelerator_and_a_divisor_up_to_16_on_one(monkeypatch):
    assert multistep.resolve(None, 304) == 1  # tests run on the TF backend (CPU)
    monkeypatch.setattr(train_function, "one_jax_accelerator", lambda: True)
    # largest divisor of the epoch <= 16: 304 = 16 * 19, 100 = 10 * 10, 12 itself,
    # 51 = 3 * 17, 97 prime
    assert [multistep.resolve(None, n) for n in (304, 100, 12, 51, 97, 3)] == [16, 10, 12, 3,
                                                                              1, 3]
    assert multistep.resolve(8, 304) == 8  # a given count stays


def test_train_runs_four_steps_per_call_fed_by_device_prefetch(runs):
    """experiment.train on JAX (_TRAIN), steps_per_execution 4: each epoch a scan, then 2
    single steps; it completes, every step trained once in every group, the summary's
    images/s counts every step of each execution, and it trains what
    steps_per_execution 1 trains."""
    runs = runs["train"]
    summary, meter = runs["4"]["summary"], runs["4"]["throughput"]
    assert runs["4"]["calls"] == {"scan": 2, "single": 4}  # per epoch: 4 + 2 steps
    assert runs["1"]["calls"] == {"scan": 0, "single": 0}
    assert summary["epochs_run"] == 2 and not summary["terminated_on_nan"]
    assert summary["augment_on"] == "device" and summary["replicas"] == 2
    assert summary["optimizer_iterations"] == {"backbone": 12, "head": 12}
    assert meter["steps"] == runs["1"]["throughput"]["steps"] == 12
    assert summary["images_per_s"] == pytest.approx(12 * 8 / meter["seconds"], abs=0.01)
    want = runs["1"]["summary"]["final_metrics"]
    assert summary["final_metrics"].keys() == want.keys() and "val_loss" in want
    for name, value in want.items():
        assert summary["final_metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_tensorflow_train_refuses_a_count_not_dividing_the_epoch_before_the_workdir(tmp_path):
    import gin

    from tests.test_train import DEBUG_GIN, write_shards
    from training import experiment

    data_dir = write_shards(str(tmp_path / "data"))
    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [DEBUG_GIN], [f"train.data_dir = '{data_dir}'", "train.steps_per_epoch = 6",
                      "train.steps_per_execution = 4"])
    with pytest.raises(experiment.ConfigError, match="does not divide the 6 steps"):
        experiment.train(str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    gin.clear_config()


def test_steps_per_execution_is_not_part_of_the_resume_plan(tmp_path):
    import gin

    from training import experiment

    (tmp_path / "config.gin").write_text("train.data_dir = 'd'\ntrain.steps_per_execution = 1\n")
    gin.clear_config()
    gin.parse_config(["train.data_dir = 'd'", "train.steps_per_execution = 8"])
    assert experiment._check_resume_plan(str(tmp_path), "d", allow_changes=False) == {}
    gin.parse_config(["train.epochs = 3"])  # a change that is part of it
    assert experiment._check_resume_plan(str(tmp_path), "d", allow_changes=True) == {
        "train.epochs": (20, 3)}
    gin.clear_config()
