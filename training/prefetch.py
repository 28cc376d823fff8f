"""Batches onto the accelerator ahead of the step, on a thread of their own (JAX backend).

Keras' JAX `fit` takes each batch from its epoch iterator on the training thread: the
tf.data batch becomes numpy, then `jax.device_put` copies it (sharded over the replicas
under `keras.distribution`) before the step is dispatched. On a GPU whose step takes
~15 ms, that host work is of the same order and adds to the step whenever it is not
hidden; Keras 3.15 hides one batch of it on one device and none across several.
`device_prefetch` moves it to a background thread that keeps `depth` batches on the
devices ahead of the step, so the training thread only dispatches.

The batches and their order are exactly those of the epoch iterator: one thread reads it,
and batches it read ahead at an epoch's end are handed to the next epoch when Keras keeps
the iterator (steps_per_epoch on a repeated dataset) and dropped with it when Keras makes
a new one, as Keras itself would drop them.
"""

import contextlib
import queue
import threading

import keras

from training import train_function as train_function_lib

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class _Ahead:
    """An iterator over `source` whose items are produced `depth` ahead on a thread."""

    def __init__(self, source, depth: int):
        self.source = source
        # Keras keeps its global state (the distribution among it) per thread; the
        # iterator shards each batch by the distribution it finds, so the thread must
        # see the one in force here (else it puts whole batches on one device, which the
        # step then replicates: each GPU computed the global batch, measured on two H200s).
        self._distribution = keras.distribution.distribution()
        self._queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="device_prefetch",
                                        daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        keras.distribution.set_distribution(self._distribution)
        try:
            for item in self.source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as error:  # re-raised on the training thread
            self._put(_Failed(error))

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # every later call ends too, as an exhausted iterator
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def resolve(depth: int | None, steps_per_execution: int = 1) -> int:
    """Batches to keep ahead: `depth`, or for None two executions' worth
    (2 * `steps_per_execution`) on one JAX accelerator, else 0 (off).

    Off on the TensorFlow backend (tf.data's own prefetch feeds its compiled loop), on
    JAX's CPU (host and device are the same cores: nothing to overlap) and, for now,
    under a `keras.distribution`: there it has not been measured on GPUs since its
    batches are sharded like Keras' own (pass a depth to use it).
    """
    if depth is not None:
        if depth < 0:
            raise ValueError(f"device_prefetch must be >= 0 or None, got {depth}")
        return depth
    return 2 * steps_per_execution if train_function_lib.one_jax_accelerator() else 0


@contextlib.contextmanager
def device_prefetch(model: keras.Model, depth: int):
    """Within the block, `model.fit` (JAX) reads its batches `depth` ahead.

    Wraps the train function fit makes (train_function.py); the thread and the wrapper
    go when the block exits. depth 0, other backends: nothing changes.
    """
    if depth <= 0 or keras.backend.backend() != "jax":
        yield
        return
    ahead = []

    def prefetching(step):
        def train_function(state, iterator):
            if not ahead or ahead[-1].source is not iterator:  # fit's first step, or a
                if ahead:                                      # new epoch iterator
                    ahead.pop().close()
                ahead.append(_Ahead(iterator, depth))
            return step(state, ahead[-1])

        return train_function

    try:
        with train_function_lib.replaced(model, prefetching):
            yield
    finally:
        for a in ahead:
            a.close()
