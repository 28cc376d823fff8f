"""Replacing the train function Keras' `fit` makes, for the length of a block.

`fit` makes its train function (`make_train_function`) only after it has built the
optimizer and metrics, whose variables decide the state's shardings under a
`keras.distribution`; a replacement must be made from that one, not before. Used by
prefetch.py (batches read ahead) and multistep.py (k steps per call); blocks nest, the
inner one wrapping what the outer one made.
"""

import contextlib
from collections.abc import Callable

import keras


@contextlib.contextmanager
def replaced(model: keras.Model, wrap: Callable):
    """Within the block, each train function `fit` makes becomes `wrap(it)` (`wrap` may
    return it unchanged); on exit the model gets back its own `make_train_function` and
    the function `wrap` was given."""
    saved = vars(model).get("make_train_function")  # an outer block's
    make, made = model.make_train_function, []  # made: (Keras' function, its wrapper)

    def make_train_function(force=False):
        before = model.train_function
        make(force=force)
        if not made or model.train_function is not before:  # first in the block, or anew
            made.append((model.train_function, wrap(model.train_function)))
            model.train_function = made[-1][1]

    model.make_train_function = make_train_function
    try:
        yield
    finally:
        if saved is None:
            del model.make_train_function
        else:
            model.make_train_function = saved
        if made and model.train_function is made[-1][1]:
            model.train_function = made[-1][0]


def one_jax_accelerator() -> bool:
    """Whether `fit` runs on the JAX backend on one GPU/TPU (no `keras.distribution`):
    where the host's per-step work (the dispatch, reading the batch) sets the pace of a
    short step, so the defaults of prefetch.py and multistep.py turn on there."""
    if keras.backend.backend() != "jax" or keras.distribution.distribution() is not None:
        return False
    import jax

    return jax.default_backend() != "cpu"
