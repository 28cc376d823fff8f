"""Each depthwise convolution of a backbone, cuDNN against shifted multiply-adds (taps).

On an H200 a warm start of EfficientNet-B3's training (compiled program loaded from the
persistent cache) spends ~15 s in the program's first execution, and py-spy put 92 % of
it in cuDNN finalising convolution plans, 77 % in NVRTC compiling the kernels of cuDNN's
run-time-compiled engines: nothing caches those across processes. `build_model(
depthwise="taps", taps_max_input_size=T)` computes the depthwise convolutions whose input
is at most T pixels across as k*k fused multiply-adds instead (models/layers.py), which
XLA compiles and caches itself, but at some cost in step time. This benchmark measures,
per distinct depthwise layer of the backbone (its input, kernel, stride), the forward and
both backward convolutions (one jitted gradient, the training dtype) in two fresh
processes per variant, cold (empty cache) and warm (cache filled by the cold one); the
variants are native (DepthwiseConv2D), taps, taps_grad (TapGradDepthwiseConv2D: cuDNN's
forward and data gradient, the kernel gradient as taps), float32 (DepthwiseConv2D
computing in float32: cuDNN's float32 engines) and fwd, dx, dk (native, differentiating
nothing, only x, only the kernel: what each convolution's plan costs):

- `first_s`: the warm process's first execution of the loaded program (cuDNN's plan
  building is here; what a warm train.py start pays per layer);
- `step_ms`: the steady time of one execution;
- `engines`: the cuDNN engines XLA's autotuning chose for the layer (errata tags such as
  `ConvFwd_eng5`; only on a GPU);

then, for each threshold T, the totals over the backbone's layers (a shape counted once
per layer that has it) when the layers with input <= T use taps, and when exactly the
layers whose taps step is no slower do. JAX backend only:

    KERAS_BACKEND=jax python3 -m benchmarks.depthwise_layers --model=efficientnet_b3 \
        --image_size=300 --batch_size=64

Measured on an H200 (jaxlib 0.11.2, bf16, batch 64): XLA's autotuning gives every B3
depthwise layer cuDNN engines 5 (ConvFwd; XLA runs the data gradient as one too) and 16
(ConvBwdFilter), both compiled at run time: 0.39-0.76 s per layer and process, 15.2 s over
B3's 26 layers (forward and backward; 13.0 s by this benchmark before it timed the
forward too), as much as a warm start's first execution. Hiding them from the autotuner
with a cuDNN errata file (`CUDNN_ERRATA_JSON_FILE`, which XLA reads; a one-off probe, not
this benchmark: rules such as `{"operation": "ConvFwd", "engine": 5}` for the engines
listed here) makes it pick engines 0, 22 and 19 (still run-time compiled, ~0.2 s a layer;
the layers' gradients 6x slower in total), then 1, 28, 10 and 9 (precompiled, 17x
slower): no way round it on cuDNN's side, hence taps.

Another H200, `--iters=10 --variants=native,taps,float32` then `native,fwd,dx,dk`: native
first runs 0.6-1.05 s a layer (24.0 s over the 26; the same programs summed 15.2 s on the
machine above: compare only within a run). Per layer the forward alone took ~0.25 s,
forward and data gradient ~0.45, forward and kernel gradient ~0.65: the kernel gradient's
plan costs most. float32 is no way out: its engines are run-time compiled too (~0.45 s a
layer) and its steps are slower (21.5 vs 16.2 ms over the 26). Taps for the strided layers
and those at most 10 px across (11 layers): first runs 24.0 -> 14.7 s, steps 16.2 -> 17.3
ms; at most 19 px (20 layers): 6.1 s, 21.6 ms. TapGradDepthwiseConv2D on all of B3 in
training (train_e2e, second start): first execution ~11.4 s instead of ~15, but 1,377
img/s against ~2,000: XLA's sums over batch and map lose to cuDNN on the large maps.

A third H200, a one-off probe (six B3-like depthwise shapes, bf16, batch 64, raw
`lax.conv_general_dilated` forward and both gradients, persistent cache warm), whose
questions the variants again, threads, deterministic, autotune0 and nchw now ask per layer
(not yet run on a GPU): a second program with the same convolution, run after the first
in the same process, paid the same first run (0.41-0.64 s against 0.42-0.61): plans are
not shared between programs; six first runs started together from six threads finished
one after another, ~0.5 s apart (3.09 s in all): they do not overlap, so they cannot be
hidden behind other start-up work; `--xla_gpu_exclude_nondeterministic_ops=true`: the same
~0.4 s first runs and steps; `--xla_gpu_autotune_level=0`: first runs of 3-48 ms but steps
10-40x slower (1.5-9.8 ms against 0.1-0.4); `--xla_gpu_force_conv_nchw=true`: first runs
0.19-0.54 s, steps on the large maps 3-4x slower (1.37 against 0.37 ms at 150x150x40).
In training (train_e2e, B3 300, second start), taps for the strided layers and those at
most 10 px across ran at 1,711 img/s against native's 2,019 in the same lease (0.84x):
these per-layer sums underestimate the step cost.

The totals are per-layer sums, not a training step: use benchmarks/train_e2e.py
(`--train_bindings='build_model.taps_max_input_size = T'` with `build_model.depthwise =
"taps"`) to confirm a threshold end to end.
"""

