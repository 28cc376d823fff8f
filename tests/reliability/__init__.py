"""The fault and bad-input suite behind `make reliability` (a small version runs in `make test`).

Each `scenarios_<area>.py` module exposes ``SCENARIOS``: a list of callables
``scenario(tmp: pathlib.Path, quick: bool) -> Result``. `run.py` discovers them,
runs each in its own temporary folder and prints one table row per scenario.
"""

import dataclasses


@dataclasses.dataclass
class Result:
    """What one scenario did: faults injected, runs that survived, records lost.

    ``records_lost`` counts examples (or checkpoints) missing or corrupted after
    recovery; ``unexpected`` counts crashes other than the documented errors.
    Both must be 0 for the suite to pass.
    """

    name: str
    faults_injected: int
    runs_survived: int
    records_lost: int = 0
    unexpected: int = 0
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.records_lost == 0 and self.unexpected == 0
