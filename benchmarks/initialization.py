"""Building a model on JAX: variables initialised one by one (Keras' eager way) against
all of them by one compiled program (`training.initialization.initialized_together`, which
train.py and evaluate.py use).

Each variable's initializer runs eagerly where Keras creates it; on JAX every distinct
(initializer, shape) is a small XLA program, compiled on the first start and loaded from
the persistent compilation cache on the next. Each variant builds the model (and its
AdamW's slots) in a fresh process: cold (empty cache) then warm (the cache the cold one
filled), and prints the build time and the programs compiled or loaded:

    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python -m benchmarks.initialization \
        --model=efficientnet_b3 --image_size=64

Both ways give the same values, bit for bit (tests/test_initialization.py). Measured on 2
CPU cores (JAX 0.10.2), EfficientNet-B3 64 px with AdamW (EMA), 1,540 variables: cold
15.49 s (251 programs) one by one vs 11.49 s (6) in one program, 1.35x; warm 3.13 vs
2.50 s, 1.25x. On an H200 a warm B3 start spent 4.2 s on its ~314 such programs (not yet
measured with one program).
"""

import json
import os
import sys
import time

from absl import app, flags

from benchmarks import compile_clock, fresh_process

FLAGS = flags.FLAGS  # defined under __main__


def _child() -> dict:
    import contextlib

    import jax
    import keras

    from models import build_model
    from training import compilation, initialization

    if keras.backend.backend() != "jax":
        sys.exit("initialization measures JAX programs: set KERAS_BACKEND=jax")
    compilation.enable_compilation_cache(os.path.join(FLAGS.cache_dir, FLAGS.variant))
    keras.utils.set_random_seed(0)
    together = FLAGS.variant == "together"

    def build():
        with initialization.initialized_together() if together else contextlib.nullcontext():
            model = build_model(FLAGS.model, "dr_grade", 5, FLAGS.image_size)
        optimizer = keras.optimizers.AdamW(use_ema=True)
        with initialization.initialized_together() if together else contextlib.nullcontext():
            optimizer.build(model.trainable_variables)
        variables = model.variables + optimizer.variables
        jax.block_until_ready([v.value for v in variables])
        return len(variables)

    start = time.perf_counter()
    variables, programs = compile_clock.programs_during(build)
    return {"build_s": round(time.perf_counter() - start, 3), "programs": programs,
            "variables": variables}


def _run(variant: str, start: str) -> dict:
    return fresh_process.run_variant("benchmarks.initialization", variant, start,
                                     FLAGS.cache_dir, [f"--model={FLAGS.model}",
                                                       f"--image_size={FLAGS.image_size}"])


def main(_):
    if FLAGS.variant:
        print(json.dumps(_child()))
        return
    runs = {(v, s): _run(v, s) for v in ("eager", "together") for s in ("cold", "warm")}
    print(f"## {FLAGS.model} {FLAGS.image_size}px and AdamW (EMA): building on JAX, "
          f"{runs['eager', 'cold']['variables']} variables")
    print("| start | one by one: s (programs) | one program: s (programs) | ratio |")
    print("| --- | --- | --- | --- |")
    for start in ("cold", "warm"):
        eager, together = runs["eager", start], runs["together", start]
        print(f"| {start} | {eager['build_s']:.2f} ({eager['programs']}) | "
              f"{together['build_s']:.2f} ({together['programs']}) | "
              f"{eager['build_s'] / together['build_s']:.2f}x |")


if __name__ == "__main__":
    flags.DEFINE_string("model", "efficientnet_b3", "fundusflow registry name.")
    flags.DEFINE_integer("image_size", 64, "Square input size.")
    flags.DEFINE_string("cache_dir", "/tmp/fundusflow_init_cache",
                        "Compilation caches (one folder per variant, emptied before its cold "
                        "run).")
    flags.DEFINE_string("variant", "", "Internal: eager or together, in this process.")
    app.run(main)
