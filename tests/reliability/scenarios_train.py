"""Training faults: kill -9, a kill or a full disk mid-checkpoint, NaN loss, corrupt shards,
determinism, and hostile configs. Each runs train.py (evaluate.py, export.py) as a user
would, with the fault injected from outside by tests/reliability/inject.py.

Counted as records lost: a checkpoint on disk that does not load, and history epochs
missing, duplicated or out of order after recovery (or different between two
deterministic runs). Counted as unexpected: a run that should have finished and did
not, or one that should have stopped with a one-line error and printed a traceback.
Quick mode trains a few-thousand-parameter model at 32 px, two steps an epoch.
"""

import csv
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

from tests.reliability import Result

REPO = pathlib.Path(__file__).resolve().parents[2]
INJECT = REPO / "tests" / "reliability" / "inject.py"
DEBUG_GIN = REPO / "configs" / "debug.gin"
TIMEOUT = 600


class _Tally:
    """Counts faults, survivals, losses and surprises; notes what went wrong."""

    def __init__(self, name):
        self.name, self.faults, self.survived, self.lost, self.unexpected = name, 0, 0, 0, 0
        self.notes = []

    def check(self, ok: bool, note: str, lost: int = 0, unexpected: int = 0) -> bool:
        if not ok:
            self.lost += lost
            self.unexpected += unexpected
            self.notes.append(note)
        return ok

    def result(self, detail: str = "") -> Result:
        return Result(self.name, self.faults, self.survived, self.lost, self.unexpected,
                      "; ".join(self.notes)[:300] or detail)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2",
            "KERAS_BACKEND": "tensorflow"}


