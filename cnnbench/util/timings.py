"""Where a study's wall time goes: phase timers, on with `CNNBENCH_TIMINGS=1` (or `--timings`,
`timings=True` in the API), off by default.

Any layer times a stretch with `with timings.phase("group/steps"): ...`. Phases nest and
count exclusively: while an inner phase runs, the outer one is paused, so a thread's phases
add up to its wall time and no second is counted twice. Names are `section/what`; a
section's rows are shown together, in the order they first ran. The background writer's
phases (`writer/...`) run on its own thread, beside the training, and are shown as such;
where its jobs run in the training thread instead (the CPU's way), they are `bookkeeping/...`.
`count(name)` counts events (SQLite commits, say) instead of seconds.

Off, `phase` returns one shared null context and `add` and `count` return at once: a
function call and a test of one flag, cheap enough for an epoch's loop (not for a step's).
A worker process inherits the switch through the environment; it sends its `snapshot`
to the process that started it, which `merge`s it (summed over processes).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Iterator

ENV = "CNNBENCH_TIMINGS"
WRITER = "writer/"  # the section of the background writer's phases (util/background.py)
IN_THREAD = "bookkeeping/"  # ... and of the same jobs where they run in the handing thread (the CPU's way)

_on = os.environ.get(ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
_lock = threading.Lock()
_seconds: dict[str, float] = {}  # phase -> seconds, in the order phases first ran
_calls: dict[str, int] = {}  # phase -> times it ran
_counts: dict[str, int] = {}  # counter -> events
_processes = 1  # processes whose figures are summed here
_local = threading.local()  # per thread: the stack of running phases, [name, clock] each
_NULL = contextlib.nullcontext()
_startup: list[float] = []  # seconds from the process's start to `note_start`, until taken
STARTUP = "start/interpreter and imports"


def enabled() -> bool:
    return _on


def enable(on: bool = True) -> None:
    """Timers on (or off) in this process and in the worker processes it starts later."""
    global _on
    _on = on
    if on:
        os.environ[ENV] = "1"
    else:
        os.environ.pop(ENV, None)


def phase(name: str) -> Any:
    """A context manager that adds the time spent inside it to `name` (exclusive of
    inner phases). Off: a shared null context."""
    return _phase(name) if _on else _NULL


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    now = time.perf_counter()
    if stack:  # the outer phase pauses
        outer = stack[-1]
        add(outer[0], now - outer[1], calls=0)
    frame = [name, now]
    stack.append(frame)
    try:
        yield
    finally:
        end = time.perf_counter()
        stack.pop()
        add(name, end - frame[1])
        if stack:
            stack[-1][1] = end  # the outer phase goes on from here


def add(name: str, seconds: float, calls: int = 1) -> None:
    """`seconds` more for phase `name` (`calls`: how many times it ran)."""
    if not _on:
        return
    with _lock:
        _seconds[name] = _seconds.get(name, 0.0) + seconds
        _calls[name] = _calls.get(name, 0) + calls


def count(name: str, n: int = 1) -> None:
    """`n` more events of counter `name`."""
    if not _on:
        return
    with _lock:
        _counts[name] = _counts.get(name, 0) + n


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc), None where that cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def note_start() -> None:
    """The process's start-up ends here (the API is imported): its length is kept, to be
    shown once, as STARTUP, by the first study or sweep of the process that times itself."""
    if not _startup:
        _startup.append(process_seconds() or 0.0)


def take_startup() -> float:
    """The start-up's seconds the first time (0 afterwards, and where it was not noted)."""
    return _startup.pop() if _startup and _startup[0] >= 0 else 0.0


def snapshot() -> dict[str, Any]:
    """Every figure so far (plain values: it travels between processes)."""
    with _lock:
        return {"seconds": dict(_seconds), "calls": dict(_calls), "counts": dict(_counts), "processes": _processes}


def merge(other: dict[str, Any]) -> None:
    """Another process's `snapshot`, added to this one's."""
    global _processes
    with _lock:
        for name, value in other["seconds"].items():
            _seconds[name] = _seconds.get(name, 0.0) + value
        for name, value in other["calls"].items():
            _calls[name] = _calls.get(name, 0) + value
        for name, value in other["counts"].items():
            _counts[name] = _counts.get(name, 0) + value
        _processes += other.get("processes", 1)


def since(before: dict[str, Any]) -> dict[str, Any]:
    """What happened after `before` (a snapshot): this snapshot less that one."""
    now = snapshot()
    ran = [k for k, n in now["calls"].items() if n - before["calls"].get(k, 0)]
    return {"seconds": {k: now["seconds"][k] - before["seconds"].get(k, 0.0) for k in ran},
            "calls": {k: now["calls"][k] - before["calls"].get(k, 0) for k in ran},
            "counts": {k: v - before["counts"].get(k, 0) for k, v in now["counts"].items()
                       if v - before["counts"].get(k, 0)},
            "processes": now["processes"] - before["processes"] + 1}


def figures(snap: dict[str, Any]) -> dict[str, float]:
    """A snapshot as flat figures: each phase's seconds under its name, each counter's
    events under its name (what goes to MLflow as metrics, each under a prefix)."""
    return {**snap["seconds"], **{name: float(n) for name, n in snap["counts"].items()}}


def table(snap: dict[str, Any], title: str, wall: float | None = None) -> str:
    """The snapshot as a text table: per section its phases (seconds, share of `wall`,
    times run), the background writer's apart, then the counters."""
    seconds, calls = snap["seconds"], snap["calls"]
    lines = [f"where the time went: {title}" + (f" ({snap['processes']} processes, summed)"
                                                if snap.get("processes", 1) > 1 else "")]
    lines.append(f"  {'phase':<44} {'seconds':>9} {'share':>6} {'times':>6}")
    main = {k: v for k, v in seconds.items() if not k.startswith(WRITER)}
    background = {k: v for k, v in seconds.items() if k.startswith(WRITER)}
    shown = sum(main.values())
    total = wall if wall else shown
    sections: dict[str, list[str]] = {}
    for name in main:
        sections.setdefault(name.split("/", 1)[0], []).append(name)
    for head, names in sections.items():
        lines.append(f"  {head}")
        for name in names:
            value, label = main[name], name.split("/", 1)[-1]
            lines.append(f"    {label:<42} {value:>9.3f} {value / total:>6.1%} {calls.get(name, 0):>6}")
    if wall:
        lines.append(f"  {'(outside every phase)':<44} {max(0.0, wall - shown):>9.3f} "
                     f"{max(0.0, wall - shown) / total:>6.1%}")
        lines.append(f"  {'wall time':<44} {wall:>9.3f}")
    if background:
        lines.append("  background writer (beside the training, not on its path)")
        for name, value in background.items():
            lines.append(f"    {name[len(WRITER):]:<42} {value:>9.3f} {'':>6} {calls.get(name, 0):>6}")
    for name, n in snap["counts"].items():
        lines.append(f"  {name:<44} {n:>9d}")
    return "\n".join(lines)


def reset() -> None:
    """Every figure back to nothing (tests)."""
    global _processes
    with _lock:
        _seconds.clear()
        _calls.clear()
        _counts.clear()
        _processes = 1
