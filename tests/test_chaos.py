"""The chaos test (cnnbench/chaos.py) inside the suite: two studies and two sweep workers
on one fresh store, two or three of them SIGKILLed at random moments and started again,
and then every study and the sweep complete with nothing lost, doubled or left RUNNING.

A new seed each run, printed (pytest shows it with the failure); CNNBENCH_CHAOS_SEED=S
replays one. `make chaos` runs it alone.
"""

from __future__ import annotations

import os
import random

import pytest

from cnnbench.tools import chaos

BUDGET_S = 270  # the whole run, kills and restarts included (under 5 minutes on 2 shared cores)


@pytest.mark.slow
@pytest.mark.chaos
def test_random_kills_lose_nothing(tmp_path, data_root):
    seed = int(os.environ.get("CNNBENCH_CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    lines: list[str] = []

    def out(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    problems = chaos.run(seed, tmp_path / "chaos", budget=BUDGET_S, data_root=str(data_root), out=out)
    assert not problems, (f"chaos seed {seed} (replay: CNNBENCH_CHAOS_SEED={seed}, or python -m cnnbench.tools.chaos "
                          f"--seed {seed}):\n" + "\n".join(lines + problems))