import json
import os
import re
import sys
import time

from absl import app, flags

from benchmarks import fresh_process

FLAGS = flags.FLAGS  # defined under __main__: tests import this module


def depthwise_configs(backbone) -> list[dict]:
    """The distinct depthwise layers of `backbone` (a built Keras model), in order.

    Returns dicts with the layer's input `h`, `w`, `c`, its `kernel`, `strides`,
    `padding` and `count`: how many of the backbone's DepthwiseConv2D layers (depth
    multiplier 1) have that shape.
    """
    import keras

    def walk(model):  # nested models' layers too
        for layer in model.layers:
            yield from walk(layer) if isinstance(layer, keras.Model) else [layer]

    configs = {}
    for layer in walk(backbone):
        if not isinstance(layer, keras.layers.DepthwiseConv2D) or layer.depth_multiplier != 1:
            continue
        _, h, w, c = layer.input.shape
        key = (h, w, c, tuple(layer.kernel_size), tuple(layer.strides), layer.padding)
        if key not in configs:
            configs[key] = {"h": h, "w": w, "c": c, "kernel": list(key[3]),
                            "strides": list(key[4]), "padding": key[5], "count": 0}
        configs[key]["count"] += 1
    return list(configs.values())


def threshold_table(configs: list[dict], native: list[dict], taps: list[dict]) -> list[dict]:
    """Totals over the backbone's layers for each threshold T (None: all native), the
    layers whose input is at most T pixels across computed as taps; then the rows
    (`max_input_size`) "strided" (taps for the layers with stride >= 2), "strided or <= T"
    for each T (`build_model.taps_strided` with `taps_max_input_size`) and "no slower"
    (taps exactly where its step is at most native's).

    `native`, `taps`: per config (same order), dicts with `first_s` and `step_ms`.
    Returns dicts: `max_input_size`, `first_s` and `step_ms` (each summed over layers,
    count-weighted), `taps_layers`.
    """
    sizes = sorted({max(c["h"], c["w"]) for c in configs})
    rows = [_totals(limit, configs, native, taps,
                    [limit is not None and max(c["h"], c["w"]) <= limit for c in configs])
            for limit in [None, *sizes]]
    strided = [max(c["strides"]) >= 2 for c in configs]
    rows.append(_totals("strided", configs, native, taps, strided))  # taps_strided = True
    rows += [_totals(f"strided or <= {limit}", configs, native, taps,  # and max_input_size
                     [s or max(c["h"], c["w"]) <= limit for c, s in zip(configs, strided,
                                                                          strict=True)])
             for limit in sizes]
    rows.append(_totals("no slower", configs, native, taps,
                        [t["step_ms"] <= n["step_ms"] for n, t in zip(native, taps,
                                                                     strict=True)]))
    return rows


