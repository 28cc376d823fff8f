"""training/distribution.py: several devices train what one device trains.

The data-parallel runs use two CPU devices: JAX through
XLA_FLAGS=--xla_force_host_platform_device_count=2, TensorFlow through two logical
CPU devices (tests/distributed_run.py). Each backend runs in its own subprocess and
trains the same run twice (one device, then two), with the same global batch.
"""

import csv
import json
import os
import socket
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests import distributed_run
from tests.test_train import write_shards
from training import distribution

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 21 validation examples: the last batch of 8 (5) does not split over 2 devices.
COUNTS = {"train": 48, "val": 21}
# One residual block (stem, block, head: 5 conv/dense kernels): the runs cost compiling
# and start-up more than steps, and every compiled op counts (twice: 1 and 2 devices).
TINY = ("resnetv2_lite.widths = (8,)",)
# JAX: one compiled step (configs/debug.gin turns XLA off, which on JAX means compiling
# each op of the step on its first run and dispatching them one by one: twice the time of
# these runs). TF under a CPU strategy turns it off again (experiment._jit_under), so
# only the JAX runs bind it.
JAX_JIT = ("train.jit_compile = True",)
PARITY = ("train.deterministic = True", "train.steps_per_epoch = 6",
          "train.bn_recalibration_batches = 2", *TINY)


def _env(backend: str, **extra) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu",
           "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    if backend == "jax":
        # Compiling is most of these runs (every initializer per weight shape, the steps):
        # fewer XLA passes make the parity run ~30% faster; same maths, both sides alike.
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    env.pop("TF_CONFIG", None)
    return env


def _weights(path) -> dict:
    """{dataset path: array} of a .weights.h5 file."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def _history(workdir) -> list[dict]:
    with open(os.path.join(workdir, "history.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("data")), counts=COUNTS)


# ----------------------------------------------------------------------------- plan


def test_global_batch_must_divide_over_the_replicas():
    plan = distribution.Plan("data_parallel", num_replicas=4, num_processes=2, process_id=1)
    assert plan.per_process_batch(64) == 32 and not plan.is_chief
    assert plan.shard() == (2, 1)
    with pytest.raises(ValueError, match="batch_size=30 .* divisible by the 4 replicas"):
        plan.per_process_batch(30)
    assert distribution.Plan("none").shard() is None


def test_learning_rate_scaling():
    plan = distribution.Plan("data_parallel", num_replicas=8)
    assert distribution.scaled_learning_rate(1e-3, "none", plan) == 1e-3
    assert distribution.scaled_learning_rate(1e-3, "linear", plan) == pytest.approx(8e-3)
    with pytest.raises(ValueError, match="lr_scaling"):
        distribution.scaled_learning_rate(1e-3, "sqrt", plan)


def test_auto_on_one_cpu_is_none_and_bad_kinds_are_refused(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert distribution.setup("auto").kind == "none"  # TF, one CPU device
    with pytest.raises(ValueError, match="train.distribution must be one of"):
        distribution.setup("mirrored")
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        distribution.setup("multi_worker")


def test_each_process_reads_its_own_files(tmp_path):
    from input_pipeline import pipeline

    files = [f"f{i}" for i in range(5)]
    assert pipeline._shard_subset(files, 2, 0) == ["f0", "f2", "f4"]
    assert pipeline._shard_subset(files, 2, 1) == ["f1", "f3"]
    with pytest.raises(ValueError, match="2 shard files .* for 3 readers"):
        pipeline._shard_subset(files[:2], 3, 0)


def test_every_opening_of_the_training_data_yields_the_same_stream():
    """Keras' TF fit opens its data once more under a strategy than on one device."""
    import tensorflow as tf

    def make():
        ds = tf.data.Dataset.range(8).shuffle(8, seed=1, reshuffle_each_iteration=True)
        options = tf.data.Options()
        options.deterministic = True
        return ds.repeat().batch(4).with_options(options)

    def opening(ds):
        return np.concatenate(list(ds.take(4).as_numpy_iterator())).tolist()

    plain = make()
    assert opening(plain) != opening(plain)  # the trap: each opening reshuffles anew
    alike = distribution.each_opening_alike(make)
    first = opening(make())
    assert opening(alike) == opening(alike) == first
    assert sorted(first[:8]) == list(range(8))  # still shuffled, each element once
    assert int(alike.cardinality()) == tf.data.INFINITE_CARDINALITY
    assert alike.options().deterministic


