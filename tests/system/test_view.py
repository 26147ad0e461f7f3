"""``cdinn-stream view``: a real pipeline publishes a 300-frame operando run on ZeroMQ, the view
follows it, and headless Chromium shows the page during the run and after it."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from bluesky import plan_stubs as bps
from bluesky.plans import scan
from conftest import free_port, wait_for

from cdinn_stream.apps.view import SILENCE_S, LiveView, ViewState, strain_map
from cdinn_stream.lab.sim import BCDIFrameSource, OperandoCrystal, make_detector, make_motors
from cdinn_stream.live.callback import ReconstructionCallback
from cdinn_stream.nn.reconstruct import load_model
from cdinn_stream.sinks import ZmqPublisherSink

FRAMES = 300
CHROMIUM = shutil.which("chromium")
# where the page puts things in a 1280 x 900 window (view.html: fixed sizes), as (rows, columns)
AMPLITUDE_BOX = (slice(100, 320), slice(30, 260))
STRAIN_BOX = (slice(100, 320), slice(306, 536))
CHI2_CHART_BOX = (slice(86, 186), slice(640, 900))
CHART_BLUE = np.array([43, 95, 158])  # the trends' line colour, #2b5f9e


def _state(view: LiveView) -> dict:
    with urllib.request.urlopen(view.url + "state.json", timeout=10) as answer:
        return json.load(answer)


def _chromium(url: str, png: Path, profile: Path, *, screenshot: bool = True) -> list[str]:
    """Headless Chromium on ``url``: a screenshot after 3 s of the page's (virtual) time, or a page left open."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1280,900"]
    if screenshot:
        cmd += ["--virtual-time-budget=3000", f"--screenshot={png}"]
    return cmd + [url]


