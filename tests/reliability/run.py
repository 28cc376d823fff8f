"""The fault and bad-input suite: runs every scenario, prints one table, fails on any loss.

    python -m tests.reliability.run [--quick] [-k SUBSTRING]

Discovers `tests/reliability/scenarios_*.py` modules; each exposes ``SCENARIOS``,
callables ``(tmp: pathlib.Path, quick: bool) -> tests.reliability.Result``. Each
runs in its own temporary folder. A scenario that raises counts as one
unexpected crash. Exit status 1 when any scenario lost records or crashed
unexpectedly (`make reliability` runs the full suite; tests/test_reliability.py
the quick one).
"""

import argparse
import importlib
import pathlib
import pkgutil
import sys
import tempfile
import time
from collections.abc import Callable

from tests import reliability
from tests.reliability import Result

Scenario = Callable[[pathlib.Path, bool], Result]
COLUMNS = ("scenario", "faults injected", "runs survived", "records lost",
           "unexpected crashes", "seconds", "detail")


def discover() -> list[Scenario]:
    """Every SCENARIOS entry of every scenarios_*.py module, in module name order."""
    found = []
    for info in sorted(pkgutil.iter_modules(reliability.__path__), key=lambda m: m.name):
        if info.name.startswith("scenarios_"):
            module = importlib.import_module(f"{reliability.__name__}.{info.name}")
            found += list(module.SCENARIOS)
    return found


def run_scenario(scenario: Scenario, quick: bool) -> tuple[Result, float]:
    """(its Result, seconds); a raised exception becomes a Result with one unexpected crash."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        try:
            result = scenario(pathlib.Path(tmp), quick)
        except Exception as e:  # noqa: BLE001 - the table must still be printed
            result = Result(name=scenario.__name__, faults_injected=0, runs_survived=0,
                            unexpected=1, detail=f"crashed: {type(e).__name__}: {e}"[:300])
    return result, time.perf_counter() - start


def format_table(rows: list[tuple[Result, float]]) -> str:
    """A plain-text table, one row per scenario, then a verdict line."""
    cells = [COLUMNS] + [(r.name, str(r.faults_injected), str(r.runs_survived),
                          str(r.records_lost), str(r.unexpected), f"{s:.1f}", r.detail)
                         for r, s in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join(c[i].ljust(w) for i, w in enumerate(widths)) + "  " + c[-1]
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ------")
    failed = [r.name for r, _ in rows if not r.ok]
    lines.append(f"FAILED: {', '.join(failed)}" if failed else
                 f"OK: {len(rows)} scenarios, 0 records lost, 0 unexpected crashes")
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small version (make test)")
    parser.add_argument("-k", default="", help="only scenarios whose name contains this")
    args = parser.parse_args(argv)
    scenarios = [s for s in discover() if args.k in s.__name__]
    rows = []
    for scenario in scenarios:
        print(f"running {scenario.__name__} ...", file=sys.stderr, flush=True)
        rows.append(run_scenario(scenario, args.quick))
    print(format_table(rows))
    return 0 if rows and all(r.ok for r, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
