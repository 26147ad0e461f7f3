"""Faults survived with nothing lost: a Tiled server that goes away mid-run (and comes back, or
not), an IOC that goes away, a model that fails on large batches."""

from __future__ import annotations

import time

import numpy as np
import torch
from bluesky.plans import scan
from conftest import wait_for

from cdinn_stream.apps.cli import main
from cdinn_stream.core.physics import wrap
from cdinn_stream.lab.sim import BCDIFrameSource, OperandoCrystal, make_detector, make_motors
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.nn.model import CDINN
from cdinn_stream.sinks import TiledSink, read_frame_info

from .conftest import wait_for_serve


class FaultAt:
    """A frame source that calls ``actions[k]()`` just before making frame ``k`` (1-based)."""

    def __init__(self, source, actions: dict):
        self.source, self.actions, self.count = source, actions, 0

    def __call__(self):
        self.count += 1
        if self.count in self.actions:
            self.actions[self.count]()
        return self.source()


def _scan(RE, cb, n, actions):
    peak, strain = make_motors(48.0)
    source = BCDIFrameSource(OperandoCrystal(32, seed=3), frame_shape=(96, 96), peak_motor=peak, strain_motor=strain)
    RE.subscribe(cb)
    (uid,) = RE(scan([make_detector(FaultAt(source, actions))], strain, 0, 1, peak, 40, 56, n))
    return uid


def _proxy_and_serve(url: str, key: str, *, batch_size: int):
    """A bluesky-0MQ-proxy and `cdinn-stream serve` behind it (writing to Tiled at ``url``), each in
    its own process; returns the proxy's input port and both processes."""
    import subprocess
    import sys

    from conftest import free_port

    pin, pout = free_port(), free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "bluesky.commandline.zmq_proxy", "--in-address",
                              f"tcp://127.0.0.1:{pin}", "--out-address", f"tcp://127.0.0.1:{pout}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve = subprocess.Popen([sys.executable, "-m", "cdinn_stream", "serve", "--zmq", f"tcp://127.0.0.1:{pout}",
                              "--tiled-out", url, "--api-key", key, "--precision", "fp32", "--batch-size",
                              str(batch_size)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return pin, proxy, serve


def _check_complete(client, uid, n):
    rec = client["cdinn"][uid]
    np.testing.assert_array_equal(read_frame_info(rec)["seq_num"], np.arange(1, n + 1))
    assert rec["amplitude"].read().shape == (n, 32, 32) and rec["phase"].read().shape == (n, 32, 32)
    assert rec.metadata["complete"] and rec.metadata["frames"] == n


def test_tiled_server_restarted_mid_run_loses_nothing(RE, model, tiled_process, quick_tiled_retries, tmp_path):
    sink = TiledSink(tiled_process.client(), spool_dir=tmp_path / "spool", retry_interval=0.2)
    cb = ReconstructionCallback(model=model, sinks=[sink], batch_size=4, max_latency=0.01)
    uid = _scan(RE, cb, 30, {8: tiled_process.stop, 20: tiled_process.start})
    assert cb.flush(120)
    assert sink.frames_spooled > 0, "the outage should have sent results to the spool"
    # the spool is empty once the server is back: the sink's idle probe writes what is left
    wait_for(lambda: not sink.spool.runs(), timeout=30, interval=0.2, what="the sink writing its spool back")
    cb.close()
    _check_complete(tiled_process.client(), uid, 30)
    assert cb.stats()["sinks"]["TiledSink"]["errors"] == 0


def test_tiled_server_gone_for_good_then_backfill(RE, model, tiled_process, quick_tiled_retries, tmp_path, capsys):
    spool = tmp_path / "spool"
    sink = TiledSink(tiled_process.client(), spool_dir=spool, retry_interval=0.2)
    cb = ReconstructionCallback(model=model, sinks=[sink], batch_size=4, max_latency=0.01)
    uid = _scan(RE, cb, 20, {5: tiled_process.stop})
    assert cb.flush(120)
    cb.close()
    assert sink.spool.runs() == [uid] and sink.spool.frames(uid) > 0
    tiled_process.start()
    assert main(["backfill", "--tiled", tiled_process.uri, "--api-key", tiled_process.api_key,
                 "--spool", str(spool)]) == 0
    assert '"runs_left": []' in capsys.readouterr().out
    _check_complete(tiled_process.client(), uid, 20)
    assert main(["backfill", "--tiled", tiled_process.uri, "--api-key", tiled_process.api_key,
                 "--spool", str(spool)]) == 0  # nothing left: says so


