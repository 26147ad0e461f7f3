"""The IOC's PVs update; a missing IOC costs one warning; replay from Tiled reproduces the live
results; documents from a bluesky-0MQ-proxy are reconstructed out of process."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import uuid

import numpy as np
import pytest
from bluesky.plans import scan
from conftest import wait_for

from cdinn_stream.apps.replay import replay_documents, run_documents
from cdinn_stream.lab.sim import BCDIFrameSource, OperandoCrystal, make_detector, make_motors
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.sinks import EpicsSink, TiledSink, read_frame_info

from .conftest import publish_probe


def _detector(width=96):
    peak, strain = make_motors(width / 2)
    source = BCDIFrameSource(OperandoCrystal(32, seed=4), frame_shape=(96, width), peak_motor=peak,
                             strain_motor=strain)
    return make_detector(source), peak, strain


def test_ioc_pvs_update(RE, model, ioc):
    import epics

    sink = EpicsSink(ioc.prefix)
    results = []

    class Keep:
        def open_run(self, uid, start): pass
        def write(self, r): results.append(r)
        def close_run(self, uid, s): pass

    cb = ReconstructionCallback(model=model, sinks=[Keep(), sink])
    RE.subscribe(cb)
    det, peak, strain = _detector()
    (uid,) = RE(scan([det], strain, 0, 1, peak, 40, 56, 9))
    assert cb.flush(30)
    cb.close()
    p = ioc.prefix
    assert epics.caget(p + "FRAMES", timeout=5) == 9
    assert epics.caget(p + "SEQ_NUM", timeout=5) == 9
    assert epics.caget(p + "RUN_UID", timeout=5) == uid
    assert epics.caget(p + "STATUS", timeout=5) == "done success"
    h, w = epics.caget(p + "SHAPE", timeout=5)
    amp = epics.caget(p + "AMPLITUDE", timeout=5)[: h * w].reshape(h, w)
    np.testing.assert_allclose(amp, results[-1].amplitude[-1], atol=1e-6)
    assert epics.caget(p + "SUPPORT_SIZE", timeout=5) == int((results[-1].amplitude[-1] > 0.1).sum())
    assert epics.caget(p + "FRAME_RATE", timeout=5) > 0
    chi2 = np.concatenate([r.chi2 for r in results])  # the trust figure: the latest frame's and the run's median
    assert epics.caget(p + "CHI2", timeout=5) == pytest.approx(chi2[-1], rel=1e-6)
    assert epics.caget(p + "CHI2_MEDIAN", timeout=5) == pytest.approx(np.median(chi2), rel=1e-6)
    assert epics.caget(p + "MODEL_VERSION", timeout=5) == 0


def test_missing_ioc_warns_once_and_goes_on(RE, model, caplog):
    kept = []

    class Keep:
        def open_run(self, uid, start): pass
        def write(self, r): kept.extend(r.frames.seq_nums.tolist())
        def close_run(self, uid, s): pass

    cb = ReconstructionCallback(model=model, sinks=[EpicsSink("NOBODY:", timeout=0.2), Keep()])
    RE.subscribe(cb)
    det, peak, strain = _detector()
    with caplog.at_level(logging.WARNING):
        RE(scan([det], strain, 0, 1, peak, 40, 56, 6))
        assert cb.flush(30)
    cb.close()
    assert kept == [1, 2, 3, 4, 5, 6]
    assert caplog.text.count("no EPICS IOC answers") == 1


def test_replay_reproduces_live(RE, model, tiled_client):
    from bluesky_tiled_plugins import TiledWriter

    cb = ReconstructionCallback(model=model, sinks=[TiledSink(tiled_client)])
    RE.subscribe(TiledWriter(tiled_client))
    RE.subscribe(cb)
    det, peak, strain = _detector()
    (uid,) = RE(scan([det], strain, 0, 1, peak, 40, 56, 12))
    assert cb.flush(30)
    cb.close()
    replay = ReconstructionCallback(model=model, sinks=[TiledSink(tiled_client, parent="cdinn-replay")])
    n = replay_documents(run_documents(tiled_client, uid), replay)
    assert replay.flush(30)
    replay.close()
    assert n == 4  # start, descriptor, one event page of the 12 events, stop
    live, again = tiled_client["cdinn"][uid], tiled_client["cdinn-replay"][uid]
    live_info, again_info = read_frame_info(live), read_frame_info(again)
    for key in ("seq_num", "peak", "crop_origin"):
        np.testing.assert_array_equal(again_info[key], live_info[key], err_msg=key)
    for key in ("amplitude", "phase"):  # the frames may be batched differently: float32 rounding
        np.testing.assert_allclose(again[key].read(), live[key].read(), rtol=0, atol=1e-5, err_msg=key)
    assert again.metadata["complete"]
    # a second replay replaces the first one's results
    replay = ReconstructionCallback(model=model, sinks=[TiledSink(tiled_client, parent="cdinn-replay")])
    replay_documents(run_documents(tiled_client, uid), replay)
    assert replay.flush(30)
    replay.close()
    again = tiled_client["cdinn-replay"][uid]
    np.testing.assert_array_equal(read_frame_info(again)["seq_num"], live_info["seq_num"])


def test_serve_from_a_0mq_proxy(RE, model):
    import asyncio

    from bluesky.callbacks.zmq import Publisher, RemoteDispatcher
    from conftest import free_port

    pin, pout = free_port(), free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "bluesky.commandline.zmq_proxy", "--in-address",
                              f"tcp://127.0.0.1:{pin}", "--out-address", f"tcp://127.0.0.1:{pout}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kept = []

        class Keep:
            def open_run(self, uid, start): pass
            def write(self, r): kept.extend(r.frames.seq_nums.tolist())
            def close_run(self, uid, s): kept.append("stop")

        cb = ReconstructionCallback(model=model, sinks=[Keep()])
        probes: set[str] = set()
        arrived: list[str] = []

        def route(name, doc):  # probe runs (see publish_probe) stop here, the rest goes to the pipeline
            uid = doc.get("uid") if name == "start" else doc.get("run_start")
            if uid in probes:
                arrived.append(uid)
            else:
                cb(name, doc)

        dispatcher = RemoteDispatcher(f"tcp://127.0.0.1:{pout}")
        dispatcher.subscribe(route)

        def run():
            try:
                dispatcher.start()
            except asyncio.CancelledError:
                pass

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        publisher = Publisher(f"tcp://127.0.0.1:{pin}")
        try:
            def probe():  # proxy start-up and both connections (slow joiners): until a probe run comes through
                uid = str(uuid.uuid4())
                probes.add(uid)  # before it is sent: route() must know it
                publish_probe(publisher, uid)
                return arrived

            wait_for(probe, timeout=30, interval=0.1, what="a probe run through the proxy to the dispatcher")
            RE.subscribe(publisher)
            det, peak, strain = _detector()
            RE(scan([det], strain, 0, 1, peak, 40, 56, 8))
            wait_for(lambda: "stop" in kept, timeout=20, what="the end of the run from the dispatcher")
        finally:
            dispatcher.loop.call_soon_threadsafe(dispatcher._task.cancel)
            thread.join(5)
            publisher.close()
            cb.close()
        assert kept == [1, 2, 3, 4, 5, 6, 7, 8, "stop"]
    finally:
        proxy.terminate()
        proxy.wait(5)
