"""Issue 9, train / evaluate / export: refusals and recoveries, in process and fast.

Faults are injected from the test side (a callback appended to Model.fit, a wrapped
saving_lib.save_weights_only, a flipped byte in a shard); the code under test is
unchanged. Kill -9 and full-CLI runs live in tests/reliability/scenarios_train.py.
"""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import keras
import numpy as np
import pytest

from tests.test_train import DEBUG_GIN, _history, write_shards

FAST = ("train.epochs = 2", "train.steps_per_epoch = 2")
REPO = pathlib.Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """Raised by the injected callback: stands for a crash in the middle of an epoch."""


def _train(workdir, data_dir, *bindings, resume=False, allow_changes=False):
    from training import config, experiment

    gin.clear_config()
    config.parse([DEBUG_GIN], [f"train.data_dir = '{data_dir}'", *FAST, *bindings])
    return experiment.train(str(workdir), resume=resume, allow_changes=allow_changes)


def _inject_callback(monkeypatch, callback):
    """Every Model.fit call gets `callback` appended (it runs after fundusflow's)."""
    fit = keras.Model.fit

    def fit_with(self, *args, **kwargs):
        kwargs["callbacks"] = list(kwargs.get("callbacks") or []) + [callback]
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", fit_with)


class _CrashAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._epoch == self.epoch:
            raise Interrupted(f"epoch {self.epoch}")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_shards(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("done") / "w"
    _train(workdir, data_dir, "train.epochs = 1")
    return workdir


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, data_dir):
    """A run that crashed in epoch 1 (0-based): the backup holds epoch 0."""
    workdir = tmp_path_factory.mktemp("crashed") / "w"
    with pytest.MonkeyPatch.context() as m:
        _inject_callback(m, _CrashAt(1))
        with pytest.raises(Interrupted):
            _train(workdir, data_dir)
    return workdir


def _copy(workdir, dst):
    shutil.copytree(workdir, dst)
    return dst


def _read(path) -> bytes:
    return pathlib.Path(path).read_bytes()


# ----------------------------------------------------------------------------- resume


def test_resume_with_a_changed_plan_is_refused_naming_each_binding(tmp_path, data_dir,
                                                                   interrupted):
    from training import experiment

    workdir = _copy(interrupted, tmp_path / "w")
    before = {p: _read(p) for p in workdir.rglob("*") if p.is_file()}
    other = write_shards(str(tmp_path / "other"), seed=1)
    with pytest.raises(experiment.PlanChangedError) as e:
        _train(workdir, other, "train.learning_rate = 0.5", "train.batch_size = 4",
               "resnetv2_lite.widths = (4, 8)", resume=True)
    msg = str(e.value).splitlines()[0]
    for part in ("train.learning_rate: 0.01 -> 0.5", "train.batch_size: 8 -> 4",
                 "resnetv2_lite.widths: (8, 16) -> (4, 8)",
                 f"train.data_dir: '{data_dir}' -> '{other}'", "--resume_with_changes"):
        assert part in msg
    assert "dataset.json" not in msg  # same examples in both: only the path differs
    after = {p: _read(p) for p in workdir.rglob("*") if p.is_file()}
    assert after == before  # refused before anything was touched
    # Same plan, spelled differently (a default made explicit): accepted and finished.
    summary = _train(workdir, data_dir, "train.dropout = 0.0", resume=True)
    assert summary["resumed"] is True
    assert [int(r["epoch"]) for r in _history(workdir)] == [0, 1]
    assert _read(workdir / "config.gin") == before[workdir / "config.gin"]
    assert _read(workdir / "operative_config.gin") == before[workdir / "operative_config.gin"]


def test_resume_with_changes_appends_them_to_the_record(tmp_path, data_dir, interrupted):
    from training import config

    workdir = _copy(interrupted, tmp_path / "w")
    config_gin, operative = _read(workdir / "config.gin"), _read(workdir / "operative_config.gin")
    summary = _train(workdir, data_dir, "train.learning_rate = 0.002", resume=True,
                     allow_changes=True)
    assert summary["resumed"] is True and summary["epochs_run"] == 2
    for name, original in (("config.gin", config_gin), ("operative_config.gin", operative)):
        text = _read(workdir / name)
        assert text.startswith(original), name  # what was trained is still there
        tail = text[len(original):].decode()
        assert "--resume_with_changes" in tail and "after epoch 1" in tail
        assert "train.learning_rate = 0.002  # was 0.01" in tail
        assert config.bindings_of(text.decode())["train.learning_rate"] == 0.002  # last wins
    log = json.loads((workdir / "resume_log.json").read_text())
    assert [(e["after_epoch"], e["changes"]) for e in log] == [
        (1, {"train.learning_rate": {"old": "0.01", "new": "0.002"}})]
    # A later plain --resume with the changed config is not a change any more.
    assert _train(workdir, data_dir, "train.learning_rate = 0.002", resume=True) == summary


