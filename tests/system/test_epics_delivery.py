"""The EPICS sink counts only what reached the IOC, and says how to point Channel Access at it;
``cdinn-stream ioc`` prints the settings a client needs, and they work."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid

import numpy as np

from cdinn_stream.live.blocks import FrameBlock, ResultBlock, RunMarker
from cdinn_stream.live.publish import SinkThread
from cdinn_stream.sinks import EpicsSink

VARIABLES = ("EPICS_CA_ADDR_LIST", "EPICS_CA_AUTO_ADDR_LIST", "EPICS_CA_SERVER_PORT")


def _result(run: str, start: int, n: int, size: int = 8) -> ResultBlock:
    seq = np.arange(start, start + n)
    frames = FrameBlock(run, "primary", seq, seq * 1.0, np.zeros((n, size, size), np.float32), np.zeros((n, 2), int),
                        np.zeros((n, 2), int), np.full(n, time.monotonic()))
    amp = np.zeros((n, size, size), np.float32)
    amp[:, 2:6, 2:6] = 1.0
    return ResultBlock(frames, amp, np.zeros((n, size, size), np.float32), np.zeros(n), np.zeros(n))


def _run_through(sink: EpicsSink, batches: int = 4, per_batch: int = 5) -> dict:
    thread = SinkThread(sink)
    thread.put(RunMarker("open", "run-1", {}))
    for i in range(batches):
        thread.put(_result("run-1", 1 + i * per_batch, per_batch))
        assert thread.drain(30)  # one write per batch
    thread.put(RunMarker("close", "run-1", {"stop": {"exit_status": "success"}}))
    thread.close()
    return thread.stats.summary()


def test_without_a_reachable_ioc_nothing_counts_as_written(ioc, caplog):
    """``ioc``: Channel Access is set up for this process's IOCs; nobody serves this prefix."""
    sink = EpicsSink(f"NOBODY{uuid.uuid4().hex[:6]}:", timeout=0.2)
    with caplog.at_level(logging.WARNING, logger="cdinn_stream"):
        stats = _run_through(sink)
    assert stats["frames_written"] == 0 and stats["writes"] == 0, stats
    assert stats["frames_dropped"] == 20 and stats["errors"] >= 4, stats
    assert sink.frames_delivered == 0 and sink.frames_undelivered == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    for variable in VARIABLES:
        assert variable in warnings[0], warnings[0]


def test_with_the_ioc_every_frame_counts_as_delivered(ioc):
    import epics

    sink = EpicsSink(ioc.prefix)
    stats = _run_through(sink)
    assert stats["frames_written"] == 20 and stats["frames_dropped"] == 0 and stats["errors"] == 0, stats
    assert sink.frames_delivered == 20 and sink.frames_undelivered == 0
    assert epics.caget(ioc.prefix + "FRAMES", timeout=5) == 20
    assert epics.caget(ioc.prefix + "SEQ_NUM", timeout=5) == 20


def test_the_ioc_command_prints_what_a_client_needs(tmp_path):
    """Start ``cdinn-stream ioc`` on a port of its own, take the ``export`` line it prints, and
    read a PV from a fresh process with exactly those settings."""
    from conftest import free_port

    port, prefix = free_port(), f"P{uuid.uuid4().hex[:6]}:"
    bare = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    ioc = subprocess.Popen([sys.executable, "-m", "cdinn_stream", "ioc", "--prefix", prefix, "--port", str(port)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=bare, cwd=tmp_path)
    try:
        printed = []
        for line in ioc.stdout:
            printed.append(line)
            if line.strip().startswith("export "):
                break
        text = "".join(printed)
        for variable in VARIABLES:
            assert variable in text, text
        settings = dict(item.split("=", 1) for item in text.strip().splitlines()[-1].split()[1:])
        assert settings["EPICS_CA_SERVER_PORT"] == str(port), settings
        read = f"import epics; print(epics.caget('{prefix}STATUS', timeout=20))"
        client = subprocess.run([sys.executable, "-c", read], capture_output=True, text=True,
                                env={**bare, **settings}, timeout=120, cwd=tmp_path)
        assert client.stdout.strip() == "idle", (client.stdout, client.stderr[-2000:])
    finally:
        ioc.terminate()
        ioc.wait(20)
