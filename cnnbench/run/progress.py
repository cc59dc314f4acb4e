"""What a person watching sees while worker processes train: one line per running trial,
with its epoch and latest accuracy, and a count of finished trials.

Workers send events through a queue (`("epoch", worker, label, epoch, epochs, metric,
value)`, `("line", worker, text, ended_label)`, and at their end `("timings", worker,
snapshot)` with timings on); the parent's board shows them (and adds the timings to its
own). On a
terminal each running trial is a progress bar of its epochs, gone when the trial ends,
under a bar of finished trials; elsewhere (a log, CI) every event is a plain line.
"""

from __future__ import annotations

import contextlib
import math
import queue as queues
import sys
import threading
import time
from typing import Any, Iterator, TextIO

from tqdm.auto import tqdm

from cnnbench.util import timings


class Board:
    def __init__(self, title: str, total: int, done: int = 0, *, stream: TextIO | None = None) -> None:

        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.tqdm = tqdm
        self.bars: dict[str, Any] = {}
        self.overall = tqdm(total=total, initial=done, desc=title, unit="trial", dynamic_ncols=True,
                            file=self.stream, disable=not self.tty)

    def handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "epoch":
            _, worker, label, epoch, epochs, metric, value = event
            shown = f"{metric} {value:.2f}" if isinstance(value, float) and math.isfinite(value) else "no score"
            if not self.tty:
                print(f"[{worker}] {label}: epoch {epoch}/{epochs}, {shown}", file=self.stream, flush=True)
                return
            bar = self.bars.get(label)
            if bar is None:
                bar = self.bars[label] = self.tqdm(total=epochs, desc=f"[{worker}] {label}", unit="epoch",
                                                   leave=False, dynamic_ncols=True, file=self.stream)
            bar.n = epoch
            bar.set_postfix_str(shown, refresh=False)
            bar.refresh()
        elif kind == "timings":
            timings.merge(event[2])
        elif kind == "line":
            _, _, text, ended = event
            if ended is not None:
                bar = self.bars.pop(ended, None)
                if bar is not None:
                    bar.close()
                self.overall.update(1)
            if self.tty:
                self.tqdm.write(text, file=self.stream)
            else:
                print(text, file=self.stream, flush=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
        self.overall.close()

    @contextlib.contextmanager
    def listening(self, events: Any, *, drain_s: float = 2.0) -> Iterator[None]:
        """Show the events of `events` (a multiprocessing queue) from a thread while the
        block runs (the workers' whole life: a worker whose queue is not read cannot exit);
        then what is left, for at most `drain_s` seconds."""
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                try:
                    self.handle(events.get(timeout=0.2))
                except queues.Empty:
                    continue
                except Exception:  # the queue is gone (a pipe closed, a Ray actor lost): no more lines
                    return

        thread = threading.Thread(target=pump, name="progress", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            # what is still in the pipe (a queue's feeder thread delivers late), bounded
            deadline = time.monotonic() + drain_s
            with contextlib.suppress(Exception):  # queue.Empty ends it; so does a queue that is gone
                while time.monotonic() < deadline:
                    self.handle(events.get(timeout=min(0.5, max(0.01, deadline - time.monotonic()))))
            self.close()