# ----------------------------------------------------------------------------- parity


def _parity(backend, data_dir, out_dir, *bindings, **env):
    done = subprocess.run(
        [sys.executable, "-m", "tests.distributed_run", "2", "parity", data_dir, str(out_dir),
         *PARITY, *bindings], cwd=REPO, env=_env(backend, **env), capture_output=True,
        text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    one, two = out_dir / "none", out_dir / "data_parallel"
    with open(two / "training_summary.json") as f:
        summary = json.load(f)
    assert (summary["distribution"], summary["replicas"]) == ("data_parallel", 2)
    # train.deterministic turns XLA off on TensorFlow only (experiment._seed_everything)
    assert summary["jit_compile"] == (backend == "jax")
    return one, two


def _assert_same_run(one, two):
    name = "checkpoints/epoch_002.weights.h5"
    w1, w2 = _weights(one / name), _weights(two / name)
    assert w1.keys() == w2.keys() and len(w1) > 10
    kernels = [k for k in w1 if k.endswith("vars/0") and w1[k].ndim >= 2]
    assert len(kernels) >= 5
    for key in kernels:  # conv and dense kernels: float noise only
        np.testing.assert_allclose(w2[key], w1[key], atol=1e-4, rtol=1e-3, err_msg=key)
    for key in w1:
        # Biases of convolutions followed by BatchNorm have a zero true gradient: Adam's
        # normalisation turns float noise there into lr-sized steps (measured 2e-3).
        np.testing.assert_allclose(w2[key], w1[key], atol=1e-2, err_msg=key)
    h1, h2 = _history(one), _history(two)
    assert len(h1) == len(h2) == 2
    for r1, r2 in zip(h1, h2, strict=True):
        assert float(r2["loss"]) == pytest.approx(float(r1["loss"]), rel=1e-4)
        # Confusion matrices summed over the replicas: the same QWK/F1/accuracy.
        for metric in ("val_qwk", "val_macro_f1", "val_accuracy"):
            assert float(r2[metric]) == pytest.approx(float(r1[metric]), abs=1e-5), metric
    assert float(h1[-1]["val_qwk"]) > 0.3  # a trained model, not a constant prediction


def test_jax_data_parallel_over_two_devices_trains_what_one_device_trains(data_dir, tmp_path):
    one, two = _parity("jax", data_dir, tmp_path, *JAX_JIT,
                       XLA_FLAGS="--xla_force_host_platform_device_count=2")
    _assert_same_run(one, two)


def test_tf_mirrored_over_two_cpus_trains_what_one_device_trains(data_dir, tmp_path):
    one, two = _parity("tensorflow", data_dir, tmp_path)
    _assert_same_run(one, two)


def test_tf_mirrored_tuned_macro_f1_equals_one_device(tmp_path):
    # TunedMacroF1 predicts the validation split at each epoch end; under a TF strategy
    # Keras' predict_on_batch returned each batch once per replica (42 rows for 21).
    data = write_shards(str(tmp_path / "data"), counts=COUNTS, task="multilabel")
    one, two = _parity("tensorflow", data, tmp_path / "runs", "train.task = 'multilabel'",
                       "train.tune_thresholds_each_epoch = True")
    h1, h2 = _history(one), _history(two)
    assert len(h1) == len(h2) == 2
    for r1, r2 in zip(h1, h2, strict=True):
        assert float(r2["val_tuned_macro_f1"]) == pytest.approx(
            float(r1["val_tuned_macro_f1"]), abs=1e-4)


# ----------------------------------------------------------------------------- processes


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _two_shard_data(out_dir) -> str:
    """write_shards with the training split in two files (one per process)."""
    import tensorflow as tf

    data = write_shards(out_dir, counts={"train": 64, "val": 21})
    src = os.path.join(data, "train-00000-of-00001.tfrecord")
    records = list(tf.data.TFRecordDataset(src).as_numpy_iterator())
    names = [f"train-0000{i}-of-00002.tfrecord" for i in range(2)]
    for i, name in enumerate(names):
        with tf.io.TFRecordWriter(os.path.join(data, name)) as w:
            for record in records[i::2]:
                w.write(record)
    os.remove(src)
    with open(os.path.join(data, "dataset.json")) as f:
        info = json.load(f)
    info["splits"]["train"]["files"] = names
    with open(os.path.join(data, "dataset.json"), "w") as f:
        json.dump(info, f)
    return data


def _launch(backend, workdir, data_dir, scratch, *bindings, resume=False,
            stall1=None) -> list:
    """Two train.py processes of one job on localhost (one CPU device each); process 1
    stops at `stall1` ("epoch:batch", tests/distributed_run.py) if given."""
    ports = _free_ports(2)
    procs = []
    for i in range(2):
        env = _env(backend, TMPDIR=str(scratch))
        if stall1 and i == 1:
            env[distributed_run.STALL] = stall1
        args = [f"--gin_file={os.path.join(REPO, 'configs', 'debug.gin')}",
                f"--workdir={workdir}", f"--gin_bindings=train.data_dir = '{data_dir}'",
                "--gin_bindings=train.distribution = 'multi_worker'",
                # JAX: restarted, process 0 loads what it compiled before the kill
                # (process 1 compiles again: training/compilation.py)
                f"--compilation_cache_dir={scratch / 'jax_cache'}",
                *[f"--gin_bindings={b}" for b in bindings], *(["--resume"] if resume else [])]
        if backend == "jax":
            args += [f"--coordinator_address=localhost:{ports[0]}", "--num_processes=2",
                     f"--process_id={i}"]
        else:
            env["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"localhost:{p}"
                                                                  for p in ports]},
                                           "task": {"type": "worker", "index": i}})
        log = open(scratch / f"process{i}.log", "a")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed_run", "1",
                                       *args], cwd=REPO, env=env, stdout=log, stderr=log))
    return procs