def test_a_stalled_zeromq_subscriber_costs_the_pipeline_nothing_and_knows_what_it_missed(RE, model):
    import zmq

    from cdinn_stream.apps.listen import Tally
    from cdinn_stream.sinks import ZmqPublisherSink, decode_message

    sink = ZmqPublisherSink("tcp://127.0.0.1:0", hwm=2, sndbuf=4096)  # small kernel buffers: the HWM decides
    stalled = zmq.Context.instance().socket(zmq.SUB)
    for opt, value in ((zmq.RCVHWM, 2), (zmq.RCVBUF, 4096), (zmq.SUBSCRIBE, b"cdinn.")):
        stalled.setsockopt(opt, value)
    stalled.connect(sink.address)
    # the subscription is in place once a heartbeat gets through
    wait_for(lambda: sink.heartbeat() or stalled.poll(50), timeout=10, interval=0,
             what="the subscription reaching the ZeroMQ sink")
    stalled.recv_multipart()
    cb = ReconstructionCallback(model=model, sinks=[sink], batch_size=1, max_latency=0.0)
    t0 = time.monotonic()
    uid = _scan(RE, cb, 120, {})
    assert cb.flush(30), "the pipeline keeps its pace while the subscriber sleeps"
    elapsed = time.monotonic() - t0
    tally = Tally()

    def told_the_total() -> bool:
        """Read what is queued; true once the run's frame count came in: its stop message, or else
        (that was dropped) a heartbeat the sink's thread sends about once a second while idle."""
        while stalled.poll(0):
            topic, header, amp, _ = decode_message(stalled.recv_multipart())
            tally.add(topic, header, amp)
            if (topic == "cdinn.stop" and header["run_uid"] == uid) or (
                    topic == "cdinn.heartbeat" and (header.get("runs") or {}).get(uid) == 120):
                return True
        return False

    wait_for(told_the_total, timeout=15, interval=0.05, what="a stop message or heartbeat with the run's frame count")
    cb.close()
    stalled.close()
    sink.close()
    assert sink.frames_sent == 120 and cb.stats()["frames_out"] == 120
    assert 0 < tally.frames < 120, "ZeroMQ dropped messages for the stalled subscriber"
    assert tally.summary()["missed"] == 120 - tally.frames, "and the subscriber counted exactly what it lost"
    assert elapsed < 60


_IOC_GOES_AWAY = r"""
import json, logging, subprocess, sys
from cdinn_stream.apps.demo import loopback_epics_env
loopback_epics_env()  # this process and the IOC's share a Channel Access port of their own
from bluesky import RunEngine
from bluesky.plans import scan
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.nn.model import CDINN, ModelConfig
from cdinn_stream.nn.reconstruct import CDIModel
from cdinn_stream.lab.sim import BCDIFrameSource, OperandoCrystal, make_detector, make_motors
from cdinn_stream.sinks import EpicsSink

class Keep:
    seq = []
    def open_run(self, uid, start): pass
    def write(self, r): Keep.seq.extend(r.frames.seq_nums.tolist())
    def close_run(self, uid, s): pass

class Count(logging.Handler):
    lines = []
    def emit(self, record): Count.lines.append(record.getMessage())

logging.getLogger("cdinn_stream").addHandler(Count(level=logging.WARNING))
ioc = subprocess.Popen([sys.executable, "-m", "cdinn_stream", "ioc", "--prefix", "GONE:"])
import epics
assert epics.PV("GONE:FRAMES").wait_for_connection(timeout=60), "the IOC did not start"
epics_sink = EpicsSink("GONE:", timeout=0.3, retry=60)
model = CDIModel(CDINN(ModelConfig(32, (8, 16, 32), 1, 4)), device="cpu", precision="fp32")
cb = ReconstructionCallback(model=model, sinks=[epics_sink, Keep()], batch_size=1, max_latency=0.0)
peak, strain = make_motors(48.0)
source = BCDIFrameSource(OperandoCrystal(32, seed=3), frame_shape=(96, 96), peak_motor=peak, strain_motor=strain)
count = [0]
def frame():
    count[0] += 1
    if count[0] == 10:
        cb.flush(10)  # the first 9 frames reach the IOC
        frames_pv.append(epics.caget("GONE:FRAMES", timeout=5))
        ioc.kill()
        ioc.wait()
    return source()
RE = RunEngine({})
RE.subscribe(cb)
frames_pv = []
RE(scan([make_detector(frame)], strain, 0, 1, peak, 40, 56, 25))
cb.flush(30)
cb.close()
print(json.dumps({"kept": Keep.seq, "epics_writes": epics_sink.writes, "frames_pv": frames_pv,
                  "warnings": [l for l in Count.lines if "EPICS" in l]}))
"""


