"""End-to-end GPU training throughput: `train.py` itself vs its own compiled step.

Run on the GPU machine (JAX backend, tf.data on the host CPUs):

    KERAS_BACKEND=jax python3 -m benchmarks.train_e2e --model=convnext_tiny --image_size=224

One call measures one model and prints, side by side:

- input: `make_dataset` alone as `train` builds it (streamed, default augmentation),
  iterated the way Keras' JAX trainer does (numpy batches), img/s;
- step: the jitted stateless step on device-resident data
  (`benchmarks.train_throughput --framework=keras`), img/s;
- train: `train.py` (its gin defaults plus the model flags: callbacks, metrics,
  checkpoints, TensorBoard, BackupAndRestore) on prepared synthetic shards;
  steady-state img/s over epochs 2.. (training time only, synced on the device at
  each epoch's end), the GPU busy fraction over those epochs (NVML utilisation:
  the share of time a kernel was running), and the wall time from process start
  to the first finished step (the mtime of operative_config.gin, written then),
  with the start's milestones: imports done, fit entered, first and second call of
  the train function (the first traces, lowers and compiles or loads the step);
- repeat: the same `train.py` run again in a fresh workdir: the first step with
  a warm persistent compilation cache;
- ablation: `model.fit` on the same model, loss, metrics and optimizer with one
  thing toggled at a time (no metrics; a fixed batch already in host memory vs
  the pipeline; uint8 vs float32 pixels across the host-device copy; a callback
  that reads each step's logs), which gives the per-step cost breakdown.

Every measurement runs in its own process. Data: `input_pipeline.synthetic`
images prepared by `input_pipeline.prepare` into --work_dir (made once).

Measured on one H200 + 16 host cores, ConvNeXt-Tiny 224, batch 64, bf16 (ms/step):

| | before | after |
| --- | --- | --- |
| stateless step on device data | 17.9 | 17.9 |
| fit, fixed batch, float32 / uint8 pixels | 21.1 / 18.0 | - / 18.1 |
| fit, fixed batch + a per-step log read | 39.0 | (no such callback left) |
| make_dataset alone (img/s) | 2,513 (float32) | 2,995 (uint8) |
| train.py, 100-step epochs (img/s) | 35.4 (1,806) | 19.2 (3,328) |
| first finished step, cold / second start | 84 s / not cached | 85 s / 25-27 s |

With 300-step epochs a later machine ran train.py at 2,274 img/s sustained and
`fit` on a fixed device batch at 2,291 in the same run (train.py adds nothing
over Keras' own loop there); compare only figures from one run.

Then augmentation moved onto the device (`train.augment_on`, default "auto"). One run
of `--parts=input,step,train,train_host,repeat --input_variants=default,host
--epochs=3 --steps_per_epoch=200`, one H200 and 16 cores (img/s, x step):

| | ConvNeXt-Tiny 224 |
| --- | --- |
| stateless step on device data | 3,590 |
| make_dataset alone: device-augment parameters / host augmentation | 8,453 / 2,801 |
| train.py, augmenting on the device (steady / sustained) | 3,542 (0.99) / 3,540 |
| train.py, augmenting on the host CPUs | 2,611 (0.73) |
| first finished step: cold / second start | 86.1 s / 22.0 s |

EfficientNet-B3 300: step 1,720, train.py 1,675 (0.97x), second start 48.0 s.
MobileNetV3-Large 224: step 4,488, train.py 3,144 (0.70x, GPU busy 0.35: the host
side of each 14 ms step is the limit), second start 29.7 s.

A later machine (GPU0 of two H200s, 16 cores; EfficientNet-B3 on GPU1 meanwhile) ran
MobileNetV3-Large's step at 7,967 img/s (8 ms). `--parts=step,train,train_noprefetch,repeat
--epochs=3 --steps_per_epoch=200 --profile_dir=...`: train.py 2,845 img/s with
`train.device_prefetch` (GPU busy 0.32), 2,349 without (0.28), second start 3,011 and its
first step after 29.1 s. The profile of epochs 2-3 (400 steps; Python 3.12's cProfile
records every thread) per step: 3.4 ms in the jitted step's dispatch (Keras' JAX loop
passes the whole state, ~1,000 arrays), 6.0 ms of Layer.__setattr__ tracking
`model._jax_state` (since skipped by `AugmentingModel`: 0.9 ms left), 5.3 ms converting
each step's logs in Keras' callback threads (pythonify_logs, holding the GIL), ~0.5 ms
tf.data -> numpy -> device_put (on the prefetch thread).

Then several steps per dispatch became the default on one accelerator (a scan of k = 8
steps for 304-step epochs, 16 batches prefetched). One H200 + 16 cores, `--epochs=3
--steps_per_epoch=304 --parts=step,train,repeat` (img/s, x step; the B3 step from
`benchmarks.train_throughput` on the same machine):

| | step | train.py | second start | GPU busy | first step: cold / warm |
| --- | --- | --- | --- | --- | --- |
| MobileNetV3-Large 224 | 5,718 | 5,443 (0.95) | 5,723 (1.00) | 0.63 | 144.8 s / 38.5 s |
| ConvNeXt-Tiny 224 | 3,563 | 3,451 (0.97) | 3,467 (0.97) | 0.94 | 82.7 s / 30.4 s |
| EfficientNet-B3 300 | 2,058 | 1,771 (0.86) | 1,726 (0.84) | 0.87 | 183.2 s / 54.2 s |

The B3 profile then showed `Throughput` syncing the whole state at every dispatch (its
batch hook read `Callback.model`): ~16 ms of each 8-step execution, since fixed.

Those runs also had cProfile on, which (Python 3.12) slows every thread; it is now opt-in
(--cprofile). Without it, same command, another H200: ConvNeXt-Tiny step 3,560, train.py
3,453 (0.97x, GPU busy 0.95), second start's first step 39.8 s; EfficientNet-B3 train.py
1,985 (~0.96x of the 2,058 step above, busy 0.98), second start 59.2 s. Of a warm start,
the train function's first call takes most (23 s ConvNeXt, 38 s B3): tracing and lowering
the scanned step, loading it from the cache, and its first execution on the GPU.

A third H200 (16 cores), `--epochs=2 --steps_per_epoch=304`, each model's parts in one
lease (img/s, x step; second starts with JAX_LOG_COMPILES=1 for the split below):

| | step | train.py, k = 8 | k = 16 | first step: cold / warm |
| --- | --- | --- | --- | --- |
| MobileNetV3-Large 224 | 9,028 | 7,739 (0.86, busy .86) | 8,442 (0.94, busy .89) | 110.5 / 23.5 s |
| ConvNeXt-Tiny 224 | (3,560 above) | 3,495 (busy 0.96) | - | 73.2 / 22.7 s |
| EfficientNet-B3 300 | 2,053 | 1,982 (0.97, busy 0.97) | - | 168.5 / 37.8 s |

So the default's most steps per dispatch went from 8 to 16. The same B3 program, compiled
cold once more on the same machine, ran at 1,365 img/s (busy 0.98): XLA's autotuning
chose slower kernels that time, and the persistent cache keeps whatever the cold start
chose (emptying the cache folder recompiles). The warm first calls split (from JAX's
compile events; now printed by this benchmark, benchmarks/compile_clock.py): B3 trace
3.6 s, lower 0.8, cache load 4.0, then ~15 s in the first execution; py-spy --native
attached then (the probe in the session notes) put 92 % of that in cuDNN finalising
convolution plans and 77 % in NVRTC compiling their kernels, which no cache keeps across
processes. `build_model.depthwise="taps"` avoids those plans (README).

A fourth H200 (16 cores), k = 16 (the new default), `--epochs=2 --steps_per_epoch=304
--parts=step,train,repeat`:

| | step | train.py | second start | first step: cold / warm |
| --- | --- | --- | --- | --- |
| ConvNeXt-Tiny 224 | 3,585 | 3,461 (0.97, busy 0.96) | 3,476 (0.97) | 67.9 / 22.8 s |
| EfficientNet-B3 300 | 2,065 | 1,986 (0.96, busy 0.98) | 2,027 (0.98) | 171.1 / 38.7 s |

B3's warm start: imports 4.3 s, to fit 10.6 (314 small programs, 4.2 s of them), the
step's trace 3.9, lower 0.8, cache load 3.9, first execution 15.1 s. Its 26 depthwise
layers' first runs, each layer's forward and both gradients in one process, sum to 15.2 s
of cuDNN run-time compiled engines (a probe with the loss benchmarks/depthwise_layers.py
now uses; that benchmark, then timing the gradients without the forward, summed 13.0 s).

Then the variables got their initial values from one program (training/initialization.py).
Measured only on a CPU so far (2 cores, JAX; `--model=efficientnet_b3 --image_size=64
--epochs=1 --steps_per_epoch=2 --num_images=40 --prepare_size=64 --parts=train,repeat`):
to fit ran 8 programs instead of 253 and was entered after 18.7 s instead of 26.6 (cold),
8.8 s instead of 10.3 (second start). A fifth H200, `build_model.depthwise = 'taps_grad'`
(only the kernel gradients as taps), second start only (a slow host: imports 6.5 s):
1,377 img/s, first step after 51.8 s, its first execution ~11.4 s (native ~15 s).

A sixth H200 (16 cores), initial values from one program, `--epochs=2 --steps_per_epoch=304`,
B3's parts one call each (`--parts=step`, then `--parts=train,repeat`), the others
`--parts=train,repeat` (their steps from the fourth H200 above):

| | step | train.py | second start | first step: cold / warm |
| --- | --- | --- | --- | --- |
| EfficientNet-B3 300 | 2,046 | 1,968 (0.96, busy 0.97) | 2,019 (0.99) | 167.1 / 39.4 s |
| ConvNeXt-Tiny 224 | (3,585) | 3,439 (busy 0.96) | 3,453 | 83.9 / 28.0 s |
| MobileNetV3-Large 224 | (9,028) | 7,973 (busy 0.92) | 7,753 (busy 0.81) | 125.8 / 28.7 s |

B3's warm start: imports 4.3 s, to fit 9.0 (69 programs: trace 1.0, lower 1.1, load 1.3),
the step's trace 5.0, lower 0.9, cache load 4.7, first execution ~15.5 s. 60 of those 69
programs were the TensorBoard input grid's device augmentation run op by op; it is now one
program (9 before fit, measured on a CPU). `build_model.depthwise = 'taps'` with
`taps_max_input_size = 10` and `taps_strided = True`: 1,711 img/s (0.84x) and 45.9 s, 254
programs to fit (the swap read the fresh weights one initializer at a time; since fixed).
B3's first execution is cuDNN building its depthwise plans one after another (see
benchmarks/depthwise_layers.py: not shared between programs, not overlapping across
threads, and the XLA flags that avoid them make the convolutions several times slower), so
B3's warm start stays above 30 s on this stack.
"""

