"""``cdinn-stream serve --tiled-follow``: a run that bluesky's ``TiledWriter`` stores in a stock Tiled
server (``tiled serve catalog --temp``: its in-memory streaming cache) is reconstructed while it is
written, every frame once and in order -- also when updates are lost or repeated, and by polling a
server that does not stream."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
from bluesky import RunEngine
from bluesky.plans import count

from cdinn_stream.apps.follow import TiledFollower
from cdinn_stream.lab.sim import BCDIFrameSource, OperandoCrystal, make_detector, make_motors
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.sinks.tiled import connect_tiled

from .conftest import TiledServerProcess, ZmqCollector

FRAMES = 200


def _scan(client, frames: int, *, batch_size: int = 10, detector: bool = True, files=None) -> tuple[str, dict]:
    """A count of the simulated detector (or of a motor alone; with ``files``, a folder: the detector
    writes a ``.npy`` per frame there) written by TiledWriter every ``batch_size`` events: its uid and
    stop document."""
    from bluesky_tiled_plugins import TiledWriter

    peak, strain = make_motors(64)
    source = BCDIFrameSource(OperandoCrystal(32, seed=4), frame_shape=(128, 128), peak_motor=peak,
                             strain_motor=strain, seed=4)
    RE = RunEngine({})
    RE.subscribe(TiledWriter(client, batch_size=batch_size))
    stops: list[dict] = []
    RE.subscribe(lambda name, doc: stops.append(doc), "stop")
    det = make_detector(source, external=files is not None, save_path=None if files is None else str(files))
    (uid,) = RE(count([det if detector else peak], frames))
    return uid, stops[0]


def _follow_scan(uri: str, key: str, client, model, zmq_pair, frames: int, follower_class=TiledFollower, files=None,
                 **options):
    """Follow the server with a callback publishing to the ZeroMQ sink while a scan is written:
    the scan's uid and stop document, the results of that run (headers), and the follower."""
    sink, collector = zmq_pair
    cb = ReconstructionCallback(model=model, sinks=[sink])
    follower = follower_class(connect_tiled(uri, key), cb, **options).start()
    try:
        uid, stop = _scan(client, frames, files=files)
        messages = collector.drain(until_stops=1, timeout=60)
    finally:
        follower.close()
        cb.close()
    return uid, stop, [h for t, h, *_ in messages if t == "cdinn.result" and h["run_uid"] == uid], follower


def _seq_nums(results: list[dict]) -> list[int]:
    return [s for h in results for s in h["seq_num"]]


def test_a_run_is_reconstructed_while_tiledwriter_writes_it(stock_tiled, model, zmq_pair):
    uri, key, client = stock_tiled
    uid, stop, results, follower = _follow_scan(uri, key, client, model, zmq_pair, FRAMES)
    assert _seq_nums(results) == list(range(1, FRAMES + 1)), "every frame once, in order"
    assert min(h["published"] for h in results) < stop["time"], "reconstructed while the run was written"
    stats = follower.stats()
    assert stats["mode"] == "streaming" and stats["runs_done"] == 1 and stats["frames"] == FRAMES
    assert not stats["errors"] and not stats["gaps"], "every frame came over the websockets"


class LossyFollower(TiledFollower):
    """Loses every fifth update of the frames and of the table and delivers every third twice, as a
    websocket that reconnects or a streaming cache that evicts would."""

    def _deliver(self, kind, update, uid=None):
        if kind in ("image", "table"):
            self._n = getattr(self, "_n", 0) + 1
            if self._n % 5 == 0:
                return
            if self._n % 3 == 0:
                super()._deliver(kind, update, uid)
        super()._deliver(kind, update, uid)


def test_lost_and_repeated_updates_still_give_every_frame_once_in_order(stock_tiled, model, zmq_pair):
    uri, key, client = stock_tiled
    frames = 60
    uid, stop, results, follower = _follow_scan(uri, key, client, model, zmq_pair, frames, LossyFollower)
    assert _seq_nums(results) == list(range(1, frames + 1))
    assert follower.stats()["gaps"] > 0, "the rows lost were read from Tiled"