def test_plan_changes_compares_values_with_defaults_filled_in():
    from training import config, experiment  # noqa: F401  (registers the configurables)

    old = "train.data_dir = 'd'\ntrain.epochs = 3\n"
    assert config.plan_changes(old, old + "train.dropout = 0.0\ntrain.epochs = 3\n") == {}
    assert config.plan_changes(old, old + "train.model = 'resnet50v2'\n") == {
        "train.model": ("resnetv2_lite", "resnet50v2")}
    assert config.plan_changes(old, "train.epochs = 3\n") == {
        "train.data_dir": ("d", config.UNSET)}
    assert config.plan_changes(old, old + "train.verbose = 1\n", ignore=("train.verbose",)) == {}


# ----------------------------------------------------------------------------- failed starts


BAD_STARTS = [
    ("train.model = 'resnet_nope'", "Unknown model 'resnet_nope'"),
    ("train.head = 'sigmoid'", "does not fit task 'dr_grade'"),
    ("train.loss = 'nope'", "nope"),
    ("resnetv2_lite.widths = 'abc'", "."),
    ("train.precision = 'float8'", "precision must be one of"),
    ("train.class_weight = 'some'", "class_weight must be"),
    ("train.monitor = 'val_nope'", "val_nope"),  # found only when the first epoch ends
]


def test_failed_start_leaves_no_workdir_and_the_corrected_command_works(tmp_path, data_dir):
    from training import experiment

    workdir = tmp_path / "w"
    for binding, error in BAD_STARTS:
        with pytest.raises((experiment.ConfigError, KeyError), match=error):
            _train(workdir, data_dir, binding)
        assert not workdir.exists(), binding
    workdir.mkdir()  # an empty workdir made beforehand is kept, and stays empty
    with pytest.raises(experiment.ConfigError):
        _train(workdir, data_dir, BAD_STARTS[0][0])
    assert list(workdir.iterdir()) == []
    summary = _train(workdir, data_dir, "train.epochs = 1")
    assert summary["epochs_run"] == 1


def test_missing_data_dir_leaves_no_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.json not found"):
        _train(tmp_path / "w", tmp_path / "no_such_data")
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- corrupt shards


def _corrupt(data_dir, dst, split, record=5) -> str:
    """A copy of `data_dir` with one byte of `split`'s record `record` flipped."""
    from input_pipeline import integrity

    shutil.copytree(data_dir, dst)
    shard = os.path.join(dst, f"{split}-00000-of-00001.tfrecord")
    offset = integrity.record_offsets(shard)[record] + 12 + 40  # inside the payload
    data = bytearray(_read(shard))
    data[offset] ^= 0xFF
    pathlib.Path(shard).write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("split", ["train", "val"])
def test_corrupt_shard_in_training_is_named_in_one_line(tmp_path, data_dir, split):
    from input_pipeline import integrity

    shard = _corrupt(data_dir, tmp_path / "data", split)
    offset = integrity.record_offsets(shard)[5]
    with pytest.raises(integrity.CorruptShardError) as e:
        _train(tmp_path / "w", tmp_path / "data")
    msg = str(e.value).splitlines()[0]  # what train.py prints; gin adds "In call to train"
    assert f"{shard}: record 5 at byte offset {offset}" in msg
    assert "5 records before it are readable" in msg
    assert not (tmp_path / "w").exists()  # val: failed in epoch 0, nothing kept


def test_corrupt_shard_in_evaluate_is_named(tmp_path, data_dir, finished):
    from evaluation import run
    from input_pipeline import integrity

    shard = _corrupt(data_dir, tmp_path / "data", "val", record=20)
    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    with pytest.raises(integrity.CorruptShardError, match=f"{shard}: record 20 at byte"):
        run.evaluate(str(workdir), "val", str(tmp_path / "data"), n_boot=0,
                     gradcam_per_kind=0)


