"""benchmarks/compile_clock.py: the start split train_e2e prints (hand-made spans, and
the events of a real jit)."""

import time

import pytest

from benchmarks.compile_clock import CompileClock

jax = pytest.importorskip("jax")


def _clock(spans):
    clock = CompileClock(origin=0.0)
    clock.close()
    clock.spans = spans
    return clock


def test_split_counts_nested_spans_once_and_leaves_the_rest_as_other():
    clock = _clock([
        ("trace", "steps", 1.0, 3.0),
        ("trace", "inner", 1.5, 2.0),  # a jit traced inside `steps`: already counted
        ("lower", "steps", 3.0, 3.5),
        ("compile_or_load", "steps", 3.5, 5.0),
        ("compile_or_load", "small", 5.0, 5.25),
        ("trace", "later", 6.5, 7.0),  # after the window
    ])
    assert clock.split(1.0, 6.0) == {
        "trace_s": 2.0, "lower_s": 0.5, "compile_or_load_s": 1.75, "other_s": 0.75,
        "programs": 2, "longest": "steps"}


def test_split_overlapping_spans_of_one_kind_count_their_union():
    clock = _clock([("trace", "a", 0.0, 2.0), ("trace", "b", 1.0, 3.0)])
    assert clock.split(0.0, 4.0)["trace_s"] == 3.0
    assert clock.split(0.0, 4.0)["other_s"] == 1.0


def test_split_of_a_missing_stretch_is_empty():
    assert _clock([]).split(1.0, None) == {}


def test_records_a_real_jit_and_stops_on_close():
    clock = CompileClock(origin=time.time())

    def fresh(x):  # a new function: traced, lowered and compiled here
        return x * 3.0 + 1.0

    begin = time.time() - clock.origin
    jax.jit(fresh)(jax.numpy.ones(7)).block_until_ready()
    end = time.time() - clock.origin
    clock.close()
    kinds = {kind for kind, name, _, _ in clock.spans if "fresh" in name}
    assert kinds == {"trace", "lower", "compile_or_load"}
    split = clock.split(begin, end)
    assert split["programs"] >= 1 and split["other_s"] >= 0
    parts = split["trace_s"] + split["lower_s"] + split["compile_or_load_s"] + split["other_s"]
    assert parts == pytest.approx(end - begin, abs=0.03)
    n = len(clock.spans)
    jax.jit(lambda x: x - 2.0)(jax.numpy.ones(5)).block_until_ready()
    assert len(clock.spans) == n
