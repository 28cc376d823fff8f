"""Several training steps in one compiled call (JAX backend): an on-device loop.

Keras 3.15's JAX `fit` dispatches one jitted step per batch, passing the whole training
state (every variable's array, ~1,000 of them for a MobileNetV3) in and out each time;
with `steps_per_execution=k` it only loops in Python over k such calls. On a GPU whose
step is shorter than that host work, the GPU waits. `steps_per_execution` here runs the
k batches of one execution as ONE jitted call: a `jax.lax.scan` of Keras' own
`train_step` over the k batches stacked on the device, the state carried (and donated)
from step to step, so the host dispatches once per k steps.

Same batches, same order, same updates as k single steps (float noise only): the scan
body is Keras' `train_step` itself. The call returns the last step's logs (Keras' loop
does too: its metrics are running means over the epoch). An execution with fewer than k
batches (the data ended, the epoch's last execution is partial, or the batch shapes
differ) runs them one by one through the single-step jitted function, as Keras would.

TensorFlow needs none of this: Keras' own `steps_per_execution` is a tf.function loop.
"""

import contextlib

import keras

from training import train_function as train_function_lib

# jax is imported where used: this module is imported on every backend (`resolve`) and
# jax is an optional dependency.


def _compile(fn, out_shardings):
    """`fn(state, data) -> (logs, state)` jitted as Keras jits its step: state donated."""
    import jax

    return jax.jit(fn, donate_argnums=0, out_shardings=out_shardings)


def _scan(train_step):
    """(state, [k batches]) -> (last step's logs, state) by `train_step` over the batches."""
    import jax
    import jax.numpy as jnp

    def body(state, data):
        logs, state = train_step(state, data)
        return state, logs

    def steps(state, batches):
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *batches)
        state, logs = jax.lax.scan(body, state, stacked)
        return jax.tree.map(lambda values: values[-1], logs), state

    return steps


def _stackable(batches: list) -> bool:
    """Whether the batches share one structure and every leaf's shape and dtype."""
    import jax

    def spec(batch):  # leaves are numpy or jax arrays
        return jax.tree.structure(batch), [(x.shape, x.dtype) for x in jax.tree.leaves(batch)]

    first = spec(batches[0])
    return all(spec(b) == first for b in batches[1:])


class _MultiStep:
    """Keras' `train_function(state, iterator) -> (logs, state)`, k steps per call.

    `steps_per_epoch` (None: unknown) ends each epoch's last execution at the epoch's
    end: Keras' loop would take k batches there and so train more steps per epoch than
    asked whenever k does not divide it. An epoch's count restarts with each new
    iterator (Keras makes one per epoch unless it keeps one across epochs, which it does
    only with `steps_per_epoch`).
    """

    def __init__(self, model: keras.Model, k: int, steps_per_epoch: int | None):
        out_shardings = None
        if keras.distribution.distribution() is not None:  # as Keras' make_train_function
            out_shardings = (None, model._get_state_sharding_spec())
        self.k, self.steps_per_epoch = k, steps_per_epoch
        self.single = _compile(model.train_step, out_shardings)
        self.scan = _compile(_scan(model.train_step), out_shardings)
        self._iterator, self._taken = None, 0

    def _take(self, iterator) -> list:
        if iterator is not self._iterator:
            self._iterator, self._taken = iterator, 0
        n = self.k
        if self.steps_per_epoch:
            n = min(n, self.steps_per_epoch - self._taken)
        batches = [next(iterator)]  # StopIteration here ends Keras' epoch
        try:
            while len(batches) < n:
                batches.append(next(iterator))
        except StopIteration:
            pass
        self._taken += len(batches)
        if self.steps_per_epoch and self._taken >= self.steps_per_epoch:
            self._taken = 0
        return batches

    def __call__(self, state, iterator):
        batches = self._take(iterator)
        if len(batches) == self.k and _stackable(batches):
            return self.scan(state, batches)
        for data in batches:
            logs, state = self.single(state, data)
        return logs, state


# The default's most steps per dispatch (see resolve). 16, not 8: MobileNetV3-Large 224
# on an H200, whose ~7 ms step leaves the host's per-dispatch work exposed, trained at
# 0.86x its compiled step with 8 and 0.94x with 16 (benchmarks/train_e2e.py, same run).
AUTO_MAX = 16


def resolve(steps_per_execution: int | None, steps_per_epoch: int) -> int:
    """The steps per dispatch to compile with: `steps_per_execution`, checked, or for
    None on one JAX accelerator the largest divisor of `steps_per_epoch` up to
    AUTO_MAX, else 1.

    A divisor, so that no epoch ends in a shorter execution: its single steps would be
    a second program to compile. Raises ValueError for a count < 1, or on TensorFlow
    for one that does not divide the epoch (Keras' compiled loop would run whole
    executions: more steps per epoch).
    """
    if steps_per_execution is None:
        if not train_function_lib.one_jax_accelerator():
            return 1
        return max(k for k in range(1, AUTO_MAX + 1) if steps_per_epoch % k == 0)
    if steps_per_execution < 1:
        raise ValueError(f"steps_per_execution must be >= 1, got {steps_per_execution}")
    if keras.backend.backend() != "jax" and steps_per_epoch % steps_per_execution:
        raise ValueError(
            f"steps_per_execution={steps_per_execution} does not divide the "
            f"{steps_per_epoch} steps per epoch: on {keras.backend.backend()} Keras would "
            "run whole executions and train more steps per epoch; bind "
            "train.steps_per_epoch to a multiple of it")
    return steps_per_execution


def _applies(model: keras.Model) -> bool:
    """k > 1 on a jit-compiled model (eager steps keep Keras' loop)."""
    return (model.steps_per_execution > 1 and not model.run_eagerly and model.jit_compile
            and not keras.config.is_nnx_enabled())


@contextlib.contextmanager
def steps_per_execution(model: keras.Model, steps_per_epoch: int | None = None):
    """Within the block, `model.fit` (JAX, jit-compiled) runs the compiled model's
    `steps_per_execution` steps per dispatch as one scanned call.

    Wraps the train function fit makes (train_function.py), as
    `prefetch.device_prefetch` does; enter this one first when both are used, so that
    prefetch's thread feeds it. k = 1, eager or non-jitted models, other backends:
    nothing changes.
    """
    if keras.backend.backend() != "jax":
        yield
        return

    def multistep(step):
        if not _applies(model):
            return step
        return _MultiStep(model, model.steps_per_execution, steps_per_epoch)

    with train_function_lib.replaced(model, multistep):
        yield