def _pixels(png: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(png) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _images_drawn(shot: np.ndarray) -> bool:
    """Whether a screenshot shows an amplitude image and a strain image with red and blue in it
    (pale blue counts: a frame whose largest strain is positive shows its negative side pale)."""
    amplitude, strain_image = shot[AMPLITUDE_BOX], shot[STRAIN_BOX]
    return bool(len(np.unique(amplitude.reshape(-1, 3), axis=0)) > 10
                and ((strain_image[..., 2] - strain_image[..., 0]) > 20).sum() > 20
                and ((strain_image[..., 0] - strain_image[..., 2]) > 20).sum() > 20)


def _paced_step(detectors, step, pos_cache):
    """A scan step, then 25 ms: the run lasts long enough to be looked at while it goes on."""
    yield from bps.one_nd_step(detectors, step, pos_cache)
    yield from bps.sleep(0.025)


class PageWatcher:
    """During the run: the page's update rate in a real-time browser, then a screenshot."""

    def __init__(self, view: LiveView, tmp: Path):
        self.view, self.tmp = view, tmp
        self.rate: float | None = None
        self.frames_at_shot: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def frames(self) -> int:
        return self.view.state.tally.frames

    def _watch(self) -> None:
        try:
            wait_for(lambda: self.frames() >= 20, timeout=60, what="the view receiving the run's first frames")
            browser = subprocess.Popen(_chromium(self.view.url, self.tmp / "-", self.tmp / "live", screenshot=False),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:  # the page polls state.json once an update: count them in real time
                first = wait_for(lambda: self.view.state.polls >= 3 and (self.view.state.polls, time.monotonic()),
                                 timeout=30, what="the page polling")
                wait_for(lambda: self.view.state.polls >= first[0] + 15, timeout=30, what="15 page updates")
                self.rate = 15 / (time.monotonic() - first[1])
            finally:
                browser.terminate()
                browser.wait(10)
            for _ in range(3):  # a shot that caught the page between two draws is taken again, while the run goes on
                subprocess.run(_chromium(self.view.url, self.tmp / "during.png", self.tmp / "profile"),
                               capture_output=True, timeout=60, check=True)
                self.frames_at_shot = self.frames()
                if _images_drawn(_pixels(self.tmp / "during.png")) or self.frames_at_shot > FRAMES - 60:
                    break
        except BaseException as err:  # reported by the test's thread
            self.error = err


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (`chromium` on PATH) to render the page")
def test_the_page_follows_a_live_run(RE, tmp_path):
    sink = ZmqPublisherSink("tcp://127.0.0.1:0")
    cb = ReconstructionCallback(model=load_model("cdinn-32", device="cpu"), sinks=[sink], max_latency=0.02)
    with LiveView(sink.address, port=0) as view:
        assert view.url.startswith("http://127.0.0.1:")
        # the sink's heartbeat reaches the view: its subscription is live before the run starts
        wait_for(lambda: view.state.heard is not None, timeout=20, what="the sink's heartbeat reaching the view")
        RE.subscribe(cb)
        peak, strain = make_motors(48.0)
        source = BCDIFrameSource(OperandoCrystal(32, seed=2), frame_shape=(96, 96), peak_motor=peak,
                                 strain_motor=strain)
        watcher = PageWatcher(view, tmp_path)
        watcher.thread.start()
        (uid,) = RE(scan([make_detector(source)], strain, 0, 1, peak, 36, 60, FRAMES, per_step=_paced_step))
        assert cb.flush(60)
        watcher.thread.join(120)
        if watcher.error is not None:
            raise watcher.error
        assert watcher.frames_at_shot < FRAMES, "the first screenshot was taken during the run"
        state = wait_for(lambda: (s := _state(view))["run"]["ended"] and s, timeout=20, what="the run's stop")
        subprocess.run(_chromium(view.url, tmp_path / "after.png", tmp_path / "profile"), capture_output=True,
                       timeout=60, check=True)
    cb.close()
    sink.close()

    run = state["run"]
    assert run["uid"] == uid and run["received"] == FRAMES and run["published"] == FRAMES and run["missed"] == 0
    assert state["status"]["kind"] == "ended" and f"{FRAMES} received" in state["status"]["text"]
    assert state["trends"]["count"] == FRAMES and state["trends"]["seq_num"] == list(range(1, FRAMES + 1))
    assert watcher.rate >= 5, f"the page updated {watcher.rate:.1f} times a second"
    print(f"page updates a second (real time, during the run): {watcher.rate:.1f}")

    during, after = _pixels(tmp_path / "during.png"), _pixels(tmp_path / "after.png")
    for name, shot in (("during", during), ("after", after)):
        amplitude, strain_image = shot[AMPLITUDE_BOX], shot[STRAIN_BOX]
        assert len(np.unique(amplitude.reshape(-1, 3), axis=0)) > 10 and amplitude.std() > 20, f"{name}: amplitude"
        assert ((strain_image[..., 2] - strain_image[..., 0]) > 20).sum() > 20, f"{name}: blue strain pixels"
        assert ((strain_image[..., 0] - strain_image[..., 2]) > 20).sum() > 20, f"{name}: red strain pixels"
        line = np.abs(shot[CHI2_CHART_BOX] - CHART_BLUE).sum(axis=-1) < 60
        assert line.sum() > 100, "the chi2 trend is drawn"
    assert np.abs(during - after).sum(axis=-1).astype(bool).sum() > 1000, "the page changed between the screenshots"
    assert not np.array_equal(during[CHI2_CHART_BOX], after[CHI2_CHART_BOX]), "the trends grew"


def test_the_page_says_when_no_publisher_is_heard():
    state = ViewState("tcp://127.0.0.1:5578")
    assert state.snapshot()["status"]["kind"] == "wait"
    state.add("cdinn.heartbeat", {"time": 0, "frames_sent": 0, "runs": {}}, None, None)
    assert state.snapshot()["status"]["kind"] == "wait"  # alive, no run yet
    state.heard -= 2 * SILENCE_S
    status = state.snapshot()["status"]
    assert status["kind"] == "gone" and "tcp://127.0.0.1:5578" in status["text"]


def test_the_trends_are_bounded_and_sent_once():
    state = ViewState("tcp://127.0.0.1:5578", history=50)
    state.add("cdinn.start", {"run_uid": "r"}, None, None)
    for first in range(1, 81, 8):
        seq = list(range(first, first + 8))
        header = {"run_uid": "r", "seq_num": seq, "chi2": [0.01] * 8, "observables": {"strain_rms": [float("nan")] * 8},
                  "run_frames": seq[-1], "latency_s": [0.01] * 8, "model_version": 0}
        state.add("cdinn.result", header, np.ones((8, 16, 16), np.float32), np.zeros((8, 16, 16), np.float32))
    full = state.snapshot(run="r")
    assert full["trends"]["count"] == 80 and full["trends"]["seq_num"] == list(range(31, 81))  # the last 50
    assert full["trends"]["strain_rms"] == [None] * 50  # NaN travels as null (JSON has no NaN)
    assert full["image"]["shape"] == [16, 16] and full["run"]["received"] == 80
    later = state.snapshot(run="r", since=78, image=full["image"]["id"])
    assert later["trends"]["seq_num"] == [79, 80] and "image" not in later
    state.add("cdinn.stop", {"run_uid": "r", "run_frames": 80}, None, None)
    assert state.snapshot()["status"]["kind"] == "ended"
    state.add("cdinn.start", {"run_uid": "next"}, None, None)  # the page moves to the new run, from its start
    moved = state.snapshot(run="r", since=80, image=full["image"]["id"])
    assert moved["run"]["uid"] == "next" and moved["trends"]["count"] == 0 and "image" not in moved
    assert moved["status"]["kind"] == "live"


def test_strain_map_is_the_torch_strain_without_its_plane():
    """On an object with a ramp of several wraps, an offset and a smooth strain field: the ramp and the
    offset go; what is left matches ``physics.strain`` (which also removes a least-squares plane)."""
    from cdinn_stream.core.physics import strain

    rows, cols = np.mgrid[:64, :64] - 32
    amplitude = np.exp(-(rows**2 + (cols + 2) ** 2) / 120.0)
    field = 0.4 * np.sin(rows / 6.0) * np.cos(cols / 9.0)
    phase = np.angle(np.exp(1j * (0.9 * rows - 1.7 * cols + 2.0 + field)))
    support = amplitude > 0.1
    ours = strain_map(amplitude, phase)
    assert np.all(ours[~support] == 0)
    for reference in (strain(amplitude, phase)[0], field):  # each differs from ours by a plane alone
        gap = np.angle(np.exp(1j * (ours - reference)))[support]
        basis = np.stack([rows[support], cols[support], np.ones(support.sum())], axis=1)
        plane, *_ = np.linalg.lstsq(basis, gap, rcond=None)
        assert np.abs(gap - basis @ plane).max() < 0.02


def test_page_fetches_nothing_from_elsewhere():
    """The page is self-contained (the beamline's network may be closed): its only URL is its own state.json."""
    page = (Path(__file__).resolve().parents[2] / "cdinn_stream" / "apps" / "view.html").read_text()
    assert not re.findall(r"https?://|//cdn|<link|<script src", page)
    assert "state.json" in page


def test_ctrl_c_stops_the_view_cleanly():
    proc = subprocess.Popen([sys.executable, "-m", "cdinn_stream", "view", "--port", "0", "--zmq",
                             f"tcp://127.0.0.1:{free_port()}"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line).group(0)
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert b"cdinn-stream view" in answer.read()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert json.loads(out.strip().splitlines()[-1])["frames"] == 0
