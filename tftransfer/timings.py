"""Wall time per stage of a run, for the `timings` of its summary.

A run's fixed costs (imports, model builds, the export) dominate on small
folders; timing each stage says where the seconds go.
"""

from __future__ import annotations

import contextlib
import time

# When the package was first imported: what follows it until a run starts is
# the cost of importing TensorFlow, Keras and the package itself.
IMPORTED = time.perf_counter()


class Timings:
    """Seconds spent in each named stage, summed over repeated stages.

    Example:

    >>> timings = Timings()
    >>> with timings.stage("export"):
    ...     pass
    >>> list(timings.seconds)
    ['export']
    """

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def stage(self, name: str):
        """Adds the time spent in the `with` block to stage `name`."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed

    def add(self, name: str, seconds: float) -> None:
        """Adds `seconds` to stage `name`."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def summary(self) -> dict:
        """`{stage: seconds}` rounded to 0.01 s, in the order stages first ran."""
        return {name: round(value, 2) for name, value in self.seconds.items()}