def test_truncated_shard_is_named(tmp_path, data_dir):
    from input_pipeline import integrity

    shutil.copytree(data_dir, tmp_path / "d")
    shard = tmp_path / "d" / "val-00000-of-00001.tfrecord"
    offsets = integrity.record_offsets(str(shard))
    shard.write_bytes(_read(shard)[: offsets[7] + 30])  # cut inside record 7
    assert integrity.find_corrupt_record(str(shard)).startswith(
        f"record 7 at byte offset {offsets[7]}")
    assert integrity.find_corrupt_record(os.path.join(data_dir, "val-00000-of-00001.tfrecord")) \
        is None


# ----------------------------------------------------------------------------- workdir files


@pytest.mark.parametrize("missing, hint", [
    ("checkpoints/best.weights.h5", "model.keras is there"),
    ("operative_config.gin", "stopped before its first training step"),
    ("dataset.json", "copy the dataset.json"),
])
def test_missing_workdir_file_is_named_with_what_to_do(tmp_path, finished, missing, hint):
    from serving import exporting, predicting
    from training import experiment

    workdir = tmp_path / "w"
    shutil.copytree(finished, workdir)
    (workdir / missing).unlink()
    for load in (experiment.build_from_config, exporting.load_workdir, predicting.from_workdir):
        with pytest.raises(FileNotFoundError) as e:
            load(str(workdir))
        msg = str(e.value)
        assert msg.startswith(str(workdir / missing)) and hint in msg and "\n" not in msg


def test_export_version_must_be_a_positive_integer(tmp_path):
    from serving import exporting

    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="positive integer"):
            exporting.version_dir(tmp_path, bad)
    assert exporting.version_dir(tmp_path, 3) == tmp_path / "3"
    done = subprocess.run([sys.executable, str(REPO / "export.py"), "--workdir=w",
                           f"--export_dir={tmp_path / 'e'}", "--version=-1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "flag --version=-1: -1 is not a positive integer" in done.stderr
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- checkpoints


def _tiny_model():
    x = keras.Input((2,))
    model = keras.Model(x, keras.layers.Dense(1)(x))
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 2)), np.ones((4, 1)), verbose=0)  # optimizer state exists
    return model