def _totals(label, configs, native, taps, use_taps: list[bool]) -> dict:
    first = step = 0.0
    swapped = 0
    for config, n, t, swap in zip(configs, native, taps, use_taps, strict=True):
        chosen = t if swap else n
        first += config["count"] * chosen["first_s"]
        step += config["count"] * chosen["step_ms"]
        swapped += config["count"] if swap else 0
    return {"max_input_size": label, "first_s": round(first, 3), "step_ms": round(step, 3),
            "taps_layers": swapped}


def _layer(config: dict, variant: str):
    import keras

    from models import layers

    cls = {"taps": layers.TapDepthwiseConv2D, "taps_grad": layers.TapGradDepthwiseConv2D}.get(
        variant, keras.layers.DepthwiseConv2D)
    # float32: cuDNN's float32 depthwise engines on inputs cast up from the training dtype
    dtype = "float32" if variant == "float32" else FLAGS.dtype_policy
    layer = cls(tuple(config["kernel"]), strides=tuple(config["strides"]),
                padding=config["padding"], use_bias=False, dtype=dtype)
    layer.build((FLAGS.batch_size, config["h"], config["w"], config["c"]))
    return layer


def gradient_fn(layer, wrt: tuple[int, ...] = (0, 1), divisor: float = 2.0):
    """jit((kernel, x) -> (d kernel, d x)) of sum(layer(x)**2) / divisor: the forward
    convolution and both backward ones, as in training (a loss linear in the output would
    let XLA drop the forward convolution, which training always runs). `wrt`: the arguments
    differentiated (0: kernel, 1: x); () jits the loss itself (the forward alone). Another
    `divisor` gives another program with the same convolutions."""
    import jax
    import jax.numpy as jnp
    import keras

    def loss(kernel, x):
        # layer(x), not stateless_call: __call__ autocasts the kernel to the compute dtype
        with keras.StatelessScope(state_mapping=[(layer.kernel, kernel)]):
            y = layer(x).astype(jnp.float32)
        return jnp.sum(y * y) / divisor

    return jax.jit(jax.grad(loss, argnums=wrt) if wrt else loss)


# Native layers, parts of the gradient: which of the three convolutions' plans cost most.
_WRT = {"fwd": (), "dx": (1,), "dk": (0,)}

# Native layers compiled under XLA flags that might avoid cuDNN's run-time compiled engines.
XLA_FLAG_VARIANTS = {"autotune0": "--xla_gpu_autotune_level=0",
                     "deterministic": "--xla_gpu_exclude_nondeterministic_ops=true",
                     "nchw": "--xla_gpu_force_conv_nchw=true"}

# Native layers, other ways of running them: "again", each layer's first run in a second
# program with the same convolutions, after the first program ran (are plans shared in a
# process?); "threads", all layers' first runs at once, one thread each (do they overlap?).
_NATIVE = ("native", "again", "threads", *_WRT, *XLA_FLAG_VARIANTS)

_CUDNN_OPS = {"convForward": "ConvFwd", "convBackwardInput": "ConvBwdData",
              "convBackwardFilter": "ConvBwdFilter"}


def cudnn_engines(hlo_text: str) -> list[str]:
    """The cuDNN engines an optimised XLA GPU program runs, as cuDNN's errata tags
    ("ConvFwd_eng5"), in program order: the `algo_id` of each `__cudnn$conv*` custom call."""
    engines = []
    for line in hlo_text.splitlines():
        call = re.search(r'"__cudnn\$(\w+)"', line)
        if call:
            algo = re.search(r'algo_id\\?"\s*:\s*\\?"?(\d+)', line)  # quotes escaped or not
            engines.append(f"{_CUDNN_OPS.get(call.group(1), call.group(1))}_eng"
                           f"{algo.group(1) if algo else '?'}")
    return engines