def test_ioc_going_away_mid_run_warns_once_and_the_rest_goes_on(tmp_path):
    """In its own process: the IOC and the Channel Access client need a port of their own."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("EPICS_")}
    proc = subprocess.run([sys.executable, "-c", _IOC_GOES_AWAY], capture_output=True, text=True, env=env,
                          timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["kept"] == list(range(1, 26)), "the other sinks get every frame"
    assert out["frames_pv"] == [9], "the IOC took results until it went away"
    assert len(out["warnings"]) == 1 and "went away" in out["warnings"][0], out["warnings"]


class FailsOnLargeBatches(torch.nn.Module):
    """A network that runs out of memory on batches of more than 3 frames (as a GPU would)."""

    def __init__(self, network):
        super().__init__()
        self.network, self.config, self.calls = network, network.config, []

    def forward_logits(self, x):
        self.calls.append(len(x))
        if len(x) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network.forward_logits(x)

    outputs = staticmethod(CDINN.outputs)


def test_model_failing_on_a_batch_retries_in_halves_and_loses_nothing(RE, model, caplog):
    from cdinn_stream.nn.reconstruct import CDIModel

    flaky = FailsOnLargeBatches(model.network)
    kept = []

    class Keep:
        def open_run(self, uid, start): pass
        def write(self, r): kept.extend(r.frames.seq_nums.tolist())
        def close_run(self, uid, s): pass

    cb = ReconstructionCallback(model=CDIModel(flaky, device="cpu", precision="fp32"), sinks=[Keep()],
                                batch_size=16, max_latency=0.2)
    _scan(RE, cb, 20, {})
    assert cb.flush(30)
    cb.close()
    assert kept == list(range(1, 21)) and cb.stats()["frames_failed"] == 0
    assert max(flaky.calls) > 3 and "retrying in halves" in caplog.text


def test_killed_mid_run_then_replayed_from_tiled_gives_complete_identical_results(RE, tiled_server, tiled_client):
    """`cdinn-stream serve` (its own process, behind a bluesky-0MQ-proxy) is killed mid-run; the raw run
    is safe in Tiled, and `cdinn-stream replay` re-processes it: complete, and identical to an
    uninterrupted pipeline that watched the same run."""
    from bluesky.callbacks.zmq import Publisher
    from bluesky_tiled_plugins import TiledWriter

    from cdinn_stream.nn.reconstruct import load_model

    url, key = f"http://127.0.0.1:{tiled_server.port}", tiled_server.api_key
    pin, proxy, serve = _proxy_and_serve(url, key, batch_size=4)
    publisher = None
    try:
        assert "reconstructing documents" in serve.stdout.readline()
        publisher = Publisher(f"tcp://127.0.0.1:{pin}")
        wait_for_serve(publisher, tiled_client)  # the proxy, and both connections to it (slow joiners)
        RE.subscribe(publisher)
        RE.subscribe(TiledWriter(tiled_client))
        reference = ReconstructionCallback(model=load_model("cdinn-32", device="cpu", precision="fp32"),
                                           sinks=[TiledSink(tiled_client, parent="cdinn-reference")])
        partial: list[int] = []

        started = []
        RE.subscribe(lambda name, doc: started.append(doc["uid"]) if name == "start" else None)

        def stored() -> int:
            """Frames of this run the served pipeline has stored (the array's shape, not its data:
            a read races with the server growing the array)."""
            run = tiled_client["cdinn"].get(started[-1]) if "cdinn" in tiled_client else None
            return run["frame_info"].shape[0] if run is not None and "frame_info" in run else 0

        def kill():  # once the served pipeline has stored some frames of this run
            partial.append(wait_for(stored, timeout=30, interval=0.1, what="serve storing frames of the run"))
            serve.kill()
            serve.wait()

        uid = _scan(RE, reference, 24, {12: kill})
        assert reference.flush(60)
        reference.close()
    finally:
        if publisher is not None:
            publisher.close()
        serve.kill()
        serve.wait(10)
        serve.stdout.close()
        proxy.terminate()
        proxy.wait(5)
    assert 0 < partial[0] < 24, "the served pipeline was killed with part of the run stored"
    assert not tiled_client["cdinn"][uid].metadata["complete"], "the killed process never finished the run"
    assert main(["replay", uid, "--tiled", url, "--api-key", key, "--parent", "cdinn", "--precision", "fp32"]) == 0
    _check_complete(tiled_client, uid, 24)
    again, ref = tiled_client["cdinn"][uid], tiled_client["cdinn-reference"][uid]
    # fp32 results of the same frames batched differently differ by up to ~1e-5 (the CPU kernels'
    # blocking follows the batch size); phases are compared modulo 2 pi (they are wrapped), inside
    # the object (outside it the vector head's (c, s) is near 0 and its angle carries no information)
    amplitude = ref["amplitude"].read()
    np.testing.assert_allclose(again["amplitude"].read(), amplitude, rtol=0, atol=3e-5)
    assert np.abs(wrap(again["phase"].read() - ref["phase"].read()))[amplitude > 0.1].max() < 3e-5


def test_back_to_back_and_overlapping_runs_never_mix(tiled_server, tiled_client):
    """Two RunEngines publish into one bluesky-0MQ-proxy at the same time, one of them twice in a
    row; `cdinn-stream serve` reconstructs all three runs into their own containers, each equal
    to a pipeline that saw only that run."""
    import threading

    from bluesky import RunEngine
    from bluesky.callbacks.zmq import Publisher

    from cdinn_stream.nn.reconstruct import load_model

    url, key = f"http://127.0.0.1:{tiled_server.port}", tiled_server.api_key
    pin, proxy, serve = _proxy_and_serve(url, key, batch_size=8)
    model = load_model("cdinn-32", device="cpu", precision="fp32")
    uids: dict[str, int] = {}
    errors: list = []

    def beamline(seed: int, runs: int, n: int):
        try:
            RE = RunEngine({}, context_managers=[])
            publisher = Publisher(f"tcp://127.0.0.1:{pin}")
            wait_for_serve(publisher, tiled_client)  # the proxy, serve's and this publisher's connections
            RE.subscribe(publisher)
            ref = ReconstructionCallback(model=model, sinks=[TiledSink(tiled_client, parent="cdinn-reference")])
            RE.subscribe(ref)
            for _ in range(runs):
                peak, strain = make_motors(48.0)
                source = BCDIFrameSource(OperandoCrystal(32, seed=seed), frame_shape=(96, 96), peak_motor=peak,
                                         strain_motor=strain, seed=seed)
                (uid,) = RE(scan([make_detector(source)], strain, 0, 1, peak, 40, 56, n))
                uids[uid] = n
            ref.flush(60)
            ref.close()
            publisher.close()
        except Exception as err:  # reported by the main thread
            errors.append(err)

    try:
        assert "reconstructing documents" in serve.stdout.readline()
        threads = [threading.Thread(target=beamline, args=(11, 2, 15)),
                   threading.Thread(target=beamline, args=(12, 1, 25))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        wait_for(lambda: all(u in tiled_client["cdinn"] and tiled_client["cdinn"][u].metadata.get("complete")
                             for u in uids), timeout=60, interval=0.2, what="serve completing the three runs")
    finally:
        serve.terminate()
        serve.wait(10)
        serve.stdout.close()
        proxy.terminate()
        proxy.wait(5)
    assert len(uids) == 3
    for uid, n in uids.items():
        _check_complete(tiled_client, uid, n)
        served, ref = tiled_client["cdinn"][uid], tiled_client["cdinn-reference"][uid]
        np.testing.assert_allclose(served["amplitude"].read(), ref["amplitude"].read(), rtol=0, atol=3e-5)


class GatedTiledSink(TiledSink):
    """A real Tiled server whose first write waits for ``gate`` (a server busy while a burst comes)."""

    def __init__(self, *args, gate, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate

    def _extend(self, run, cols):
        assert self.gate.wait(60)
        TiledSink._extend(run, cols)


def test_a_tiled_server_too_busy_for_a_burst_parks_results_and_loses_nothing(tiled_client, tmp_path, caplog):
    """600 frames arrive while the server is busy with the first write: the sink thread parks the
    backlog on local disk, writes it back in order, and nothing is dropped."""
    import threading
    import uuid

    from cdinn_stream.live.blocks import FrameBlock, ResultBlock, RunMarker
    from cdinn_stream.live.publish import SinkThread

    gate = threading.Event()
    sink = GatedTiledSink(tiled_client, spool_dir=tmp_path / "spool", gate=gate)
    thread = SinkThread(sink, max_queued_frames=1000, max_write_frames=64, spill_frames=250)
    uid = f"burst-{uuid.uuid4()}"
    thread.put(RunMarker("open", uid, {"uid": uid}))
    for start in range(1, 601, 10):
        seq = np.arange(start, start + 10)
        frames = FrameBlock(uid, "primary", seq, seq * 0.1, np.zeros((10, 1, 1), np.float32),
                            np.zeros((10, 2), int), np.zeros((10, 2), int), np.full(10, time.monotonic()))
        amplitude = np.broadcast_to(seq[:, None, None] / 600, (10, 32, 32)).astype(np.float32)
        thread.put(ResultBlock(frames, amplitude, np.zeros((10, 32, 32), np.float32), np.zeros(10), np.zeros(10)))
    thread.put(RunMarker("close", uid, {"stop": {"exit_status": "success"}}))
    gate.set()
    assert thread.drain(120)
    thread.close()
    stats = thread.stats.summary()
    assert stats["frames_dropped"] == 0 and stats["frames_spilled"] >= 600 - 10 - 250 - 64, stats
    assert stats["frames_spilled"] + stats["frames_written"] == 600
    assert "parking results on local disk" in caplog.text
    rec = tiled_client["cdinn"][uid]
    np.testing.assert_array_equal(read_frame_info(rec)["seq_num"], np.arange(1, 601))
    np.testing.assert_allclose(rec["amplitude"].read()[:, 0, 0], np.arange(1, 601) / 600, rtol=1e-6)
    assert rec.metadata["complete"] and rec.metadata["frames"] == 600
    assert not sink.spool.runs(), "the spool is empty at the end"


def test_writing_parked_results_back_yields_to_new_results(tiled_client, tmp_path):
    """Parked chunks go back one at a time while ``behind`` says results pile up, all at once
    otherwise, and in order either way."""
    import uuid

    from cdinn_stream.live.blocks import FrameBlock, ResultBlock

    sink = TiledSink(tiled_client, spool_dir=tmp_path / "spool")
    uid = f"yield-{uuid.uuid4()}"
    sink.open_run(uid, {"uid": uid})
    for start in range(1, 41, 10):  # four parked chunks of 10 frames
        seq = np.arange(start, start + 10)
        frames = FrameBlock(uid, "primary", seq, seq * 0.1, np.zeros((10, 1, 1), np.float32),
                            np.zeros((10, 2), int), np.ones((10, 2), int), np.zeros(10))
        sink.spill(ResultBlock(frames, np.zeros((10, 4, 4), np.float32), np.zeros((10, 4, 4), np.float32),
                               np.zeros(10), np.zeros(10)))
    sink.behind = lambda: True
    assert sink.backfill() == 10, "one chunk, then it yields"
    assert sink.backfill() == 10
    sink.behind = lambda: False
    assert sink.backfill() == 20
    sink.close_run(uid, {"stop": {"exit_status": "success"}})
    info = read_frame_info(tiled_client["cdinn"][uid])
    np.testing.assert_array_equal(info["seq_num"], np.arange(1, 41))
    np.testing.assert_array_equal(info["peak"], np.ones((40, 2), int))
    np.testing.assert_allclose(info["time"], np.arange(1, 41) * 0.1)
    assert not sink.spool.runs()


def test_results_spooled_by_the_previous_layout_are_written_back(tiled_client):
    """Rows spooled before chi2 was kept (no chi2, 7 frame_info columns) go into a container that
    the earlier version began (it keeps its 7 columns and gains chi2, NaN) and into a new one."""
    from cdinn_stream.sinks import read_run
    from cdinn_stream.sinks.tiled import TiledStore

    store = TiledStore(tiled_client, parent="old-layout")
    n = 3
    old = {"amplitude": np.ones((n, 4, 4), np.float32), "phase": np.zeros((n, 4, 4), np.float32),
           "frame_info": np.tile(np.arange(7.0), (n, 1))}
    begun = store.create("begun", {"uid": "begun"})
    for key, value in old.items():  # what the earlier version's first write made
        begun.container.write_array(value, key=key)
    reopened = store.reopen({"run_uid": "begun", "parent": "old-layout", "written": n, "start": {}, "model_card": {}})
    store.extend(reopened, old)
    rec = read_run(tiled_client["old-layout"]["begun"])
    assert rec["chi2"].shape == (2 * n,) and np.isnan(rec["chi2"]).all()
    assert tiled_client["old-layout"]["begun"]["frame_info"].read().shape == (2 * n, 7)
    assert not rec["model_version"].any() and len(rec["seq_num"]) == 2 * n
    fresh = store.create("fresh", {"uid": "fresh"})
    store.extend(fresh, old)
    rec = read_run(tiled_client["old-layout"]["fresh"])
    assert np.isnan(rec["chi2"]).all() and tiled_client["old-layout"]["fresh"]["frame_info"].read().shape == (n, 8)
