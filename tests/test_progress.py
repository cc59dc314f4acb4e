"""The progress board: what a person sees while worker processes train."""

from __future__ import annotations

import io
import multiprocessing

from cnnbench.run.progress import Board


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


EVENTS = [("epoch", "w0", "lr=0.01 seed=0", 1, 3, "test/acc", 91.25),
          ("epoch", "w1", "lr=0.1 seed=0", 1, 3, "test/acc", float("nan")),
          ("epoch", "w0", "lr=0.01 seed=0", 2, 3, "test/acc", 95.5),
          ("line", "w0", "[w0] lr=0.01 seed=0: finished, test acc 96.00%", "lr=0.01 seed=0")]


def test_in_a_log_every_event_is_a_line():
    out = io.StringIO()
    board = Board("study lr", 2, stream=out)
    for event in EVENTS:
        board.handle(event)
    board.close()
    assert out.getvalue().splitlines() == [
        "[w0] lr=0.01 seed=0: epoch 1/3, test/acc 91.25", "[w1] lr=0.1 seed=0: epoch 1/3, no score",
        "[w0] lr=0.01 seed=0: epoch 2/3, test/acc 95.50", "[w0] lr=0.01 seed=0: finished, test acc 96.00%"]


def test_on_a_terminal_one_bar_per_running_trial():
    out = Terminal()
    board = Board("study lr", 2, stream=out)
    for event in EVENTS[:3]:
        board.handle(event)
    assert sorted(board.bars) == ["lr=0.01 seed=0", "lr=0.1 seed=0"]  # one line each
    assert board.bars["lr=0.01 seed=0"].n == 2 and board.overall.n == 0
    board.handle(EVENTS[3])
    assert sorted(board.bars) == ["lr=0.1 seed=0"] and board.overall.n == 1  # the finished one is gone
    board.close()
    assert "[w0] lr=0.01 seed=0: finished" in out.getvalue()


def test_events_from_another_process_reach_the_board():
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    out = io.StringIO()
    board = Board("study lr", 1, stream=out)
    with board.listening(events):
        for event in EVENTS:
            events.put(event)
    assert out.getvalue().count("\n") == 4
