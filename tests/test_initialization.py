"""training.initialization: on JAX (a subprocess) the variables built inside
`initialized_together()` get exactly the values eager initialisation gives, from one
compiled program, weights loaded inside the block included; elsewhere the block is plain."""

import contextlib
import os

import keras
import numpy as np
import pytest

from benchmarks.compile_clock import programs_during
from models import build_model, registry
from tests.jax_child import check_on_jax
from training.initialization import initialized_together


def _values(model):
    return [keras.ops.convert_to_numpy(v.value) for v in model.variables]


def _built(name, together, **kw):
    keras.utils.set_random_seed(0)  # initializers draw their seeds from Python's random
    with initialized_together() if together else contextlib.nullcontext():
        return build_model(name, "dr_grade", 5, 32, **kw)


def check_same_values_one_program(tmp_dir: str):
    eager, eager_programs = programs_during(lambda: _built("mobilenetv3_large", False))
    together, programs = programs_during(lambda: _built("mobilenetv3_large", True))
    assert len(together.variables) == len(eager.variables) > 100
    for got, expected, v in zip(_values(together), _values(eager), eager.variables,
                                strict=True):
        np.testing.assert_array_equal(got, expected, err_msg=v.path)
    # eager: a program per distinct initializer and shape; together: one (the functional
    # model's symbolic build compiles nothing)
    assert programs == 1 and eager_programs > 20, (programs, eager_programs)

    # depthwise layers swapped for taps: the clone reads no fresh weights (a program each)
    _, taps_programs = programs_during(lambda: _built("efficientnet_b3", True, depthwise="taps",
                                                   taps_strided=True))
    assert taps_programs < 10, taps_programs  # B3's few eager constants; 184 when it did

    # a backbone loading its weights file while it is built, inside the block
    backbone = registry.get_backbone_fn("resnetv2_lite")(image_size=32)
    for v in backbone.variables:
        v.assign(np.full(v.shape, 0.5, "float32"))
    path = os.path.join(tmp_dir, "backbone.weights.h5")
    backbone.save_weights(path)
    loaded = _built("resnetv2_lite", True, weights=path).get_layer("backbone")
    assert all(np.all(value == 0.5) for value in _values(loaded))

    # a variable made before the block and assigned in it keeps the assignment
    before = keras.Variable(np.zeros(3, "float32"))
    with initialized_together():
        before.assign(np.ones(3, "float32"))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(before.value), np.ones(3))

    # a failed build leaves nothing pending for a later block
    with pytest.raises(RuntimeError, match="boom"), initialized_together():
        keras.Variable("zeros", shape=(2,))
        raise RuntimeError("boom")
    with initialized_together():
        after = keras.Variable("ones", shape=(2,))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(after.value), np.ones(2))


def test_same_values_from_one_program_on_jax(tmp_path):
    check_on_jax("from tests.test_initialization import check_same_values_one_program as c; "
                 f"c({str(tmp_path)!r})", timeout=600)


def test_plain_block_elsewhere():
    if keras.backend.backend() == "jax":
        pytest.skip("the JAX path is the subprocess test")
    together = _built("mobilenetv3_large", True)
    eager = _built("mobilenetv3_large", False)
    for got, expected in zip(_values(together), _values(eager), strict=True):
        np.testing.assert_array_equal(got, expected)
