"""Sink threads: a slow sink holds nobody up, results are merged into fewer writes, nothing is
lost silently."""

from __future__ import annotations

import threading
import time

import numpy as np
from conftest import wait_for

from cdinn_stream.live.blocks import FrameBlock, ResultBlock, RunMarker
from cdinn_stream.live.publish import SinkThread


def _result(run: str, start: int, n: int) -> ResultBlock:
    seq = np.arange(start, start + n)
    frames = FrameBlock(run, "primary", seq, seq * 1.0, np.zeros((n, 4, 4), np.float32), np.zeros((n, 2), int),
                        np.zeros((n, 2), int), np.full(n, time.monotonic()))
    return ResultBlock(frames, np.ones((n, 4, 4), np.float32), np.zeros((n, 4, 4), np.float32), np.zeros(n),
                       np.zeros(n))


def _first_write_blocked(t: SinkThread) -> None:
    """Put frames 1-3 and wait until the thread has taken them and is blocked in the write."""
    t.put(_result("r", 1, 3))
    wait_for(lambda: t.busy and t.queued_frames == 0, timeout=10, what="the sink thread blocked in its first write")


class ListSink:
    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.events: list = []
        self.gate, self.fail = gate, fail

    def open_run(self, run_uid, start):
        self.events.append(("open", run_uid))

    def write(self, result):
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise OSError("server went away")
        self.events.append(("write", list(result.frames.seq_nums)))

    def close_run(self, run_uid, summary):
        self.events.append(("close", run_uid))


def test_slow_sink_does_not_hold_up_a_fast_one_and_its_writes_are_merged():
    gate = threading.Event()
    slow, fast = SinkThread(ListSink(gate)), SinkThread(ListSink())
    for t in (slow, fast):
        t.put(RunMarker("open", "r", {}))
    for i in range(5):
        for t in (slow, fast):
            t.put(_result("r", 1 + 3 * i, 3))
    for t in (slow, fast):
        t.put(RunMarker("close", "r", {}))
    assert fast.drain(5)
    assert fast.sink.events[-1] == ("close", "r") and not slow.drain(0.2)
    gate.set()
    assert slow.drain(5)
    writes = [e[1] for e in slow.sink.events if e[0] == "write"]
    assert sum(writes, []) == list(range(1, 16)), "every frame once, in order"
    assert len(writes) < 5, "queued results are merged into fewer writes"
    assert slow.sink.events[0] == ("open", "r") and slow.sink.events[-1] == ("close", "r")
    assert slow.stats.frames_written == 15 and slow.stats.summary()["latency_p50_ms"] is not None
    slow.close()
    fast.close()


def test_a_sink_that_falls_behind_drops_counts_and_warns(caplog):
    gate = threading.Event()
    t = SinkThread(ListSink(gate), max_queued_frames=6)
    _first_write_blocked(t)
    for i in range(4):
        t.put(_result("r", 4 + 3 * i, 3))
    t.put(RunMarker("close", "r", {}))  # markers are never dropped
    gate.set()
    assert t.drain(5)
    assert t.stats.frames_dropped == 6 and t.stats.frames_written == 3 + 6
    assert "dropped 3 results of run r" in caplog.text
    assert t.sink.events[-1] == ("close", "r")
    t.close()


def test_a_failing_sink_is_logged_and_counted_and_goes_on(caplog):
    t = SinkThread(ListSink(fail=True))
    t.put(_result("r", 1, 2))
    t.put(RunMarker("close", "r", {}))
    assert t.drain(5)
    assert t.stats.errors == 1 and t.sink.events == [("close", "r")]
    assert "failed on run r seq_nums 1..2" in caplog.text
    t.close()


class ParkingSink(ListSink):
    """A sink with a cheap ``spill`` (as the Tiled sink's on-disk spool)."""

    def spill(self, result):
        self.events.append(("spill", list(result.frames.seq_nums)))


def test_a_sink_that_can_park_results_parks_them_instead_of_dropping(caplog):
    gate = threading.Event()
    t = SinkThread(ParkingSink(gate), max_queued_frames=40, max_write_frames=6, spill_frames=10)
    t.put(RunMarker("open", "r", {}))
    _first_write_blocked(t)
    for i in range(10):
        t.put(_result("r", 4 + 3 * i, 3))  # 30 frames behind
    t.put(RunMarker("close", "r", {}))
    gate.set()
    assert t.drain(5)
    handled = [e for e in t.sink.events if e[0] in ("write", "spill")]
    assert sum((e[1] for e in handled), []) == list(range(1, 34)), "every frame once, in order"
    assert t.stats.frames_dropped == 0 and t.stats.frames_spilled > 0
    assert t.stats.frames_spilled + t.stats.frames_written == 33
    assert handled[-1][0] == "write", "parking stops once the backlog is short again"
    assert "parking results on local disk from run r" in caplog.text
    assert t.sink.events[-1] == ("close", "r")
    t.close()


def test_writes_are_bounded_in_bytes_as_well_as_frames():
    """4x4 results are 128 bytes a frame (amplitude + phase): a 5-frame byte budget keeps the
    3-frame results apart, a large one merges them."""
    for budget, most in ((5 * 128, 3), (10**6, 12)):
        gate = threading.Event()
        t = SinkThread(ListSink(gate), max_write_bytes=budget)
        _first_write_blocked(t)
        for i in range(4):
            t.put(_result("r", 4 + 3 * i, 3))
        gate.set()
        assert t.drain(5)
        writes = [e[1] for e in t.sink.events if e[0] == "write"]
        assert sum(writes, []) == list(range(1, 16))
        assert max(len(w) for w in writes) == most, writes
        t.close()


def test_refined_results_waiting_together_go_out_in_one_write():
    from cdinn_stream.live.blocks import RefinedBlock

    class Refined(ListSink):
        def write_refined(self, block):
            self.events.append(("refined", list(block.frames.seq_nums), block.chi2_refined.tolist()))

    gate = threading.Event()
    t = SinkThread(Refined(gate))
    t.put(RunMarker("open", "r", {}))
    _first_write_blocked(t)  # everything below waits for one round
    for first in (4, 7, 10):
        t.put(_result("r", first, 3))
        r = _result("r", first, 2)
        t.put(RefinedBlock(r.frames, r.amplitude, r.phase, np.ones(2), np.full(2, float(first)), 50))
    t.put(RunMarker("close", "r", {}))
    gate.set()
    assert t.drain(5)
    t.close()
    refined = [e for e in t.sink.events if e[0] == "refined"]
    assert refined == [("refined", [4, 5, 7, 8, 10, 11], [4.0, 4.0, 7.0, 7.0, 10.0, 10.0])]
    assert t.sink.events[-1] == ("close", "r")
