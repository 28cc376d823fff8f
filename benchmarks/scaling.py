"""Data-parallel scaling of train.py: the same run on 1 device, then on N devices of
this host, one right after the other; prints img/s of each and the ratio.

    KERAS_BACKEND=jax python -m benchmarks.scaling --devices=1,2 \\
        --model=convnext_tiny --image_size=224 --per_device_batch=64

Each point is `benchmarks.train_e2e --parts=train` (train.py itself: the real input
pipeline with default augmentation on prepared shards, callbacks, checkpoints) in a
fresh process that sees only the first n devices (GPUs: CUDA_VISIBLE_DEVICES; no GPU:
XLA_FLAGS=--xla_force_host_platform_device_count=n), with `train.distribution =
"auto"` (data_parallel when n > 1) and the global batch n * per_device_batch
(per-device work fixed: ideal scaling is n x). The input pipeline alone is measured
at the largest global batch too: when it is below n x the one-device figure, the
host CPUs cannot feed the devices.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("devices", ["1", "2"], "Device counts to run, in order.")
flags.DEFINE_string("model", "convnext_tiny", "fundusflow registry name.")
flags.DEFINE_integer("image_size", 224, "Model input size.")
flags.DEFINE_integer("per_device_batch", 64, "Batch per device (global = n x this).")
flags.DEFINE_string("precision", "mixed_bfloat16", "train.precision.")
flags.DEFINE_integer("steps_per_epoch", 300, "train.steps_per_epoch.")
flags.DEFINE_integer("epochs", 4, "train.epochs (the first one compiles; not counted).")
flags.DEFINE_integer("num_images", 800, "Synthetic images made for the run.")
flags.DEFINE_integer("prepare_size", 256, "Side length of the prepared images.")
flags.DEFINE_string("work_dir", "/tmp/fundusflow_scaling", "Data, workdirs, caches.")
flags.DEFINE_multi_string("train_bindings", [], "Extra gin bindings for train.py.")
flags.DEFINE_string("json_out", "", "Optional path for the results as JSON.")
flags.DEFINE_string("profile_dir", "", "If set: train_e2e's --profile_dir for each point "
                    "(its subfolder n<devices>).")


def _device_env(n: int) -> dict:
    """The environment of a process that sees n devices."""
    env = dict(os.environ)
    if shutil.which("nvidia-smi"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
    else:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + f" --xla_force_host_platform_device_count={n}").strip()
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _point(n: int, parts: str) -> dict:
    """benchmarks.train_e2e on n devices; its JSON results."""
    out = os.path.join(tempfile.mkdtemp(prefix="scaling_"), "result.json")
    args = [sys.executable, "-m", "benchmarks.train_e2e", f"--parts={parts}",
            f"--model={FLAGS.model}", f"--image_size={FLAGS.image_size}",
            f"--batch_size={n * FLAGS.per_device_batch}", f"--precision={FLAGS.precision}",
            f"--steps_per_epoch={FLAGS.steps_per_epoch}", f"--epochs={FLAGS.epochs}",
            f"--num_images={FLAGS.num_images}", f"--prepare_size={FLAGS.prepare_size}",
            f"--work_dir={FLAGS.work_dir}", f"--json_out={out}", "--nocold_start",
            "--train_bindings=train.distribution = 'auto'",
            *[f"--train_bindings={b}" for b in FLAGS.train_bindings],
            *([f"--profile_dir={os.path.join(FLAGS.profile_dir, f'n{n}')}"]
              if FLAGS.profile_dir else [])]
    done = subprocess.run(args, env=_device_env(n))
    if done.returncode or not os.path.exists(out):
        sys.exit(f"error: the {n}-device run failed (exit {done.returncode})")
    with open(out) as f:
        result = json.load(f)
    if "images_per_s" not in result.get("train", {}):
        sys.exit(f"error: the {n}-device train.py run failed: {result.get('train')}")
    return result


def _train_ips(result: dict) -> float:
    """train.py's steady img/s: sustained (after train_e2e's --skip_steps, batches the
    pipeline pre-filled during validation excluded) when measured, else whole epochs."""
    train = result["train"]
    sustained = train.get("sustained_images_per_s")
    return sustained if sustained and sustained == sustained else train["images_per_s"]


def _input_ips(result: dict) -> float | None:
    """The input pipeline alone, as train builds it (train_e2e's "default" variant)."""
    feed = result.get("input", {})
    return feed.get("default", feed).get("images_per_s")


def main(_):
    counts = [int(n) for n in FLAGS.devices]
    results = {}
    for n in counts:
        parts = "input,train" if n == max(counts) else "train"
        results[n] = _point(n, parts)
    base = _train_ips(results[counts[0]])
    print(f"\n## scaling: {FLAGS.model} {FLAGS.image_size}px, {FLAGS.per_device_batch} per "
          f"device, {FLAGS.precision}, train.py steady state (epochs 2..{FLAGS.epochs})")
    print(f"| devices | global batch | img/s | x {counts[0]} device(s) |")
    print("| --- | --- | --- | --- |")
    for n in counts:
        ips = _train_ips(results[n])
        print(f"| {n} | {n * FLAGS.per_device_batch} | {ips:.0f} | {ips / base:.2f} |")
    top = max(counts)
    feed = _input_ips(results[top])
    if feed:
        print(f"input pipeline alone at batch {top * FLAGS.per_device_batch}: {feed:.0f} img/s "
              f"({feed / base:.2f} x the {counts[0]}-device train.py figure)")
    ratio = _train_ips(results[top]) / base
    print(f"RATIO {top}/{counts[0]} devices: {ratio:.2f}")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"ratio": ratio, "points": results}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
