"""Progress events through files, for workers that share no queue with their supervisor
(Slurm array tasks on other nodes).

Each worker appends its events (the tuples `run/progress.py` describes) as JSON lines to
a file of its own, in a folder that every node and the supervisor reach (submitit's
folder, which a Slurm cluster must share anyway for its pickles). The supervisor's
`EventFiles` reads every file of that folder from where it left off, and serves the
events, with the lines the supervisor says itself, through the queue interface the
progress board reads (`get(timeout)` raising queue.Empty, `put`).

Chosen over tailing the tasks' stdout logs: the events arrive as the same tuples the
local and Ray workers send (bars per epoch, finished counts), with no parsing of lines
meant for people, and the logs stay what they are (submitit's and the worker's text).
"""

from __future__ import annotations

import collections
import json
import queue as queues
import time
from pathlib import Path
from typing import Any

SCAN_S = 0.5  # seconds between two looks at the files while nothing else comes


class EventFile:
    """A worker's end: `put` appends one event, whole, to its file."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)

    def put(self, event: tuple) -> None:
        line = json.dumps(list(event)) + "\n"  # one write: the reader takes whole lines only
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)


class EventFiles:
    """The supervisor's end: the events of every file in `folder` (set once the folder
    exists), and its own lines."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.own: queues.Queue = queues.Queue()
        self.offsets: dict[Path, int] = {}
        self.ready: collections.deque = collections.deque()

    def put(self, event: tuple) -> None:
        self.own.put(event)

    def get(self, timeout: float | None = None) -> tuple:
        """The next event, waiting up to `timeout` seconds; queue.Empty when none came."""
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            if not self.ready:
                self.scan()
            if self.ready:
                return self.ready.popleft()
            left = deadline - time.monotonic()
            if left <= 0:
                raise queues.Empty
            try:
                return self.own.get(timeout=min(left, SCAN_S))
            except queues.Empty:
                continue

    def scan(self) -> None:
        """New whole lines of every file, in the order of the files' names."""
        if self.folder is None or not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*.jsonl")):
            start = self.offsets.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # a line still being written waits for the next look
            if not end:
                continue
            self.offsets[path] = start + end
            for line in data[:end].splitlines():
                event = parse(line)
                if event is not None:
                    self.ready.append(event)


def parse(line: bytes) -> tuple | None:
    """One event back as the tuple it was (None for a line that is not one)."""
    try:
        value: Any = json.loads(line)
    except ValueError:
        return None
    return tuple(value) if isinstance(value, list) and value else None