import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import threading
import time

_START = time.perf_counter()
_START_WALL = time.time()  # JAX's compile events carry wall-clock times

from absl import app, flags  # noqa: E402

from benchmarks.compile_clock import CompileClock  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "convnext_tiny", "fundusflow registry name.")
flags.DEFINE_integer("image_size", 224, "Model input size.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_string("precision", "mixed_bfloat16", "train.precision.")
flags.DEFINE_integer("steps_per_epoch", 300, "train.steps_per_epoch.")
flags.DEFINE_integer("epochs", 4, "train.epochs (the first one compiles).")
flags.DEFINE_integer("num_images", 800, "Synthetic images (70 % train).")
flags.DEFINE_integer("prepare_size", 256, "Side length of the prepared images.")
flags.DEFINE_string("work_dir", "/tmp/fundusflow_e2e", "Data, workdirs, caches.")
flags.DEFINE_list("parts", ["input", "step", "train", "repeat", "ablation"],
                  "What to run: input, step, train, train_host, train_noprefetch, "
                  "train_spe1, train_spe8, repeat, spy, ablation. spy: one more start of "
                  "the train part under `py-spy record --native --idle` (--spy) with "
                  "--spy_env set; its stacks (MODEL_spy.txt.gz, py-spy's raw format: "
                  "one collapsed stack and its sample count a line) and its log go to "
                  "--profile_dir.")
flags.DEFINE_list("ablation", ["fixed_nometrics", "fixed", "fixed_uint8", "fixed_sync",
                               "pipeline"], "Ablation variants (see _ABLATIONS).")
flags.DEFINE_list("input_variants", ["default"],
                  "Input-alone variants: default (as train builds it: augmentation on the "
                  "device on a GPU host), host (augmenting on the host CPUs), device "
                  "(augmentation parameters only, as on a GPU host, also on a CPU one), "
                  "cached and device_cached (those with make_dataset cache=True), noaug "
                  "(no augmentation), float32 (pixels).")
flags.DEFINE_integer("skip_steps", 100,
                     "Sustained img/s: counted from this step of each epoch to its end.")
flags.DEFINE_integer("ablation_steps", 60, "Timed steps per ablation variant.")
flags.DEFINE_multi_string("train_bindings", [], "Extra gin bindings for the train.py runs.")
flags.DEFINE_string("json_out", "", "Optional path for all results as JSON.")
flags.DEFINE_bool("cold_start", True, "Empty train.py's compilation cache before the "
                  "train part (its first start is then cold; repeat finds it warm).")
flags.DEFINE_string("profile_dir", "", "If set: the children's logs (train.py's timestamped "
                    "lines), the spy part's trace and the cProfiles of --cprofile go there.")
flags.DEFINE_list("cprofile", [], "With --profile_dir, cProfile in each train part: epochs "
                  "(epochs 2.., NAME.prof + top-40 NAME.txt), start (process start to the "
                  "second dispatch, NAME_start.*). Python 3.12's cProfile sees every thread "
                  "and slows them all: the figures of a profiled run are not the real ones.")
flags.DEFINE_string("spy", "py-spy", "The spy part's py-spy binary.")
flags.DEFINE_list("spy_env", ["JAX_LOG_COMPILES=1"], "KEY=VALUE pairs for the spy part.")
flags.DEFINE_string("part", "", "Internal: run one measurement in this process.")
flags.DEFINE_string("run_name", "run", "Internal: the train part's workdir name.")


def _data_dir() -> str:
    return os.path.join(FLAGS.work_dir, f"prepared_{FLAGS.prepare_size}")


def _make_data() -> None:
    """Synthetic images -> prepared shards, once per --work_dir and --prepare_size."""
    out = _data_dir()
    if os.path.exists(os.path.join(out, "dataset.json")):
        return
    raw = os.path.join(FLAGS.work_dir, "raw")
    py = sys.executable
    if not os.path.exists(os.path.join(raw, "labels.csv")):
        subprocess.run([py, "-m", "input_pipeline.synthetic", f"--out_dir={raw}",
                        f"--num_images={FLAGS.num_images}", "--image_size=256", "--seed=0"],
                       check=True)
    subprocess.run([py, "-m", "input_pipeline.prepare", f"--labels_csv={raw}/labels.csv",
                    f"--images_dir={raw}", f"--out_dir={out}", "--task=dr_grade",
                    "--label_column=dr_grade", f"--image_size={FLAGS.prepare_size}",
                    "--num_shards=16", f"--workers={os.cpu_count()}"], check=True)


def _train_cache() -> str:
    return os.path.join(FLAGS.work_dir, f"jax_cache_train_{FLAGS.model}")


def _train_bindings() -> list[str]:
    return [f'train.data_dir = "{_data_dir()}"', f'train.model = "{FLAGS.model}"',
            f"train.image_size = {FLAGS.image_size}", f"train.batch_size = {FLAGS.batch_size}",
            f"train.epochs = {FLAGS.epochs}", f"train.steps_per_epoch = {FLAGS.steps_per_epoch}",
            f'train.precision = "{FLAGS.precision}"', "train.jit_compile = True",
            "train.bn_recalibration_batches = 0", *FLAGS.train_bindings]


# ----------------------------------------------------------------------------- GPU busy


class GpuBusy:
    """Samples NVML's GPU utilisation (share of time a kernel ran) every 50 ms while on."""

    def __init__(self):
        self.samples, self._on, self._handle = [], False, None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # no NVML (CPU machine): report None
            return
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            if self._on:
                self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            time.sleep(0.05)

    def set(self, on: bool):
        self._on = on

    @property
    def fraction(self):
        return sum(self.samples) / len(self.samples) / 100.0 if self.samples else None


def _sync(model) -> None:
    """Waits for the device to finish every dispatched step (JAX; no-op elsewhere)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready([v.value for v in model.trainable_variables[-1:]])


def _sync_state(model) -> None:
    """Mid-epoch (JAX): waits for the step whose state Keras' JAX trainer holds."""
    import jax

    state = getattr(model, "_jax_state", None)
    if state:
        jax.block_until_ready(state["trainable_variables"][-1:])


def _epoch_recorder(base):
    """A subclass of `base` (a Callback) that records each epoch's training seconds,
    synced on the device before validation, and samples GPU busy after epoch 1.

    Also the sustained rate: from a device sync at step `--skip_steps` (so the
    batches tf.data pre-filled while the previous validation or compilation ran are
    used up) to the epoch's end. One sync per epoch: a single step's bubble.
    """

    class Recorder(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.epoch_seconds, self.sustained, self.gpu = [], [], GpuBusy()
            self.profile = cProfile.Profile()
            self.start_profile = None  # part_train's, until the second dispatch
            self.phases = {}  # seconds since process start at the first fit's milestones
            self._t = self._mark = None

        def _phase(self, name):
            self.phases.setdefault(name, round(time.perf_counter() - _START, 2))

        def _end_start_profile(self):
            if self.start_profile is not None:
                self.start_profile.disable()
                self.start_profile = None

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            self._phase("fit_begins_s")  # imports, data, model, compile, workdir done

        def on_epoch_begin(self, epoch, logs=None):
            super().on_epoch_begin(epoch, logs)
            if self.epoch_seconds:  # an epoch of one call: no second dispatch came
                self._end_start_profile()
            self.gpu.set(len(self.epoch_seconds) >= 1)
            if _profiling("epochs") and len(self.epoch_seconds) >= 1:
                self.profile.enable()
            self._t, self._mark = time.perf_counter(), None

        def on_train_batch_begin(self, batch, logs=None):
            super().on_train_batch_begin(batch, logs)
            # the first call traces, lowers and compiles (or loads) the step, then
            # dispatches it: its cost is second_call_s - first_call_s
            self._phase("first_call_s" if batch == 0 else "second_call_s")
            if batch > 0:  # the first call was compiled (or loaded) and dispatched
                self._end_start_profile()
            # >=: with steps_per_execution k, Keras calls this at steps 0, k, 2k, ...
            if self._mark is None and batch >= FLAGS.skip_steps and self._t is not None:
                _sync_state(self._model)  # not .model: on JAX that syncs the state
                self._mark = (batch, time.perf_counter())

        def _record(self):
            if self._t is not None:
                _sync(self.model)
                self.profile.disable()
                now = time.perf_counter()
                self.epoch_seconds.append(now - self._t)
                if self._mark:
                    steps = self.params["steps"] - self._mark[0]
                    self.sustained.append(steps * FLAGS.batch_size / (now - self._mark[1]))
                self.gpu.set(False)
                self._t = None

        def on_test_begin(self, logs=None):  # train's epochs: validation follows
            self._record()
            super().on_test_begin(logs)

        def on_epoch_end(self, epoch, logs=None):  # fit without validation
            self._record()
            super().on_epoch_end(epoch, logs)

    return Recorder


def _mean(values):
    return sum(values) / len(values) if values else None


def _steady(epoch_seconds: list[float], steps: int) -> float:
    later = epoch_seconds[1:]
    return len(later) * steps * FLAGS.batch_size / sum(later) if later else float("nan")


# ----------------------------------------------------------------------------- parts


def part_input() -> dict:
    """make_dataset as train builds it, consumed as numpy batches (Keras' JAX adapter);
    variants change one make_dataset argument at a time."""
    import gin

    from training import experiment

    info = experiment.load_dataset_info(_data_dir())
    out = {}
    for variant in FLAGS.input_variants:
        cache = ["make_dataset.cache = True"]
        bindings = {"default": [], "host": [], "device": [], "cached": cache,
                    "device_cached": cache,
                    "noaug": [f"AugmentConfig.{k} = {v}" for k, v in augment_off().items()],
                    "float32": []}[variant]
        with gin.unlock_config():
            gin.clear_config()
            gin.parse_config(bindings)
        if variant == "float32":  # train's datasets with float32 training pixels
            from input_pipeline import pipeline

            ds = pipeline.make_dataset(os.path.join(_data_dir(), "train-*.tfrecord"),
                                       FLAGS.batch_size, True, FLAGS.image_size, info["task"],
                                       info["num_classes"])
        else:
            ds, _, _ = experiment._build_datasets(
                    _data_dir(), info, info["task"], FLAGS.image_size, FLAGS.batch_size, 0,
                    False, None, augment_on="device" if variant.startswith("device")
                    else _augment_on(variant == "host"))
        out[variant] = _time_batches(ds)
    return out


def _augment_on(host: bool) -> str:
    """Where train.py (augment_on="auto") would augment, or "host"."""
    from input_pipeline import augment
    from training import augmenting

    return "host" if host else augmenting.resolve("auto", augment.AugmentConfig())


def augment_off() -> dict:
    """AugmentConfig fields that switch every op off."""
    return dict(rotation_degrees=0.0, scale_range=(1.0, 1.0), translate=0.0, hflip=False,
                vflip=False, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                fundus_aware=False)


def _time_batches(train_ds) -> dict:
    it = train_ds.as_numpy_iterator()
    for _ in range(20):
        batch = next(it)
    n = 100
    t0 = time.perf_counter()
    for _ in range(n):
        batch = next(it)
    seconds = time.perf_counter() - t0
    images = batch[0]["image"] if isinstance(batch[0], dict) else batch[0]
    return {"images_per_s": n * FLAGS.batch_size / seconds, "dtype": str(images.dtype)}


def part_train() -> dict:
    """train.py's main with Throughput subclassed to record per-epoch training time."""
    clock = CompileClock(_START_WALL)  # before train's imports: model building compiles too
    start_profile = cProfile.Profile()  # imports, data, model, compile: to the 2nd dispatch
    profile_start = _profiling("start")
    if profile_start:
        start_profile.enable()
    import train as train_main
    from training import callbacks as cb
    from training import experiment  # noqa: F401  (keras, TensorFlow, JAX: train's main)

    imported = round(time.perf_counter() - _START, 2)

    recorder = _epoch_recorder(cb.Throughput)
    made = []

    def throughput(*args, **kwargs):
        made.append(recorder(*args, **kwargs))
        made[-1].start_profile = start_profile if profile_start else None
        return made[-1]

    cb.Throughput = throughput
    workdir = os.path.join(FLAGS.work_dir, "runs", f"{FLAGS.model}_{FLAGS.run_name}")
    if os.path.exists(workdir):
        import shutil

        shutil.rmtree(workdir)
    gin_file = os.path.join(FLAGS.work_dir, f"e2e_{FLAGS.model}.gin")
    with open(gin_file, "w") as f:  # the given bindings on train's defaults (no demo.gin)
        f.write("\n".join(_train_bindings()) + "\n")
    FLAGS.gin_file, FLAGS.workdir = [gin_file], workdir
    if "compilation_cache_dir" in FLAGS:  # train.py's own cache, in a folder of this run
        FLAGS.compilation_cache_dir = _train_cache()
    first_step = _watch_for(os.path.join(workdir, "operative_config.gin"))
    train_main.main([])
    with open(os.path.join(workdir, "training_summary.json")) as f:
        summary = json.load(f)
    rec = made[0]
    if FLAGS.profile_dir:  # each written only if it recorded anything
        _write_profile(rec.profile, f"{FLAGS.model}_{FLAGS.run_name}")
        _write_profile(start_profile, f"{FLAGS.model}_{FLAGS.run_name}_start")
    first_step_s = first_step[0] - _START if first_step else None
    phases = {"imports_s": imported, **rec.phases}
    return {"images_per_s": _steady(rec.epoch_seconds, FLAGS.steps_per_epoch),
            "sustained_images_per_s": _mean(rec.sustained[1:]),
            "epoch_seconds": [round(s, 3) for s in rec.epoch_seconds],
            "gpu_busy": rec.gpu.fraction, "first_step_s": first_step_s,
            "start_phases": phases, "start_split": _start_split(clock, phases, first_step_s),
            "wall_s": time.perf_counter() - _START, "summary_images_per_s":
            summary["images_per_s"], "augment_on": summary.get("augment_on")}


def _start_split(clock: CompileClock, phases: dict, first_step_s: float | None) -> dict:
    """Compile-event split of the start: to fit (imports done -> fit entered: data,
    model and optimizer built, small programs compiled or loaded) and of the first call
    of the train function (-> its second call, else the first finished step: the step
    traced, lowered, compiled or loaded, then run once)."""
    return {"to_fit": clock.split(phases.get("imports_s"), phases.get("fit_begins_s")),
            "first_call": clock.split(phases.get("first_call_s"),
                                      phases.get("second_call_s", first_step_s))}


def _profiling(what: str) -> bool:
    return bool(FLAGS.profile_dir) and what in FLAGS.cprofile


def _write_profile(profile: cProfile.Profile, name: str) -> None:
    """The training thread's profile: name.prof, and name.txt with the top 40 functions by
    own time and by cumulative time."""
    if not profile.getstats():  # nothing recorded (a one-epoch run)
        return
    os.makedirs(FLAGS.profile_dir, exist_ok=True)
    profile.dump_stats(os.path.join(FLAGS.profile_dir, f"{name}.prof"))
    text = io.StringIO()
    for key in ("tottime", "cumulative"):
        pstats.Stats(profile, stream=text).sort_stats(key).print_stats(40)
    with open(os.path.join(FLAGS.profile_dir, f"{name}.txt"), "w") as f:
        f.write(text.getvalue())


def _watch_for(path: str) -> list:
    """A list that gets the perf_counter time at which `path` first exists (50 ms polls):
    train's OperativeConfigWriter writes it once the first step has finished."""
    seen = []

    def poll():
        while not os.path.exists(path):
            time.sleep(0.05)
        seen.append(time.perf_counter())

    threading.Thread(target=poll, daemon=True).start()
    return seen


# name -> (metrics, data: "fixed" | "pipeline", pixel dtype, per-step log read)
_ABLATIONS = {
    "fixed_nometrics": (False, "fixed", "float32", False),
    "fixed": (True, "fixed", "float32", False),
    "fixed_uint8": (True, "fixed", "uint8", False),
    "fixed_uint8_nometrics": (False, "fixed", "uint8", False),
    "fixed_sync": (True, "fixed", "float32", True),
    "pipeline": (True, "pipeline", "float32", False),
    "pipeline_sync": (True, "pipeline", "float32", True),
}


def part_ablation() -> dict:
    """model.fit on train's model/loss/metrics/optimizer, one thing toggled at a time."""
    import jax
    import keras
    import tensorflow as tf

    from training import compilation, experiment

    # train.py's own cache settings: after a train part its compiled step is reused
    compilation.enable_compilation_cache(_train_cache())
    info = experiment.load_dataset_info(_data_dir())
    task = info["task"]
    keras.mixed_precision.set_global_policy(FLAGS.precision)
    train_ds, _, _ = experiment._build_datasets(
        _data_dir(), info, task, FLAGS.image_size, FLAGS.batch_size, 0, False, None)
    images, labels = next(iter(train_ds))
    net = experiment._build_model(FLAGS.model, task, info["num_classes"], FLAGS.image_size,
                                  None, 0.0, None)
    head = experiment._head_of(task, None)
    loss_fn = experiment._build_loss(None, task, head, info, None, False, 10.0)
    steps = FLAGS.ablation_steps
    opt_kw = dict(learning_rate=1e-3, weight_decay=0.05, min_lr_ratio=0.01,
                  backbone_lr_factor=None, head_lr_factor=1.0, use_ema=False, clipnorm=None,
                  ema_overwrite_frequency=steps)
    stage = experiment.Stage(0, 0, 2, True, 1.0)

    class ReadLogs(keras.callbacks.Callback):  # what any batch hook costs: logs -> host
        def on_train_batch_end(self, batch, logs=None):
            pass

    out, compiled_with = {}, None
    for name in FLAGS.ablation:
        with_metrics, data, dtype, read = _ABLATIONS[name]
        if compiled_with != with_metrics:
            experiment._compile_stage(net, stage, task, info, head, loss_fn, steps, 1.0, True,
                                      opt_kw)
            if not with_metrics:
                net.compile(optimizer=net.optimizer, loss=loss_fn, jit_compile=True)
            compiled_with = with_metrics
        if data == "fixed":
            x = images.numpy().round().astype(dtype) if dtype == "uint8" else images.numpy()
            ds = tf.data.Dataset.from_tensors((x, labels.numpy())).repeat()
        else:
            ds = train_ds
        rec = _epoch_recorder(keras.callbacks.Callback)()
        cbs = [rec, ReadLogs()] if read else [rec]
        t0 = time.perf_counter()
        net.fit(ds, epochs=2, steps_per_epoch=steps, callbacks=cbs, verbose=0)
        out[name] = {"images_per_s": steps * FLAGS.batch_size / rec.epoch_seconds[1],
                     "sustained_images_per_s": _mean(rec.sustained[1:]),
                     "ms_per_step": 1000 * rec.epoch_seconds[1] / steps,
                     "first_epoch_s": rec.epoch_seconds[0], "gpu_busy": rec.gpu.fraction,
                     "wall_s": time.perf_counter() - t0}
        print(name, out[name], flush=True)
    out["device"] = str(jax.devices()[0])
    return out


# ----------------------------------------------------------------------------- driver


def _child(part: str, *extra: str, env: dict | None = None,
           wrap: tuple[str, ...] = ()) -> dict:
    """Runs one part in its own process (`env` added to its environment, its command line
    prefixed by `wrap`) and returns the JSON result it prints last."""
    args = [*wrap, sys.executable, "-m", "benchmarks.train_e2e", f"--part={part}",
            *[f"--{k}={getattr(FLAGS, k)}" for k in
              ("model", "image_size", "batch_size", "precision", "steps_per_epoch", "epochs",
               "prepare_size", "work_dir", "ablation_steps", "skip_steps", "profile_dir")],
            f"--cprofile={','.join(FLAGS.cprofile)}",
            f"--ablation={','.join(FLAGS.ablation)}",
            f"--input_variants={','.join(FLAGS.input_variants)}",
            *[f"--train_bindings={b}" for b in FLAGS.train_bindings],
            *extra]  # last: a variant's binding wins over the run's (gin: the last one)
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if FLAGS.profile_dir:  # the child's log (train.py's timestamped steps) beside its profile
        run = next((a.split("=", 1)[1] for a in extra if a.startswith("--run_name=")), "run")
        os.makedirs(FLAGS.profile_dir, exist_ok=True)
        with open(os.path.join(FLAGS.profile_dir, f"{FLAGS.model}_{part}_{run}.log"), "w") as f:
            f.write(proc.stderr)
    if proc.returncode:
        print(f"{part} failed:\n{proc.stderr[-6000:]}", flush=True)
        return {"error": proc.stderr[-2000:]}
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    result["process_s"] = time.perf_counter() - t0
    print(part, json.dumps(result), flush=True)
    return result


def _spy_output() -> str:
    return os.path.join(FLAGS.profile_dir or ".", f"{FLAGS.model}_spy.txt")


def _spy() -> tuple[str, ...]:
    """The spy part's py-spy command line: native frames, idle threads too, 20 Hz, in
    py-spy's raw format (collapsed stacks with counts; gzipped after the run: a native
    chrome trace of a whole start is hundreds of MB)."""
    os.makedirs(FLAGS.profile_dir or ".", exist_ok=True)
    return (FLAGS.spy, "record", "--native", "--idle", "--threads", "--rate", "20",
            "--format", "raw", "--output", _spy_output(), "--")


def _step() -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", "--framework=keras",
         f"--model={FLAGS.model}", f"--image_size={FLAGS.image_size}",
         f"--batch_size={FLAGS.batch_size}",
         f"--cache_dir={os.path.join(FLAGS.work_dir, 'jax_cache_step')}"],
        capture_output=True, text=True)
    if proc.returncode:
        print(f"step failed:\n{proc.stderr[-4000:]}", flush=True)
        return {"error": proc.stderr[-2000:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print("step", json.dumps(result), flush=True)
    return result


# The train part again with one binding: part -> (run name, binding, report label).
_TRAIN_VARIANTS = {
    # batches read on the training thread (Keras' own iterator)
    "train_noprefetch": ("noprefetch", "train.device_prefetch = 0",
                         "without device prefetch"),
    # steps per dispatch (training/multistep.py; the default is up to 16 on one GPU)
    "train_spe1": ("spe1", "train.steps_per_execution = 1", "one step per dispatch"),
    "train_spe8": ("spe8", "train.steps_per_execution = 8", "8 steps per dispatch"),
    "train_host": ("host", "train.augment_on = 'host'", "augmenting on the host CPUs"),
}


def _fmt(v, spec=".0f"):
    return "-" if v is None or v != v else format(v, spec)


def _report(r: dict) -> None:
    step = r.get("step", {}).get("images_per_s")
    train = r.get("train", {})
    print(f"\n## {FLAGS.model} {FLAGS.image_size}px, batch {FLAGS.batch_size}, {FLAGS.precision}")
    print("| what | img/s | x step | GPU busy |")
    print("| --- | --- | --- | --- |")
    rows = [("stateless jitted step (device data)", step, None),
            *[(f"input pipeline alone ({k})", v["images_per_s"], None)
      for k, v in r.get("input", {}).items() if isinstance(v, dict)],
            ("train.py steady state (epochs 2.., whole epochs)", train.get("images_per_s"),
             train.get("gpu_busy")),
            (f"train.py sustained (steps {FLAGS.skip_steps}.. of epochs 2..)",
             train.get("sustained_images_per_s"), None)]
    for part, (_, _, label) in _TRAIN_VARIANTS.items():
        v = r.get(part, {})
        rows.append((f"train.py {label}, steady state", v.get("images_per_s"),
                     v.get("gpu_busy")))
        rows.append((f"train.py {label}, sustained", v.get("sustained_images_per_s"), None))
    repeat = r.get("repeat", {})
    rows.append(("train.py second start, sustained", repeat.get("sustained_images_per_s"),
                 repeat.get("gpu_busy")))
    for name, v in r.get("ablation", {}).items():
        if isinstance(v, dict):
            rows.append((f"fit ablation: {name}", v["images_per_s"], v.get("gpu_busy")))
    for name, v, busy in rows:
        ratio = v / step if v and step else None
        print(f"| {name} | {_fmt(v)} | {_fmt(ratio, '.2f')} | {_fmt(busy, '.2f')} |")
    for part in ("train", "repeat", "spy"):  # where a start's time went, in s since process start
        if r.get(part, {}).get("start_phases"):
            phases = ", ".join(f"{k[:-2]} {v}" for k, v in r[part]["start_phases"].items())
            print(f"{part} start (s since process start): {phases}, first step finished "
                  f"{_fmt(r[part].get('first_step_s'), '.1f')}")
            for stretch, split in r[part].get("start_split", {}).items():
                if split:
                    print(f"  {stretch}: " + ", ".join(f"{k} {v}" for k, v in split.items()))
    print(f"first finished step: train.py {_fmt(train.get('first_step_s'), '.1f')} s, "
          f"second start {_fmt(r.get('repeat', {}).get('first_step_s'), '.1f')} s; "
          f"stateless step cold {_fmt(r.get('step', {}).get('first_step_s'), '.1f')} s")


def main(_):
    if FLAGS.part:
        fn = {"input": part_input, "train": part_train, "ablation": part_ablation}[FLAGS.part]
        print(json.dumps(fn()))
        return
    _make_data()
    if "train" in FLAGS.parts and FLAGS.cold_start:  # cold first start; "repeat" warm
        import shutil

        shutil.rmtree(_train_cache(), ignore_errors=True)
    results = {"model": FLAGS.model, "image_size": FLAGS.image_size,
               "batch_size": FLAGS.batch_size, "train_bindings": FLAGS.train_bindings}
    for part in FLAGS.parts:
        if part == "step":
            results["step"] = _step()
        elif part == "repeat":
            results["repeat"] = _child("train", "--run_name=repeat")
        elif part == "spy":
            results["spy"] = _child("train", "--run_name=spy", wrap=_spy(),
                                    env=dict(kv.split("=", 1) for kv in FLAGS.spy_env))
            if os.path.exists(_spy_output()):
                subprocess.run(["gzip", "-f", _spy_output()], check=True)
        elif part in _TRAIN_VARIANTS:
            run_name, binding, _ = _TRAIN_VARIANTS[part]
            results[part] = _child("train", f"--run_name={run_name}",
                                   f"--train_bindings={binding}")
        else:
            results[part] = _child(part)
    _report(results)
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
