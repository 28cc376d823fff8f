"""Training throughput: fundusflow's model + loss + optimizer on JAX vs timm on PyTorch.

Run on a GPU machine with the JAX backend (tf.data stays on TF-CPU):

    KERAS_BACKEND=jax python3 -m benchmarks.train_throughput \
        --model=convnext_tiny --image_size=224 --batch_size=64

Both frameworks train on synthetic batches that already live on the device, so
the figures measure the training step itself (forward, loss, backward, AdamW
update), not the input pipeline. Printed side by side in one run: images/s for
each, their ratio, and the wall time from process start to the first finished
step (compilation included). The JAX persistent compilation cache
(--cache_dir) makes a repeat start skip XLA compilation.
"""

import json
import os
import subprocess
import sys
import time

from absl import app, flags

_START = time.perf_counter()

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "convnext_tiny", "fundusflow registry name.")
flags.DEFINE_integer("image_size", 224, "Square input size.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_integer("num_classes", 5, "Classifier width (multiclass head).")
flags.DEFINE_integer("warmup_steps", 10, "Untimed steps after the first one.")
flags.DEFINE_integer("steps", 50, "Timed steps.")
flags.DEFINE_enum("framework", "both", ["both", "keras", "timm"], "What to run.")
flags.DEFINE_enum("depthwise", "native", ["native", "taps"],
                  "Depthwise convs as cuDNN convolutions or as fused shifted multiply-adds.")
flags.DEFINE_integer("taps_max_input_size", None,
                     "With --depthwise=taps, only swap layers whose input is at most this size.")
flags.DEFINE_bool("compare_timm", True, "Also run timm's model of the same family.")
flags.DEFINE_string("cache_dir", "/tmp/jax_cache", "JAX persistent compilation cache.")
flags.DEFINE_string("json_out", "", "Optional path for the result as JSON.")

# fundusflow registry name -> timm model of the same family.
TIMM_NAMES = {
    "convnext_tiny": "convnext_tiny",
    "efficientnet_b3": "efficientnet_b3",
    "mobilenetv3_large": "mobilenetv3_large_100",
    "resnet50v2": "resnetv2_50",
    "resnetv2_lite": None,
}


def _timed_loop(step, state, steps: int, sync) -> tuple[float, object]:
    t0 = time.perf_counter()
    for _ in range(steps):
        state = step(state)
    sync(state)
    return time.perf_counter() - t0, state


def bench_keras_jax() -> dict:
    """Trains fundusflow's model with a jitted stateless step (buffers donated)."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import jax

    jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
    # Cache every compilation, also the many small ones run while variables
    # are initialised: on a repeat start they otherwise dominate.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    import keras

    import models

    phases = {"import_s": time.perf_counter() - _START}
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = models.build_model(FLAGS.model, "multiclass", FLAGS.num_classes, FLAGS.image_size,
                               depthwise=FLAGS.depthwise,
                               taps_max_input_size=FLAGS.taps_max_input_size)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.AdamW(1e-4, weight_decay=0.05)
    optimizer.build(model.trainable_variables)

    key = jax.random.PRNGKey(0)
    shape = (FLAGS.batch_size, FLAGS.image_size, FLAGS.image_size, 3)
    x = jax.random.uniform(key, shape, "float32", 0.0, 255.0)
    y = jax.random.randint(key, (FLAGS.batch_size,), 0, FLAGS.num_classes)

    def compute_loss(trainable, non_trainable, images, labels):
        logits, non_trainable = model.stateless_call(trainable, non_trainable, images,
                                                     training=True)
        return loss_fn(labels, logits), non_trainable

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    @jax.jit
    def train_step(state):
        trainable, non_trainable, opt_vars = state
        (_, non_trainable), grads = grad_fn(trainable, non_trainable, x, y)
        trainable, opt_vars = optimizer.stateless_apply(opt_vars, grads, trainable)
        return trainable, non_trainable, opt_vars

    state = ([v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables],
             [v.value for v in optimizer.variables])
    sync = lambda s: jax.block_until_ready(s)
    phases["build_s"] = time.perf_counter() - _START
    lowered = train_step.lower(state)
    phases["trace_s"] = time.perf_counter() - _START
    train_step = lowered.compile()
    phases["compile_s"] = time.perf_counter() - _START
    state = sync(train_step(state))
    first_step_s = time.perf_counter() - _START
    _, state = _timed_loop(train_step, state, FLAGS.warmup_steps, sync)
    seconds, _ = _timed_loop(train_step, state, FLAGS.steps, sync)
    return {"images_per_s": FLAGS.steps * FLAGS.batch_size / seconds,
            "first_step_s": first_step_s, "device": str(jax.devices()[0]),
            "phases_cumulative": phases}


def bench_timm() -> dict:
    """timm's model of the same family, bf16 autocast, channels_last, AdamW."""
    import timm
    import torch

    t_start = time.perf_counter()
    name = TIMM_NAMES[FLAGS.model]
    model = timm.create_model(name, pretrained=False, num_classes=FLAGS.num_classes)
    model = model.cuda().to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    shape = (FLAGS.batch_size, 3, FLAGS.image_size, FLAGS.image_size)
    x = torch.rand(shape, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, FLAGS.num_classes, (FLAGS.batch_size,), device="cuda")
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(state):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return state

    sync = lambda _: torch.cuda.synchronize()
    step(None)
    sync(None)
    first_step_s = time.perf_counter() - t_start
    _timed_loop(step, None, FLAGS.warmup_steps, sync)
    seconds, _ = _timed_loop(step, None, FLAGS.steps, sync)
    return {"images_per_s": FLAGS.steps * FLAGS.batch_size / seconds,
            "first_step_s": first_step_s, "name": name}


def _run_child(framework: str) -> dict:
    """Each framework in its own process: JAX and PyTorch don't share a GPU allocator well."""
    args = [sys.executable, "-m", "benchmarks.train_throughput", f"--framework={framework}",
            f"--model={FLAGS.model}", f"--image_size={FLAGS.image_size}",
            f"--batch_size={FLAGS.batch_size}", f"--steps={FLAGS.steps}",
            f"--warmup_steps={FLAGS.warmup_steps}", f"--cache_dir={FLAGS.cache_dir}",
            f"--depthwise={FLAGS.depthwise}"]
    if FLAGS.taps_max_input_size:
        args.append(f"--taps_max_input_size={FLAGS.taps_max_input_size}")
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{framework} benchmark failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(_):
    if FLAGS.framework == "keras":
        print(json.dumps(bench_keras_jax()))
        return
    if FLAGS.framework == "timm":
        print(json.dumps(bench_timm()))
        return
    ours = _run_child("keras")
    ours_repeat = _run_child("keras")  # warm persistent compilation cache
    result = {"model": FLAGS.model, "image_size": FLAGS.image_size,
              "batch_size": FLAGS.batch_size, "keras_jax": ours,
              "keras_jax_repeat_start": ours_repeat}
    if FLAGS.compare_timm and TIMM_NAMES.get(FLAGS.model):
        theirs = _run_child("timm")
        result["timm"] = theirs
        result["ratio"] = ours["images_per_s"] / theirs["images_per_s"]
    print("| model | size | batch | fundusflow JAX img/s | timm img/s | ratio | "
          "first step (cold / cached) s |")
    print(f"| {FLAGS.model} | {FLAGS.image_size} | {FLAGS.batch_size} | "
          f"{ours['images_per_s']:.0f} | {result.get('timm', {}).get('images_per_s', 0):.0f} | "
          f"{result.get('ratio', float('nan')):.2f} | {ours['first_step_s']:.0f} / "
          f"{ours_repeat['first_step_s']:.0f} |")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
