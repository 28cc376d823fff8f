"""Measuring in a fresh process: one variant of a benchmark, its JAX compilation cache
emptied first (a cold start) or kept from the previous run (a warm one)."""

import json
import os
import shutil
import subprocess
import sys


def run_variant(module: str, variant: str, start: str, cache_dir: str, args: list[str],
                env: dict[str, str] | None = None):
    """Runs `python -m module --variant=V --cache_dir=... *args` (environment: this one
    updated by `env`) and returns the JSON value its stdout ends with. start: "cold" empties
    `cache_dir/variant` first, "warm" keeps it. Exits naming the variant, with the child's
    stderr, if it fails."""
    if start == "cold":
        shutil.rmtree(os.path.join(cache_dir, variant), ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", module, f"--variant={variant}",
                           f"--cache_dir={cache_dir}", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if proc.returncode:
        sys.exit(f"{variant} ({start}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
