"""Which MLflow runs are still kept going by a live process: heartbeats and orphans.

Every process that keeps a run RUNNING (a worker its trial's child run, the process that
leads an execution its parent run) stamps it every HEARTBEAT_S seconds with a tag
`cnnbench.heartbeat = "SECONDS HOST BOOT PID"`, from one thread per process. A RUNNING
run is an orphan, to be closed KILLED by the next execution that looks (whatever its
state folder or spec), when its last stamp came from a process of this machine that no
longer exists, or when its last stamp (any machine's) is older than ORPHAN_GRACE_S. A
run without a stamp (cnnbench before 0.3) counts its creator's pid and its start time.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from cnnbench.track.schema import TAG_BOOT, TAG_HEARTBEAT, TAG_HOST, TAG_PID
from cnnbench.util import processes

HEARTBEAT_S = 30.0  # seconds between a run's stamps
ORPHAN_GRACE_S = 300.0  # a run of another machine without a stamp for this long is an orphan


def stamp(now: float | None = None) -> str:
    """This process's heartbeat stamp."""
    return f"{now if now is not None else time.time():.0f} {processes.host()} {processes.boot_id()} {os.getpid()}"


def last_stamp(run: Any) -> tuple[float, str, str, int | None]:
    """(seconds, host, boot, pid) of a run's last stamp, or of its creation."""
    tags = run.data.tags
    parts = tags.get(TAG_HEARTBEAT, "").split()
    if len(parts) == 4 and parts[3].isdigit():
        return float(parts[0]), parts[1], parts[2], int(parts[3])
    pid = tags.get(TAG_PID, "")
    return (run.info.start_time or 0) / 1000.0, tags.get(TAG_HOST, ""), tags.get(TAG_BOOT, ""), \
        int(pid) if pid.isdigit() else None


def orphaned(run: Any, now: float | None = None) -> bool:
    """Whether a RUNNING run has lost the process that kept it going (see the module)."""
    seconds, host, boot, pid = last_stamp(run)
    now = time.time() if now is None else now
    if host == processes.host() and boot in ("", processes.boot_id()) and pid is not None:
        return pid != os.getpid() and not processes.alive(pid)  # a live process here keeps stamping
    return now - seconds > ORPHAN_GRACE_S


class Heartbeat:
    """One thread per process stamping the runs this process keeps going."""

    def __init__(self) -> None:
        self.runs: dict[str, Any] = {}  # run id -> the MLflow client that writes it
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()

    def add(self, client: Any, run_id: str, *, stamped: bool = False) -> None:
        """Keep stamping `run_id`; `stamped`: it was created with this process's stamp (one
        write fewer), else it is stamped now."""
        with self.lock:
            self.runs[run_id] = client
            if self.thread is None:
                self.thread = threading.Thread(target=self.beat, name="mlflow-heartbeat", daemon=True)
                self.thread.start()
        if not stamped:
            self.stamp(client, run_id)

    def discard(self, run_id: str) -> None:
        with self.lock:
            self.runs.pop(run_id, None)

    def beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self.lock:
                runs = list(self.runs.items())
            for run_id, client in runs:
                self.stamp(client, run_id)

    @staticmethod
    def stamp(client: Any, run_id: str) -> None:
        try:
            client.set_tag(run_id, TAG_HEARTBEAT, stamp())
        except Exception:  # a hiccup of the store: the next beat tries again
            pass


_heartbeat: Heartbeat | None = None


def heartbeat() -> Heartbeat:
    """This process's heartbeat (a new one in a forked child)."""
    global _heartbeat
    if _heartbeat is None or _heartbeat.pid != os.getpid():
        _heartbeat = Heartbeat()
    return _heartbeat
