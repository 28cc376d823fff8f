"""Persistent XLA compilation cache for the JAX backend (train.py and evaluate.py).

On an H200, compiling ConvNeXt-Tiny's train step takes ~80 s and EfficientNet-B3's
~200 s (benchmarks/train_throughput.py); JAX can keep compiled executables on disk, keyed by
the program, its compile options and the jax/jaxlib version and device, so a
second start of the same run (or the evaluation of a trained workdir) loads them
instead. In a multi-process job on CPU only process 0 gains (measured, jax 0.10.2): JAX
writes entries from process 0 alone, and the other processes' keys differ from process
0's (even the train step's, one program over both), so those compile afresh on every
start. TensorFlow's XLA has no such cache: there this is a no-op.
"""

import os

DEFAULT_DIR = "~/.cache/fundusflow/jax_compilation_cache"


def enable_compilation_cache(path: str | None = DEFAULT_DIR) -> str | None:
    """Points JAX's persistent compilation cache at `path` (created if missing).

    Args:
        path: cache folder ("~" expanded); None or "" turns the cache off.
    Returns:
        The absolute folder in use, or None (cache off, or not the JAX backend).
    """
    import keras

    if not path or keras.backend.backend() != "jax":
        return None
    import jax

    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    # Cache every compilation, also the many small ones run while variables are
    # initialised: on a repeat start they would otherwise dominate.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path
