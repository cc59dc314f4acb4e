"""One execution at a time writes `results/<name>/`.

Two executions that would write one results folder at once must not mix their records.
The process that leads an execution holds a lock file beside the folder
(`<results>/.<name>.lock`, held with flock for its whole life, so the operating system
drops it when the process dies) with the execution's identity in it: the same study with
the same settings (its Optuna study) joins the execution that holds it; any other is
refused in one line before it creates anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from cnnbench.errors import ConfigError
from cnnbench.util import processes


class ResultsOwner:
    def __init__(self, out_dir: Path, identity: str, what: str) -> None:
        """`identity`: the execution's (an Optuna study name with its settings); `what`:
        the study or sweep, in words, for the message."""
        self.path = out_dir.parent / f".{out_dir.name}.lock"
        self.out_dir, self.identity, self.what = out_dir, identity, what
        self.fd: int | None = None

    def take(self) -> bool:
        """Hold the lock (True), or join the same execution that holds it (False); another
        execution's lock is a ConfigError naming the folder and its holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder(fd)
            for _ in range(20):  # a holder between its truncate and its write: read again
                if holder:
                    break
                time.sleep(0.05)
                holder = self.holder(fd)
            os.close(fd)
            if holder.get("identity") == self.identity:
                return False
            raise ConfigError(f"{self.out_dir}: another execution of {self.what} with other settings is writing it "
                              f"(pid {holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to end, or "
                              "give this one another --results-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"identity": self.identity, "host": processes.host(), "pid": os.getpid()}).encode())
        self.fd = fd
        return True

    @staticmethod
    def holder(fd: int) -> dict:
        with contextlib.suppress(OSError, ValueError):
            os.lseek(fd, 0, os.SEEK_SET)
            return json.loads(os.read(fd, 4096).decode() or "{}")
        return {}

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # drops the lock; the file stays (removing it would race a waiting opener)
            self.fd = None