def test_frames_in_the_detectors_files_are_read_through_tiled(tiled_server, tiled_client, model, zmq_pair, tmp_path):
    """TiledWriter registers the detector's ``.npy`` files; their frames come through Tiled (which
    must be able to read them: here ``readable_storage``)."""
    frames = 20
    uri = f"http://127.0.0.1:{tiled_server.port}"
    uid, stop, results, follower = _follow_scan(uri, tiled_server.api_key, tiled_client, model, zmq_pair, frames,
                                                files=tmp_path)
    assert _seq_nums(results) == list(range(1, frames + 1))
    assert not follower.stats()["errors"]


def test_a_server_that_does_not_stream_is_polled(tmp_path, model, zmq_pair, caplog):
    """``tiled serve catalog catalog.db`` without ``--cache`` refuses websockets: the follower says
    so and polls, with the same guarantees."""
    frames = 40
    server = TiledServerProcess(tmp_path / "tiled", tables=True).start()
    try:
        with caplog.at_level(logging.WARNING, logger="cdinn_stream.apps.follow"):
            uid, stop, results, follower = _follow_scan(server.uri, server.api_key, server.client(), model, zmq_pair,
                                                        frames, poll=0.5)
    finally:
        server.stop()
    assert _seq_nums(results) == list(range(1, frames + 1))
    assert follower.stats()["mode"] == "polling"
    assert any("does not stream" in r.getMessage() and "--cache" in r.getMessage() for r in caplog.records)


def test_a_run_without_an_image_is_reported_not_fatal(stock_tiled, model, zmq_pair, caplog):
    uri, key, client = stock_tiled
    sink, collector = zmq_pair
    cb = ReconstructionCallback(model=model, sinks=[sink])
    follower = TiledFollower(connect_tiled(uri, key), cb).start()
    try:
        with caplog.at_level(logging.ERROR, logger="cdinn_stream.apps.follow"):
            uid, _ = _scan(client, 5, detector=False)
            collector.drain(until_stops=1, timeout=30)
    finally:
        follower.close()
        cb.close()
    assert any(uid in r.getMessage() and "no image field" in r.getMessage() for r in caplog.records)
    assert follower.stats()["runs_done"] == 1


def test_serve_tiled_follow_says_what_is_wrong_in_one_line(quick_tiled_retries, capsys):
    from conftest import free_port

    from cdinn_stream.apps.cli import main

    status = main(["serve", "--tiled-follow", f"http://127.0.0.1:{free_port()}", "--device", "cpu"])
    err = capsys.readouterr().err  # tiled's own "Retrying..." first, then our one line, no traceback
    assert status == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("cdinn-stream serve: error: cannot reach a Tiled server")
    with pytest.raises(SystemExit):
        main(["serve", "--tiled-follow", "http://127.0.0.1:1", "--zmq", "tcp://127.0.0.1:5578"])
    assert "not allowed with" in capsys.readouterr().err


def test_serve_tiled_follow_reconstructs_each_new_run(stock_tiled, tiny_weights):
    """The command as a user runs it: results on its ``--zmq-out``; Ctrl-C prints its statistics."""
    from conftest import free_port, wait_for

    uri, key, client = stock_tiled
    out = f"tcp://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILED_")} | {"TILED_API_KEY": key}
    proc = subprocess.Popen([sys.executable, "-m", "cdinn_stream", "serve", "--tiled-follow", uri, "--zmq-out", out,
                             "--model", str(tiny_weights), "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    collector = ZmqCollector(out)
    try:  # its first heartbeat: the pipeline is up and our subscription reaches it
        wait_for(lambda: proc.poll() is not None or collector.sock.poll(100), timeout=60, what="serve's heartbeat")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        uid, _ = _scan(client, 30)
        messages = collector.drain(until_stops=1, timeout=60)
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        collector.close()
    assert proc.returncode == 0, stderr[-3000:]
    results = [h for t, h, *_ in messages if t == "cdinn.result" and h["run_uid"] == uid]
    assert _seq_nums(results) == list(range(1, 31))
    stats = json.loads(stdout.strip().splitlines()[-1])
    assert stats["frames_out"] == 30 and stats["followed"]["runs_done"] == 1
