"""The bounded worker primitive shared by the engine, the sink threads and the refiner."""

from __future__ import annotations

import threading

from cdinn_stream.live.worker import Worker


class Collect(Worker):
    idle_interval = 0.05

    def __init__(self, gate: threading.Event):
        super().__init__("test-worker")
        self.gate, self.seen, self.idles = gate, [], 0
        self._start()

    def put(self, item) -> None:
        with self._cond:
            self._queue.append(item)
            self._cond.notify_all()

    def _handle(self, items: list) -> None:
        self.gate.wait(10)
        if "boom" in items:
            raise RuntimeError("boom")
        self.seen.extend(items)

    def _idle(self) -> None:
        self.idles += 1


def test_drain_waits_for_the_round_in_hand_and_close_stops_the_thread():
    gate = threading.Event()
    w = Collect(gate)
    w.put(1)
    assert w.wait_while(lambda: not w.busy, timeout=5)  # the round was taken ...
    assert not w.drain(timeout=0.1)  # ... and is not handled while the gate is shut
    gate.set()
    assert w.drain(timeout=5) and w.seen == [1]
    assert w.close(timeout=5) and not w.alive


def test_a_failing_round_is_logged_and_the_thread_goes_on(caplog):
    gate = threading.Event()
    gate.set()
    w = Collect(gate)
    w.put("boom")
    assert w.drain(timeout=5)
    w.put(2)
    assert w.drain(timeout=5) and w.seen == [2]
    assert "failed" in caplog.text
    w.close()


def test_idle_is_called_while_nothing_comes_and_drain_fails_once_the_thread_is_gone():
    gate = threading.Event()
    gate.set()
    w = Collect(gate)
    assert w.wait_while(lambda: w.idles < 2, timeout=5)
    w.close()
    w.put(3)  # nobody serves the queue any more
    assert not w.drain(timeout=1)