def _run(args, fault="none") -> subprocess.CompletedProcess:
    """`python tests/reliability/inject.py FAULT -- SCRIPT ARGS` from the repo root."""
    return subprocess.run([sys.executable, str(INJECT), fault, "--", *map(str, args)],
                          cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def _train_args(workdir, data_dir, *bindings, resume=False, gin_file=DEBUG_GIN):
    args = ["train.py", f"--gin_file={gin_file}", f"--workdir={workdir}",
            f"--gin_bindings=train.data_dir = '{data_dir}'"]
    args += [f"--gin_bindings={b}" for b in bindings]
    return args + (["--resume"] if resume else [])


def _shards(tmp: pathlib.Path) -> str:
    from tests.test_train import write_shards

    return write_shards(str(tmp / "data"))


def _quick(quick: bool) -> tuple:
    """Bindings: 3 epochs of 2 steps (quick) or 4 full epochs of 8 steps."""
    return (("train.epochs = 3", "train.steps_per_epoch = 2") if quick else
            ("train.epochs = 4",))


def _history(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "history.csv"
    if not path.exists():
        return []
    with open(path) as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def _one_line_error(res: subprocess.CompletedProcess, *parts) -> bool:
    """Exited non-zero with a last stderr line 'error: ...' holding `parts`, no traceback."""
    last = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
    return (res.returncode not in (0, -signal.SIGKILL) and "Traceback" not in res.stderr
            and last.startswith("error: ") and all(p in last for p in parts))


def _best_loads(workdir) -> bool | None:
    """None when there is no best checkpoint yet; else whether it loads (finite weights)."""
    import numpy as np

    from training import experiment

    workdir = pathlib.Path(workdir)
    if not (workdir / "checkpoints" / "best.weights.h5").exists():
        return None
    try:
        model, _, _ = experiment.build_from_config(str(workdir))
    except Exception:  # noqa: BLE001 - any failure to load is what we count
        return False
    return all(np.isfinite(w).all() for w in model.get_weights())


def _resume_and_check(t: _Tally, workdir, data_dir, bindings, epochs, steps, label):
    """--resume to the end: finished, epochs continuous, optimizer steps all there."""
    res = _run(_train_args(workdir, data_dir, *bindings, resume=True))
    if not t.check(res.returncode == 0, f"{label}: resume failed: "
                   f"{res.stderr.strip().splitlines()[-1:]}", unexpected=1):
        return
    t.survived += 1
    got = _history(workdir)
    t.check(got == list(range(epochs)), f"{label}: history epochs {got}",
            lost=len(set(range(epochs)) ^ set(got)) + len(got) - len(set(got)))
    summary = json.loads((pathlib.Path(workdir) / "training_summary.json").read_text())
    iterations = sum(summary["optimizer_iterations"].values())
    t.check(iterations == epochs * steps, f"{label}: {iterations} optimizer steps, "
            f"expected {epochs * steps}", lost=1)
    t.check(_best_loads(workdir) is True, f"{label}: best checkpoint does not load", lost=1)


# ----------------------------------------------------------------------------- scenarios


def train_kill_mid_epoch(tmp: pathlib.Path, quick: bool) -> Result:
    """kill -9 inside an epoch (fixed batches, and in full mode at random moments too)."""
    t = _Tally("train_kill_mid_epoch")
    data, bindings = _shards(tmp), _quick(quick)
    epochs, steps = (3, 2) if quick else (4, 8)
    points = [(1, 1)] if quick else [(0, 3), (1, 0), (2, 5)]
    for i, (epoch, batch) in enumerate(points):
        workdir = tmp / f"w{i}"
        res = _run(_train_args(workdir, data, *bindings), f"kill_at_batch:{epoch}:{batch}")
        t.faults += 1
        if not t.check(res.returncode == -signal.SIGKILL, f"epoch {epoch}: not killed "
                       f"(rc {res.returncode})", unexpected=1):
            continue
        t.check(_best_loads(workdir) is not False, f"epoch {epoch}: best does not load "
                "after the kill", lost=1)
        _resume_and_check(t, workdir, data, bindings, epochs, steps, f"kill@{epoch}:{batch}")
    if not quick:  # a real kill -9 from outside, at a random moment of a run
        rng = random.Random(0)
        for i in range(3):
            workdir = tmp / f"r{i}"
            proc = subprocess.Popen(
                [sys.executable, *map(str, _train_args(workdir, data, *bindings))], cwd=REPO,
                env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not (workdir / "history.csv").exists() and proc.poll() is None:
                time.sleep(0.05)  # wait for the first epoch, then a random delay
            time.sleep(rng.uniform(0.0, 3.0))
            t.faults += proc.poll() is None  # else it finished first: no fault injected
            proc.kill()
            proc.wait()
            t.check(_best_loads(workdir) is not False, f"random kill {i}: best does not "
                    "load", lost=1)
            _resume_and_check(t, workdir, data, bindings, epochs, steps, f"random kill {i}")
    return t.result(f"{t.faults} kills -9 mid-epoch, each resumed to the end")


def train_kill_during_checkpoint_write(tmp: pathlib.Path, quick: bool) -> Result:
    """kill -9 while a best / epoch / backup weights file is half written."""
    t = _Tally("train_kill_during_checkpoint_write")
    data, bindings = _shards(tmp), _quick(quick)
    epochs, steps = (3, 2) if quick else (4, 8)
    points = (["/backup/:2"] if quick else
              ["/best.:1", "/checkpoints/epoch_:1", "/backup/:1", "/backup/:2", "/best.:2",
               "/checkpoints/epoch_:3"])
    for i, point in enumerate(points):
        workdir = tmp / f"w{i}"
        res = _run(_train_args(workdir, data, *bindings), f"kill_in_save:{point}")
        if "inject: kill" not in res.stderr:
            continue  # that write never happened in this run (e.g. no second best)
        t.faults += 1
        t.check(res.returncode == -signal.SIGKILL, f"{point}: rc {res.returncode}",
                unexpected=1)
        t.check(_best_loads(workdir) is not False, f"{point}: best does not load", lost=1)
        _resume_and_check(t, workdir, data, bindings, epochs, steps, f"kill in {point}")
    return t.result(f"{t.faults} kills mid-write ({', '.join(points)}), each resumed")


def train_full_disk_during_checkpoint(tmp: pathlib.Path, quick: bool) -> Result:
    """ENOSPC while writing a checkpoint: one-line error, the previous one intact, resumable."""
    t = _Tally("train_full_disk_during_checkpoint")
    data, bindings = _shards(tmp), _quick(quick)
    epochs, steps = (3, 2) if quick else (4, 8)
    points = (["/backup/:2"] if quick else
              ["/backup/:2", "/checkpoints/epoch_:2", "/best.:2", "/backup/:3"])
    for i, point in enumerate(points):
        workdir = tmp / f"w{i}"
        res = _run(_train_args(workdir, data, *bindings), f"enospc_in_save:{point}")
        if "inject: enospc" not in res.stderr:
            continue
        t.faults += 1
        t.check(_one_line_error(res, "No space left on device", "--resume"),
                f"{point}: {res.stderr.strip().splitlines()[-1:]}", unexpected=1)
        t.check(not list(workdir.glob("**/*.tmp.weights.h5")), f"{point}: temp file left",
                unexpected=1)
        t.check(_best_loads(workdir) is not False, f"{point}: best does not load", lost=1)
        _resume_and_check(t, workdir, data, bindings, epochs, steps, f"ENOSPC in {point}")
    return t.result(f"{t.faults} full disks mid-write, each resumed")


def train_nan_loss(tmp: pathlib.Path, quick: bool) -> Result:
    """A NaN loss: stops with a clear message, keeps the last good checkpoint, resumes."""
    t = _Tally("train_nan_loss")
    data, bindings = _shards(tmp), _quick(quick)
    epochs, steps = (3, 2) if quick else (4, 8)
    workdir = tmp / "w"
    res = _run(_train_args(workdir, data, *bindings), "nan_after_epoch:0")
    t.faults += 1
    if t.check(_one_line_error(res, "NaN", "last good"),
               f"nan: {res.stderr.strip().splitlines()[-1:]}", unexpected=1):
        t.survived += 1
    t.check(_best_loads(workdir) is True, "nan: best missing, unloadable or NaN", lost=1)
    meta = workdir / "backup" / "stage_0" / "training_metadata.json"
    t.check(meta.exists() and json.loads(meta.read_text())["epoch"] == 1,
            "nan: backup of the last good epoch (1) not kept", lost=1)
    _resume_and_check(t, workdir, data, bindings, epochs, steps, "after NaN")
    return t.result("NaN after epoch 1: stopped, best kept, resumed")


def _corrupt_copy(src: str, dst: pathlib.Path, split: str, record: int) -> str:
    import shutil

    from input_pipeline import integrity

    shutil.copytree(src, dst)
    shard = dst / f"{split}-00000-of-00001.tfrecord"
    data = bytearray(shard.read_bytes())
    data[integrity.record_offsets(str(shard))[record] + 40] ^= 0xFF
    shard.write_bytes(bytes(data))
    return str(shard)


def train_corrupt_shard(tmp: pathlib.Path, quick: bool) -> Result:
    """A flipped byte in a shard: train.py (and evaluate.py) name it in one line."""
    t = _Tally("train_corrupt_shard")
    data = _shards(tmp)
    splits = ["train"] if quick else ["train", "val"]
    for split in splits:
        bad = tmp / f"bad_{split}"
        shard = _corrupt_copy(data, bad, split, 5)
        res = _run(_train_args(tmp / f"w_{split}", bad, *_quick(True)))
        t.faults += 1
        if t.check(_one_line_error(res, shard, "record 5 at byte offset"),
                   f"train/{split}: {res.stderr.strip().splitlines()[-1:]}", unexpected=1):
            t.survived += 1
        t.check(not (tmp / f"w_{split}").exists(), f"train/{split}: workdir left behind",
                unexpected=1)
    if not quick:
        workdir = tmp / "done"
        res = _run(_train_args(workdir, data, "train.epochs = 1"))
        bad = tmp / "bad_eval"
        shard = _corrupt_copy(data, bad, "val", 3)
        res = _run(["evaluate.py", f"--workdir={workdir}", "--split=val", f"--data_dir={bad}",
                    "--n_boot=0", "--gradcam_per_kind=0"])
        t.faults += 1
        if t.check(_one_line_error(res, shard, "record 3"),
                   f"evaluate: {res.stderr.strip().splitlines()[-1:]}", unexpected=1):
            t.survived += 1
    return t.result(f"corrupt record named in one line ({t.faults} runs)")


def train_missing_workdir_files(tmp: pathlib.Path, quick: bool) -> Result:
    """evaluate / export / predict on a workdir missing a file: one line naming it."""
    import shutil

    t = _Tally("train_missing_workdir_files")
    data = _shards(tmp)
    done = tmp / "done"
    res = _run(_train_args(done, data, "train.epochs = 1", "train.steps_per_epoch = 2"))
    if not t.check(res.returncode == 0, "training failed", unexpected=1):
        return t.result()
    image = tmp / "x.png"
    import cv2
    import numpy as np

    cv2.imwrite(str(image), np.full((32, 32, 3), 90, np.uint8))
    missing = ["checkpoints/best.weights.h5"] if quick else [
        "checkpoints/best.weights.h5", "operative_config.gin", "dataset.json"]
    tools = ([["export.py", "--export_dir={e}"]] if quick else
             [["export.py", "--export_dir={e}"], ["evaluate.py", "--split=val"],
              ["predict.py", "--out={e}.csv", str(image)]])
    for i, name in enumerate(missing):
        workdir = tmp / f"w{i}"
        shutil.copytree(done, workdir)
        (workdir / name).unlink()
        for tool in tools:
            args = [tool[0], f"--workdir={workdir}", *(a.format(e=tmp / f"e{i}")
                                                       for a in tool[1:])]
            res = _run(args)
            t.faults += 1
            if t.check(_one_line_error(res, str(workdir / name)),
                       f"{tool[0]} without {name}: {res.stderr.strip().splitlines()[-1:]}",
                       unexpected=1):
                t.survived += 1
    return t.result(f"{t.faults} runs on incomplete workdirs, each one line")


def train_deterministic(tmp: pathlib.Path, quick: bool) -> Result:
    """Two train.deterministic=True CPU runs of the demo config: identical history."""
    t = _Tally("train_deterministic")
    raw, prepared = tmp / "raw", tmp / "prepared"
    n, size, model_size = (60, 64, 32) if quick else (800, 256, 128)
    steps = [[sys.executable, "-m", "input_pipeline.synthetic", f"--out_dir={raw}",
              f"--num_images={n}", f"--image_size={size}", "--seed=0"],
             [sys.executable, "-m", "input_pipeline.prepare",
              f"--labels_csv={raw / 'labels.csv'}", f"--images_dir={raw}",
              f"--out_dir={prepared}", "--task=dr_grade", "--label_column=dr_grade",
              f"--image_size={model_size}", "--num_shards=4", "--workers=2"]]
    for cmd in steps:
        res = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                             timeout=TIMEOUT)
        if not t.check(res.returncode == 0, f"data: {res.stderr[-300:]}", unexpected=1):
            return t.result()
    bindings = ["train.deterministic = True", "train.tensorboard = False"]
    if quick:
        bindings += ["train.image_size = 32", "train.epochs = 2", "train.batch_size = 8",
                     "train.bn_recalibration_batches = 2", "resnetv2_lite.widths = (8, 16)"]
    else:
        bindings += ["train.epochs = 3"]
    histories = []
    for i in range(2):
        workdir = tmp / f"w{i}"
        res = _run(_train_args(workdir, prepared, *bindings, gin_file=REPO / "configs" /
                               "demo.gin"))  # no fault: the runs must simply agree
        if t.check(res.returncode == 0, f"run {i}: {res.stderr.strip()[-300:]}",
                   unexpected=1):
            t.survived += 1
            histories.append((workdir / "history.csv").read_text().splitlines())
    if len(histories) == 2:
        a, b = histories
        differing = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
        t.check(differing == 0, f"{differing} history rows differ", lost=differing)
    return t.result(f"2 runs, {len(histories[0]) - 1 if histories else 0} epochs, "
                    "history.csv identical")


_EVIL = ("from __gin__ import dynamic_registration\nimport os\n"
         "train.data_dir = @os.system()\nos.system.command = 'touch {marker}'\n")


def train_hostile_configs(tmp: pathlib.Path, quick: bool) -> Result:
    """gin files that import and call os.system, in train.py and in a workdir: refused."""
    import shutil

    t = _Tally("train_hostile_configs")
    marker = tmp / "pwned"
    evil = tmp / "evil.gin"
    evil.write_text(_EVIL.format(marker=marker))
    res = _run(["train.py", f"--gin_file={DEBUG_GIN}", f"--gin_file={evil}",
                f"--workdir={tmp / 'w'}"])
    t.faults += 1
    if t.check(_one_line_error(res, "gin imports") and not marker.exists()
               and not (tmp / "w").exists(), f"train.py: {res.stderr[-300:]}",
               unexpected=1):
        t.survived += 1
    res = _run(["train.py", f"--gin_file={DEBUG_GIN}", "--gin_bindings=os.system.command='x'",
                f"--workdir={tmp / 'w'}"])
    t.faults += 1
    if t.check(res.returncode != 0 and "Traceback" not in res.stderr
               and "No configurable matching 'os.system'" in res.stderr,
               f"foreign binding: {res.stderr[-300:]}", unexpected=1):
        t.survived += 1
    if not quick:  # a workdir whose operative_config.gin was edited to run a command
        data = _shards(tmp)
        done = tmp / "done"
        _run(_train_args(done, data, "train.epochs = 1", "train.steps_per_epoch = 2"))
        workdir = tmp / "edited"
        shutil.copytree(done, workdir)
        with open(workdir / "operative_config.gin", "a") as f:
            f.write("\n" + _EVIL.format(marker=marker))
        for tool in (["evaluate.py", "--split=val"], ["export.py", f"--export_dir={tmp / 'e'}"]):
            res = _run([tool[0], f"--workdir={workdir}", *tool[1:]])
            t.faults += 1
            if t.check(res.returncode != 0 and not marker.exists()
                       and "gin imports" in res.stderr, f"{tool[0]}: {res.stderr[-300:]}",
                       unexpected=1):
                t.survived += 1
    return t.result(f"{t.faults} hostile configs refused, nothing executed")


SCENARIOS = [train_kill_mid_epoch, train_kill_during_checkpoint_write,
             train_full_disk_during_checkpoint, train_nan_loss, train_corrupt_shard,
             train_missing_workdir_files, train_deterministic, train_hostile_configs]
