"""Wall time per stage of a job, summed over re-entries (scoring can happen more than once), and the stage
running now (so a rank that waits in vain can say where)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageTimer:
    seconds: dict[str, float] = field(default_factory=dict)
    current: str = "setup"  # the innermost stage running now; an exception leaves it where it was raised

    @contextmanager
    def __call__(self, stage: str):
        start, outer = time.perf_counter(), self.current
        self.current = stage
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
        self.current = outer  # not reached when the stage raised