def _wait(procs, scratch, timeout=900):
    for i, p in enumerate(procs):
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            rc = "timeout"
        if rc != 0:
            log = (scratch / f"process{i}.log").read_text()[-3000:]
            for q in procs:
                q.kill()
            pytest.fail(f"process {i}: {rc}\n{log}")


def _backup_epoch(workdir) -> int:
    meta = workdir / "backup" / "stage_0" / "training_metadata.json"
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_two_processes_write_one_run_and_resume_after_a_kill(backend, tmp_path):
    """A 2-process job on localhost whose process 1 is killed in epoch 2 (after the
    backup of epoch 1; until the kill it waits at batch 2 of 4, so that the kill lands
    mid-epoch however fast the steps run): both restarted with --resume continue from
    epoch 1 and leave one workdir with one set of checkpoints, the chief's."""
    import time

    data_dir, scratch = _two_shard_data(str(tmp_path / "data")), tmp_path / "scratch"
    scratch.mkdir()
    run = ("train.epochs = 2", "train.steps_per_epoch = 4", *TINY,
           *(JAX_JIT if backend == "jax" else ()))
    workdir = tmp_path / "w"
    procs = _launch(backend, workdir, data_dir, scratch, *run, stall1="1:2")
    deadline = time.time() + 900
    while _backup_epoch(workdir) < 1 and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    procs[1].kill()  # mid-epoch 2: the chief then fails or waits on its collective
    time.sleep(2)
    procs[0].kill()
    for p in procs:
        p.wait()
    done = _backup_epoch(workdir)
    assert done == 1, (scratch / "process0.log").read_text()[-3000:]
    assert not (workdir / "training_summary.json").exists()
    _wait(_launch(backend, workdir, data_dir, scratch, *run, resume=True), scratch)
    with open(workdir / "training_summary.json") as f:
        summary = json.load(f)
    assert summary["resumed"] and summary["processes"] == 2
    assert [int(r["epoch"]) for r in _history(workdir)] == [0, 1]
    with open(workdir / "resume_log.json") as f:
        assert [entry["after_epoch"] for entry in json.load(f)] == [done]
    # Exactly one set of checkpoints: the chief's; process 1 left nothing behind.
    assert sorted(os.listdir(workdir / "checkpoints")) == [
        "best.json", "best.weights.h5", "epoch_001.weights.h5", "epoch_002.weights.h5"]
    assert not list(scratch.glob("fundusflow_process*"))