def _fail_nth_save(monkeypatch, n):
    """The n-th weights write is cut in half and raises ENOSPC (a full disk)."""
    from keras.src.saving import saving_lib

    save, calls = saving_lib.save_weights_only, [0]

    def save_with_fault(model, filepath, *args, **kwargs):
        calls[0] += 1
        save(model, filepath, *args, **kwargs)
        if calls[0] == n:
            with open(filepath, "r+b") as f:
                f.truncate(os.path.getsize(filepath) // 2)
            raise OSError(errno.ENOSPC, "No space left on device", filepath)

    monkeypatch.setattr(saving_lib, "save_weights_only", save_with_fault)


def test_full_disk_during_a_backup_keeps_the_previous_one(tmp_path, monkeypatch):
    from training import callbacks as cb

    model = _tiny_model()
    backup = cb.SafeBackupAndRestore(str(tmp_path), delete_checkpoint=False)
    backup.set_model(model)
    backup.on_epoch_end(0, {"loss": 1.0})
    saved = [w.copy() for w in model.get_weights()]
    _fail_nth_save(monkeypatch, 1)
    model.set_weights([w + 1 for w in saved])
    with pytest.raises(OSError, match="No space"):
        backup.on_epoch_end(1, {"loss": 0.5})
    assert sorted(os.listdir(tmp_path)) == ["epoch_001.weights.h5", "training_metadata.json"]
    assert json.loads((tmp_path / "training_metadata.json").read_text())["epoch"] == 1
    restored = cb.SafeBackupAndRestore(str(tmp_path))  # as after a restart
    restored.set_model(model)
    restored.on_train_begin()
    assert model._initial_epoch == 1
    for a, b in zip(model.get_weights(), saved, strict=True):
        np.testing.assert_array_equal(a, b)


def test_full_disk_during_best_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    from training import callbacks as cb

    model = _tiny_model()
    best = cb.BestCheckpoint(str(tmp_path), "val_qwk", "max")
    best.set_model(model)
    best.on_epoch_end(0, {"val_qwk": 0.1})
    before = _read(tmp_path / "best.weights.h5")
    _fail_nth_save(monkeypatch, 1)
    with pytest.raises(OSError, match="No space"):
        best.on_epoch_end(1, {"val_qwk": 0.9})
    assert _read(tmp_path / "best.weights.h5") == before
    assert sorted(os.listdir(tmp_path)) == ["best.json", "best.weights.h5"]  # no temp left
    cb.load_weights_model_only(_tiny_model(), str(tmp_path / "best.weights.h5"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    class Poison(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                for v in self.model.trainable_variables:
                    v.assign(np.full(v.shape, np.nan, v.dtype))

    _inject_callback(monkeypatch, Poison())
    workdir = tmp_path / "w"
    summary = _train(workdir, data_dir, "train.checkpoint_every_epochs = 0")
    assert summary["terminated_on_nan"] is True and summary["best_epoch"] == 1
    assert [int(r["epoch"]) for r in _history(workdir)][0] == 0
    meta = json.loads((workdir / "backup/stage_0/training_metadata.json").read_text())
    assert meta["epoch"] == 1  # the NaN epoch was not backed up: resumable from epoch 1
    model = keras.models.load_model(workdir / "model.keras", compile=False)
    assert all(np.isfinite(w).all() for w in model.get_weights())


# ----------------------------------------------------------------------------- safety


@pytest.mark.parametrize("text", [
    "from __gin__ import dynamic_registration\nimport os\n"
    "train.data_dir = @os.system()\nos.system.command = 'touch {marker}'\n",
    "import os\ntrain.epochs = 1\n",
    "include '{other}'\n",  # the import hides in an included file
])
def test_gin_imports_are_refused_before_gin_runs_them(tmp_path, data_dir, text):
    from training import config

    marker = tmp_path / "pwned"
    (tmp_path / "other.gin").write_text("import os\nos.system.command = 'touch {marker}'\n")
    path = tmp_path / "evil.gin"
    path.write_text(text.format(marker=marker, other=tmp_path / "other.gin"))
    gin.clear_config()
    with pytest.raises(config.UnsafeConfigError, match="gin imports"):
        config.parse([str(path)], [f"train.data_dir = '{data_dir}'"])
    assert not marker.exists()


def test_foreign_configurables_are_refused(tmp_path, finished):
    from training import config, experiment

    # Registered by someone else in this process (e.g. a library's gin.external_configurable).
    gin.external_configurable(shutil.rmtree, module="shutil")
    try:
        gin.clear_config()
        with pytest.raises(config.UnsafeConfigError, match="not a fundusflow configurable"):
            config.parse([], ["shutil.rmtree.path = '/'"])
        with pytest.raises(config.UnsafeConfigError, match="not a fundusflow configurable"):
            config.parse([], ["train.data_dir = @shutil.rmtree()"])
        workdir = tmp_path / "w"
        shutil.copytree(finished, workdir)  # a workdir from someone else, edited
        with open(workdir / "operative_config.gin", "a") as f:
            f.write("\ntrain.data_dir = @rmtree()\n")
        with pytest.raises(config.UnsafeConfigError):
            experiment.build_from_config(str(workdir))
    finally:
        gin.config._REGISTRY.pop("shutil.rmtree")
    with pytest.raises(ValueError, match="No configurable matching 'os.system'"):
        config.parse([], ["os.system.command = 'ls'"])  # never registered: gin refuses


def test_every_shipped_config_passes_the_safety_check():
    from training import config, experiment  # noqa: F401

    gin_files = sorted((REPO / "configs").glob("*.gin"))
    assert gin_files
    for path in gin_files:
        config.check_file(str(path))


# the project's code: its packages and mains (not tests, nor what benchmarks fetch into
# bench_data/, a third-party package among it)
_PY = [*REPO.glob("*.py"), *[p for package in ("input_pipeline", "models", "training",
                                               "evaluation", "serving", "benchmarks")
                             for p in (REPO / package).glob("**/*.py")]]


@pytest.mark.parametrize("pattern", [
    "import pickle", "pickle.load", "cloudpickle", "dill", "joblib", "allow_pickle=True",
    "safe_mode=False", "torch.load", "marshal.loads", "shelve", "yaml.load(", "eval(",
    "exec(",
])
def test_no_unsafe_deserialisation_in_the_code(pattern):
    """No pickle of user data, Keras models loaded in safe mode (its default)."""
    assert len(_PY) > 20
    hits = [f"{p.relative_to(REPO)}:{i}" for p in _PY
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern in line]
    assert hits == []