def _prepare(config: dict):
    """(compiled gradient, its arguments, compile-or-load seconds) of one layer."""
    import jax
    import keras
    import numpy as np

    layer = _layer(config, FLAGS.variant)
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.uniform(-1, 1, (FLAGS.batch_size, config["h"], config["w"],
                                              config["c"])),
                          keras.DTypePolicy(FLAGS.dtype_policy).compute_dtype)
    args = (layer.kernel.value, x)
    wrt = _WRT.get(FLAGS.variant, (0, 1))
    if FLAGS.variant == "again":  # the first program runs, unmeasured; then the second
        jax.block_until_ready(gradient_fn(layer, wrt)(*args))
    t0 = time.perf_counter()
    compiled = gradient_fn(layer, wrt, 4.0 if FLAGS.variant == "again" else 2.0).lower(
        *args).compile()
    return compiled, args, time.perf_counter() - t0


def _result(compiled, args, compile_s: float, first_s: float) -> dict:
    import jax
    import numpy as np

    times = []
    for _ in range(FLAGS.iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    return {"compile_or_load_s": round(compile_s, 4), "first_s": round(first_s, 4),
            "step_ms": round(1e3 * float(np.median(times)), 4),
            "engines": cudnn_engines(compiled.as_text())}


def _measure(config: dict) -> dict:
    import jax

    compiled, args, compile_s = _prepare(config)
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return _result(compiled, args, compile_s, time.perf_counter() - t)


def _measure_in_threads(configs: list[dict]) -> list[dict]:
    """All layers' programs loaded, then their first runs started together, one thread
    each: `first_s` is when each finished, from the common start."""
    from concurrent.futures import ThreadPoolExecutor

    import jax

    prepared = [_prepare(config) for config in configs]
    start = time.perf_counter()

    def first_run(item):
        compiled, args, _ = item
        jax.block_until_ready(compiled(*args))
        return time.perf_counter() - start

    with ThreadPoolExecutor(len(prepared)) as pool:
        finished = list(pool.map(first_run, prepared))
    return [_result(*item, first_s) for item, first_s in zip(prepared, finished, strict=True)]


def _configs_file() -> str:
    return os.path.join(FLAGS.cache_dir, "configs.json")


def _child() -> list[dict]:
    """Measures the layers main() listed in `_configs_file()`, with `--variant`."""
    import keras

    from training import compilation

    if keras.backend.backend() != "jax":
        sys.exit("depthwise_layers measures JAX programs: set KERAS_BACKEND=jax")
    compilation.enable_compilation_cache(os.path.join(FLAGS.cache_dir, FLAGS.variant))
    with open(_configs_file()) as f:
        configs = json.load(f)
    if FLAGS.variant == "threads":
        return _measure_in_threads(configs)
    return [_measure(config) for config in configs]


def _run(variant: str, start: str) -> list[dict]:
    flag = XLA_FLAG_VARIANTS.get(variant)
    env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()} if flag else {}
    return fresh_process.run_variant(
        "benchmarks.depthwise_layers", variant, start, FLAGS.cache_dir,
        [f"--{k}={getattr(FLAGS, k)}" for k in ("batch_size", "dtype_policy", "iters")], env)


