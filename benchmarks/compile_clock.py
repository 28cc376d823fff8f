"""Where a JAX start's seconds go: tracing, lowering, compiling or loading, the rest.

JAX reports each jit's tracing, its lowering to MLIR and XLA's compile (with the
persistent compilation cache warm: the load of the compiled program) as monitoring
events with their wall-clock span. benchmarks/train_e2e.py records them over a train.py
start and splits its stretches with them; whatever a first call spends outside them is
the program's first execution (measured on an H200: mostly cuDNN building its
convolution plans, which compiles kernels with NVRTC, uncached across processes).
"""

import time


class CompileClock:
    """JAX's compile events while on: tracing to a jaxpr, lowering to MLIR, and XLA's
    compile (or, with the persistent cache warm, the load of the compiled program), each
    as (kind, function, start, end) in seconds since `origin`. `split` then says how
    much of a stretch of the start they took; what is left of a first call is the
    program's first execution (on a GPU: loading kernels, building cuDNN plans)."""

    KINDS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
             "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
             "/jax/core/compile/backend_compile_duration": "compile_or_load"}

    def __init__(self, origin: float):
        """`origin`: the wall-clock time (time.time()) that is 0 s, e.g. process start."""
        self.origin, self.spans, self._monitoring = origin, [], None
        try:
            import jax.monitoring
        except ImportError:  # TensorFlow-only install: nothing to record
            return
        self._monitoring = jax.monitoring
        self._monitoring.register_event_time_span_listener(self._on_span)

    def close(self) -> None:
        """Stops recording (the spans so far stay)."""
        if self._monitoring is not None:
            self._monitoring.unregister_event_time_span_listener(self._on_span)
            self._monitoring = None

    def _on_span(self, event, start, end, **kwargs):
        if event in self.KINDS:
            self.spans.append((self.KINDS[event], kwargs.get("fun_name", ""),
                               start - self.origin, end - self.origin))

    def split(self, begin: float | None, end: float | None) -> dict:
        """Seconds of each kind within [begin, end) (s since `origin`), counting a
        span nested in another of its kind once (a jit traced inside a jit), the number of
        programs compiled or loaded, the longest one's name, and `other_s`: the rest."""
        if begin is None or end is None:
            return {}
        out = {kind: 0.0 for kind in self.KINDS.values()}
        reach = {kind: begin for kind in out}  # the end of the last outermost span
        longest = ("", 0.0)
        for kind, name, start, stop in sorted(self.spans, key=lambda s: s[2]):
            if start < begin or stop > end or stop <= reach[kind]:
                continue
            out[kind] += stop - max(start, reach[kind])
            reach[kind] = stop
            if kind == "compile_or_load" and stop - start > longest[1]:
                longest = (name, stop - start)
        programs = sum(1 for k, _, a, b in self.spans if k == "compile_or_load" and begin <= a
                       and b <= end)
        out = {f"{k}_s": round(v, 2) for k, v in out.items()}
        return {**out, "other_s": round(end - begin - sum(out.values()), 2),
                "programs": programs, "longest": longest[0]}


def programs_during(fn):
    """(fn(), how many XLA programs JAX compiled or loaded from its persistent cache while
    `fn` ran)."""
    clock = CompileClock(time.time())
    try:
        result = fn()
    finally:
        clock.close()
    return result, sum(1 for kind, *_ in clock.spans if kind == "compile_or_load")
