"""Variables given their initial values by one compiled program (JAX backend).

Keras initialises each variable eagerly where it is created, and on JAX every distinct
(initializer, shape) is then a small program that XLA compiles or loads from the
persistent cache: a train.py start of EfficientNet-B3 ran 314 programs before fit on
an H200 (4.2 s of a warm start; `to_fit` in benchmarks/train_e2e.py) and 253 on a CPU,
where building B3 with an empty cache spent 13 s compiling them. Inside
`initialized_together()` Keras' stateless scope defers every new variable's
initializer; on leaving it, one jitted program computes all their values: the same
initializers with the same seeds, so the same values (tests check bitwise).
Assignments made inside the block (weights loaded while a backbone is built) are
applied after it. Elsewhere than JAX this is a plain block: TensorFlow initialises
eagerly without compiling.

This reads Keras internals (the pending-variable list, a variable's initializer, shape and
dtype): pinned to keras 3.15.1 in setup.py, and tests/test_initialization.py fails if
they change.
"""

import contextlib

import keras
from keras.src.backend.common import global_state

_PENDING = "uninitialized_variables"  # where Keras lists variables created in a stateless scope


class _RecordingScope(keras.StatelessScope):
    """A stateless scope that keeps the variables assigned in it, not only their ids."""

    def __init__(self):
        super().__init__(initialize_variables=False)
        self.assigned = {}  # id -> variable

    def add_update(self, update):
        variable, _ = update
        self.assigned[id(variable)] = variable
        super().add_update(update)


@contextlib.contextmanager
def initialized_together():
    """Variables created in the block are initialised on leaving it, by one program."""
    if keras.backend.backend() != "jax" or global_state.get_global_attribute(
            "stateless_scope") is not None:
        yield
        return
    import jax

    with _RecordingScope() as scope:
        try:
            yield
        except BaseException:
            global_state.set_global_attribute(_PENDING, [])
            raise
    pending = global_state.get_global_attribute(_PENDING) or []
    global_state.set_global_attribute(_PENDING, [])
    fresh = [v for v in pending if id(v) not in scope.state_mapping]
    specs = [(v._initializer, v._shape, v._dtype) for v in fresh]
    values = jax.jit(lambda: [init(shape, dtype=dtype) for init, shape, dtype in specs])()
    for variable, value in zip(fresh, values, strict=True):
        _set_initial(variable, value)
    pending_ids = {id(v) for v in pending}
    for key, variable in scope.assigned.items():
        value = scope.state_mapping[key]
        if key in pending_ids:
            _set_initial(variable, value)
        else:  # created before the block, assigned in it
            variable.assign(value)


def _set_initial(variable, value) -> None:
    variable._initialize(value)  # places it as its layout (keras.distribution) says
    variable._initializer = None