def main(_):
    if FLAGS.variant:
        print(json.dumps(_child()))
        return
    import keras

    from models import registry

    backbone = registry.get_backbone_fn(FLAGS.model)(image_size=FLAGS.image_size,
                                                      weights=None)
    configs = depthwise_configs(backbone)
    os.makedirs(FLAGS.cache_dir, exist_ok=True)
    with open(_configs_file(), "w") as f:  # the children measure these, not a rebuild
        json.dump(configs, f)
    variants = ["native", *[v for v in FLAGS.variants if v != "native"]]
    runs = {(v, s): _run(v, s) for v in variants for s in ("cold", "warm")}
    print(f"## {FLAGS.model} {FLAGS.image_size}px, batch {FLAGS.batch_size}, "
          f"{FLAGS.dtype_policy}, {keras.backend.backend()}: each depthwise layer's "
          "gradient (forward + both backward convolutions)")
    others = variants[1:]
    print("| input HxWxC | kernel/stride | layers | native: warm first run s, step ms, "
          "cold first run s | " + " | ".join(f"{v}: warm first run s, step ms" for v in others)
          + " | native's cuDNN engines |")
    print("| --- " * (5 + len(others)) + "|")
    for i, c in enumerate(configs):
        n, cold = runs["native", "warm"][i], runs["native", "cold"][i]
        alt = " | ".join(f"{runs[v, 'warm'][i]['first_s']:.3f}, {runs[v, 'warm'][i]['step_ms']:.3f}"
                         for v in others)
        print(f"| {c['h']}x{c['w']}x{c['c']} | {c['kernel'][0]}/{c['strides'][0]} | "
              f"{c['count']} | {n['first_s']:.3f}, {n['step_ms']:.3f}, {cold['first_s']:.3f} | "
              f"{alt} | {' '.join(n['engines'])} |")
    if "threads" in others:
        serial = sum(r["first_s"] * c["count"] for r, c in zip(runs["native", "warm"], configs,
                                                                 strict=True))
        print(f"\nthreads: the {len(configs)} distinct layers' first runs together took "
              f"{max(r['first_s'] for r in runs['threads', 'warm']):.2f} s; native one by one "
              f"{sum(r['first_s'] for r in runs['native', 'warm']):.2f} s "
              f"({serial:.2f} s counting each layer of the backbone)")
    tables = {v: threshold_table(configs, runs["native", "warm"], runs[v, "warm"])
              for v in others if v not in _NATIVE}  # substitutes, not ways of running native
    for v, table in tables.items():
        print(f"\n| {v} for inputs <= | {v} layers | warm first runs, s | steps, ms |")
        print("| --- | --- | --- | --- |")
        for row in table:
            print(f"| {row['max_input_size'] or '- (all native)'} | {row['taps_layers']} | "
                  f"{row['first_s']:.2f} | {row['step_ms']:.2f} |")
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump({"configs": configs, "runs": {f"{v}_{s}": r for (v, s), r in
                                                    runs.items()}, "thresholds": tables}, f,
                      indent=2)


if __name__ == "__main__":
    flags.DEFINE_string("model", "efficientnet_b3", "fundusflow registry name.")
    flags.DEFINE_integer("image_size", 300, "Square input size.")
    flags.DEFINE_integer("batch_size", 64, "Batch size.")
    flags.DEFINE_string("dtype_policy", "mixed_bfloat16", "Keras dtype policy of the layers.")
    flags.DEFINE_integer("iters", 20, "Timed executions per layer (median).")
    flags.DEFINE_string("cache_dir", "/tmp/fundusflow_depthwise_cache", "Compilation caches "
                        "(one folder per variant, emptied before its cold run).")
    flags.DEFINE_string("json_out", "", "Optional path for all results as JSON.")
    flags.DEFINE_list("variants", ["native", "taps"], "What to measure against native: taps "
                      "(TapDepthwiseConv2D), taps_grad (TapGradDepthwiseConv2D: only the kernel "
                      "gradient as taps), float32 (DepthwiseConv2D computing in float32); "
                      "fwd, dx, dk: native with the forward alone, the gradient for x alone, "
                      "for the kernel alone (where the first run's time goes); again, threads: "
                      "native's first runs in a second program, from one thread per layer; "
                      f"{', '.join(XLA_FLAG_VARIANTS)}: native under XLA_FLAGS "
                      f"{', '.join(XLA_FLAG_VARIANTS.values())}.")
    flags.DEFINE_string("variant", "", "Internal: the variant measured in this process.")
    app.run(main)
