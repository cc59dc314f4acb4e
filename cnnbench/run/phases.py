"""A study's or sweep's phase table (util/timings.py, `--timings`): taken from its start
(the process's, for the first one of a process: the interpreter and imports included),
shown at its end and logged as metrics on its parent run: `timings/<section>/<phase>`
(seconds, summed over its processes), `timings/<counter>` and `timings/wall`."""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

from mlflow.entities import Metric

from cnnbench.track.schema import METRIC_TIMINGS_WALL, PREFIX_TIMINGS
from cnnbench.util import timings


class Timed:
    """The timers of one study or sweep: on with `on` (or CNNBENCH_TIMINGS=1)."""

    def __init__(self, on: bool = False) -> None:
        if on:
            timings.enable()
        self.on = timings.enabled()
        self.t0 = time.perf_counter()
        self.before = timings.snapshot()
        self.startup = timings.take_startup() if self.on else 0.0
        if self.startup:  # after the snapshot: it belongs to this table
            timings.add(timings.STARTUP, self.startup)

    def report(self, tracker: Any, parent: str, title: str) -> str:
        """The table (empty when the timers are off), its figures logged on `parent`."""
        if not self.on:
            return ""
        snap = timings.since(self.before)
        wall = time.perf_counter() - self.t0 + self.startup
        now = int(time.time() * 1000)
        metrics = [Metric(PREFIX_TIMINGS + key(name), float(value), now, 0)
                   for name, value in timings.figures(snap).items()]
        metrics.append(Metric(METRIC_TIMINGS_WALL, wall, now, 0))
        with contextlib.suppress(Exception):  # the table is shown even where the store cannot take it
            tracker.client.log_batch(parent, metrics=metrics, synchronous=True)
        return timings.table(snap, title, wall)


def key(name: str) -> str:
    """A phase's name as MLflow takes it in a key (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w.\- /]", "_", name)
