"""The order of the EPICS sink's puts, which feedback plans rely on (``cdinn_stream.apps.plans.latest``):
the run told before its frames (again when the IOC comes back mid-run), ``SEQ_NUM`` 0 before
``RUN_UID`` changes, a frame's values before its ``SEQ_NUM``. The puts are recorded, not sent:
the same over Channel Access is tested in tests/system (test_epics_delivery, test_feedback)."""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

from cdinn_stream.live.blocks import FrameBlock, ResultBlock

pytestmark = pytest.mark.skipif(importlib.util.find_spec("epics") is None, reason="needs pyepics")


def _result(run: str, start: int, n: int) -> ResultBlock:
    seq = np.arange(start, start + n)
    frames = FrameBlock(run, "primary", seq, seq * 1.0, np.zeros((n, 8, 8), np.float32), np.zeros((n, 2), int),
                        np.zeros((n, 2), int), np.full(n, time.monotonic()))
    amp = np.zeros((n, 8, 8), np.float32)
    amp[:, 2:6, 2:6] = 1.0
    return ResultBlock(frames, amp, np.zeros((n, 8, 8), np.float32), np.zeros(n), np.zeros(n), 0, "",
                       {"peak_row": np.arange(n, dtype=np.float32), "strain_rms": np.ones(n, np.float32)})


def _recording_sink(reachable: list[bool]):
    from cdinn_stream.sinks import EpicsSink

    sink = EpicsSink("REC:")
    puts: list[tuple[str, object]] = []

    def connect() -> bool:
        if reachable[0]:
            sink._pvs = sink._pvs or {}
        return reachable[0]

    sink._connect = connect
    sink._put = lambda name, value: puts.append((name, value))
    sink._confirm = lambda: puts.append(("confirm", None))
    return sink, puts


def test_a_frames_values_go_before_its_seq_num_and_a_run_is_told_before_its_frames():
    sink, puts = _recording_sink([True])
    sink.open_run("run-1", {})
    sink.write(_result("run-1", 1, 3))
    names = [n for n, _ in puts if n != "confirm"]
    assert names[:4] == ["SEQ_NUM", "FRAMES", "RUN_UID", "STATUS"] and dict(puts)["RUN_UID"] == "run-1"
    assert names[-1] == "SEQ_NUM" and puts[-2] == ("SEQ_NUM", 3)
    assert names.index("PEAK_ROW") < len(names) - 1 and names.index("STRAIN_RMS") < len(names) - 1
    assert ("SEQ_NUM", 0) in puts[: puts.index(("RUN_UID", "run-1"))]


def test_an_ioc_that_answers_only_mid_run_is_told_the_run_before_the_next_frame():
    reachable = [False]
    sink, puts = _recording_sink(reachable)
    sink.open_run("run-late", {})
    sink.write(_result("run-late", 1, 3))
    assert puts == [] and sink.frames_undelivered == 3
    reachable[0] = True
    sink.write(_result("run-late", 4, 3))
    names = [n for n, _ in puts if n != "confirm"]
    assert names[:4] == ["SEQ_NUM", "FRAMES", "RUN_UID", "STATUS"], names
    assert ("RUN_UID", "run-late") in puts and puts[-2] == ("SEQ_NUM", 6)
    assert sink.frames_delivered == 3
    puts.clear()
    sink.write(_result("run-late", 7, 1))  # told already: not again
    assert "RUN_UID" not in [n for n, _ in puts]
