"""``cdinn-stream view``: the pipeline's runs live in a browser, from its ZeroMQ results.

A ZeroMQ SUB thread (just another subscriber: the PUB socket drops for it alone if it falls behind,
never slowing the pipeline) keeps, per run, the latest frame and bounded trends of every frame's
observables (:data:`~cdinn_stream.core.observables.OBSERVABLES`); a standard-library HTTP server on
127.0.0.1 serves one self-contained page (``view.html``: inline JS and CSS, nothing fetched from
elsewhere) that polls ``state.json`` about ten times a second. Images travel only when new, as
8-bit maps: the amplitude and the strain (:func:`strain_map`). No torch needed.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from itertools import islice
from urllib.parse import parse_qs, urlsplit

import numpy as np
import zmq

from ..core.observables import OBSERVABLES, SUPPORT_FRACTION, strain_map
from ..sinks.zmq import DEFAULT_ADDRESS, decode_message
from .listen import Tally

__all__ = ["LiveView", "ViewState", "strain_map", "serve_view", "DEFAULT_PORT"]

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8765
#: seconds without any message (heartbeats come every second while the pipeline idles) before the
#: page says the publisher is gone
SILENCE_S = 5.0
#: runs kept (the latest is shown)
RUNS_KEPT = 8
#: the trends: ``chi2`` and ``strain_rms`` first, then the table's order
TRENDS = ["chi2", "strain_rms", *(name for name in OBSERVABLES if name not in ("chi2", "strain_rms"))]


def _bytes8(values: np.ndarray) -> str:
    """``values`` (0..1) as base64 of 8-bit levels, row by row."""
    return base64.b64encode(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8).tobytes()).decode()


def _finite(value) -> float | None:
    """A JSON-safe number: ``None`` for NaN and infinities (``JSON.parse`` knows neither)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return float(f"{v:.6g}") if math.isfinite(v) else None


def _column(values, n: int) -> list[float | None]:
    """``n`` JSON-safe values of one header field (``None`` where it has none)."""
    values = list(values or [])[:n]
    return [_finite(v) for v in values] + [None] * (n - len(values))


def encode_image(amplitude: np.ndarray, phase: np.ndarray) -> dict:
    """The page's images of one frame: amplitude scaled to its maximum, strain (:func:`strain_map`)
    scaled to a symmetric range of its largest value in the support, both as 8-bit base64."""
    amp = np.nan_to_num(np.asarray(amplitude, np.float32), nan=0.0, posinf=0.0, neginf=0.0)  # JSON has no NaN
    phase = np.nan_to_num(np.asarray(phase, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    top = float(amp.max(initial=0.0)) or 1.0
    strain = strain_map(amp, phase)
    scale = max(float(np.abs(strain).max(initial=0.0)), 0.05)
    return {"shape": list(amp.shape), "amplitude": _bytes8(amp / top), "amplitude_max": top,
            "strain": _bytes8(0.5 + 0.5 * strain / scale), "strain_scale": scale,
            "support_fraction": SUPPORT_FRACTION}


@dataclass
class RunView:
    """One run as the page shows it: counts, the latest frame, the trends of its last ``history`` frames."""

    uid: str
    history: int
    ended: bool = False
    published: int | None = None
    refined: int = 0
    model_version: int | None = None
    model: str | None = None
    latency_ms: float | None = None
    points: int = 0  # frames ever appended to the trends
    image_id: int = 0
    latest: tuple | None = None  # (seq_num, amplitude, phase) of the newest frame
    arrivals: deque = field(default_factory=lambda: deque(maxlen=256))  # (monotonic s, frames)
    trends: dict[str, deque] = field(default_factory=dict)

    def __post_init__(self):
        self.trends = {name: deque(maxlen=self.history) for name in ["seq_num", *TRENDS]}

    def add_result(self, header: dict, amplitude: np.ndarray, phase: np.ndarray, now: float) -> None:
        """Append one result message's frames."""
        n = len(amplitude)
        columns = {"seq_num": _column(header.get("seq_num"), n), "chi2": _column(header.get("chi2"), n)}
        observed = header.get("observables") or {}
        for name in TRENDS:
            self.trends[name].extend(columns.get(name) or _column(observed.get(name), n))
        self.trends["seq_num"].extend(columns["seq_num"])
        self.points += n
        self.arrivals.append((now, n))
        self.latest = (columns["seq_num"][-1], np.array(amplitude[-1]), np.array(phase[-1]))
        self.image_id += 1
        self.model_version, self.model = header.get("model_version"), header.get("model")
        latency = header.get("latency_s")
        self.latency_ms = _finite(1e3 * float(np.median(latency))) if latency else None

    def frame_rate(self, now: float) -> float:
        """Frames a second: over the last 2 s while the run goes on, over the whole run once it ended."""
        if len(self.arrivals) < 2:
            return 0.0
        if self.ended:
            first, last = self.arrivals[0][0], self.arrivals[-1][0]
            frames = sum(n for _, n in list(self.arrivals)[1:])
            return frames / (last - first) if last > first else 0.0
        recent = [(t, n) for t, n in self.arrivals if t >= now - 2.0]
        window = min(2.0, now - self.arrivals[0][0])
        return sum(n for _, n in recent) / window if window > 0 else 0.0

    def trends_since(self, since: int) -> dict:
        """The trend points after the first ``since`` (all those kept when fewer are left)."""
        kept = len(self.trends["seq_num"])
        start = max(0, min(since, self.points), self.points - kept)
        skip = kept - (self.points - start)
        return {"run": self.uid, "start": start, "count": self.points,
                **{name: list(islice(values, skip, None)) for name, values in self.trends.items()}}


class ViewState:
    """What the ZeroMQ thread heard, for the page: the runs (the latest shown), the publisher's liveness
    and counts (:class:`~cdinn_stream.apps.listen.Tally`: frames received and missed per run)."""

    def __init__(self, address: str, *, history: int = 5000):
        self.address = address
        self.history = history
        self.tally = Tally()
        self.runs: OrderedDict[str, RunView] = OrderedDict()
        self.heard: float | None = None  # monotonic time of the last message
        self.polls = 0
        self._lock = threading.Lock()
        self._images: dict[tuple[str, int], dict] = {}

    def add(self, topic: str, header: dict, amplitude: np.ndarray | None, phase: np.ndarray | None) -> None:
        """Take one decoded message (see :mod:`cdinn_stream.sinks.zmq`)."""
        now = time.monotonic()
        with self._lock:
            self.heard = now
            self.tally.add(topic, header, amplitude)
            uid = header.get("run_uid")
            if topic == "cdinn.start":
                self._run(uid)
            elif topic == "cdinn.result" and amplitude is not None:
                self._run(uid).add_result(header, amplitude, phase, now)
            elif topic == "cdinn.refined" and amplitude is not None:
                self._run(uid).refined += len(amplitude)
            elif topic == "cdinn.stop" and uid in self.runs:
                self.runs[uid].ended, self.runs[uid].published = True, header.get("run_frames")

    def _run(self, uid: str) -> RunView:
        if uid not in self.runs:
            self.runs[uid] = RunView(uid, self.history)
            while len(self.runs) > RUNS_KEPT:
                self.runs.popitem(last=False)
        return self.runs[uid]

    def snapshot(self, *, run: str | None = None, since: int = 0, image: int = -1) -> dict:
        """The page's state: status, the latest run's counts, its trends after the first ``since``
        (all of them when ``run`` is not the latest run) and its image unless the page has ``image``."""
        now = time.monotonic()
        with self._lock:
            self.polls += 1
            current = next(reversed(self.runs.values()), None)
            state = {"zmq": self.address, "status": self._status(current, now),
                     "silent_s": None if self.heard is None else round(now - self.heard, 1),
                     "runs_seen": len(self.tally.received), "run": None}
            if current is None:
                return state
            state["run"] = self._counts(current, now)
            state["trends"] = current.trends_since(since if run == current.uid else 0)
            latest, image_id = current.latest, current.image_id
        if latest is not None and (run != current.uid or image != image_id):
            state["image"] = {"id": image_id, "seq_num": latest[0], **self._image(current.uid, image_id, latest)}
        return state

    def _image(self, uid: str, image_id: int, latest: tuple) -> dict:
        key = (uid, image_id)
        images = self._images  # one read: another page's thread may replace it meanwhile
        if key not in images:  # made once, whichever page asks first
            images = {key: encode_image(latest[1], latest[2])}
            self._images = images
        return images[key]

    def _counts(self, run: RunView, now: float) -> dict:
        return {"uid": run.uid, "ended": run.ended, "received": self.tally.received.get(run.uid, 0),
                "missed": self.tally.missed.get(run.uid, 0), "published": run.published,
                "frame_rate": round(run.frame_rate(now), 1), "model_version": run.model_version,
                "model": run.model, "refined": run.refined, "latency_ms": run.latency_ms}

    def _status(self, run: RunView | None, now: float) -> dict:
        """One line for the page's banner and its kind: ``wait``, ``live``, ``ended`` or ``gone``."""
        if self.heard is None:
            return {"kind": "wait", "text": f"Waiting for a publisher at {self.address}: no heartbeat yet"}
        silent = now - self.heard
        if silent > SILENCE_S:
            return {"kind": "gone", "text": f"No publisher heard at {self.address} for {silent:.0f} s "
                                            "(heartbeats stopped): is the pipeline running, publishing there?"}
        if run is None:
            return {"kind": "wait", "text": f"Publisher alive at {self.address}; waiting for a run"}
        received, missed = self.tally.received.get(run.uid, 0), self.tally.missed.get(run.uid, 0)
        if run.ended:
            return {"kind": "ended", "text": f"Run {run.uid[:8]} ended: {run.published} frames published, "
                                             f"{received} received, {missed} missed"}
        return {"kind": "live", "text": f"Run {run.uid[:8]} live: {received} frames"}


def _page() -> bytes:
    """``view.html`` with the observables' table (name, unit, meaning) and the trends' order filled in."""
    config = json.dumps({"observables": OBSERVABLES, "trends": TRENDS}).replace("<", "\\u003c")
    html = resources.files(__package__).joinpath("view.html").read_text(encoding="utf-8")
    return html.replace("/*CONFIG*/{}", config).encode()


class _Handler(BaseHTTPRequestHandler):
    """``/``: the page; ``/state.json?run=UID&since=N&image=ID``: :meth:`ViewState.snapshot`."""

    state: ViewState
    page: bytes

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", self.page)
        elif url.path == "/state.json":
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            state = self.state.snapshot(run=query.get("run"), since=_int(query.get("since"), 0),
                                        image=_int(query.get("image"), -1))
            self._send(200, "application/json", json.dumps(state, allow_nan=False).encode())
        else:
            self._send(404, "text/plain", b"not found\n")

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("%s " + format, self.address_string(), *args)


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


class LiveView:
    """The view: a ZeroMQ subscriber thread on ``address`` and the page's HTTP server on ``host:port``
    (``port=0``: a free one, see :attr:`url`). ``start()`` runs both in threads; ``close()`` stops them.

    Args:
        address: the pipeline's ZeroMQ results (the publisher binds; this connects).
        host: the address to serve on (default 127.0.0.1: this machine only).
        port: the port to serve on.
        history: frames of trends kept per run.

    Raises:
        ValueError: when ``host:port`` cannot be served (taken, not this machine's) or ``address``
            is not a ZeroMQ address.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 history: int = 5000):
        self.state = ViewState(address, history=history)
        handler = type("ViewHandler", (_Handler,), {"state": self.state, "page": _page()})
        try:
            self._httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as err:
            raise ValueError(f"cannot serve on {host}:{port} ({err.strerror or err}); --port 0 picks a free port") \
                from err
        self._httpd.daemon_threads = True
        self._ctx = zmq.Context()
        self._socket = self._subscriber(address)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._subscribe, name="cdinn-view-zmq", daemon=True),
                         threading.Thread(target=self._httpd.serve_forever, name="cdinn-view-http", daemon=True)]

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> LiveView:
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        """Stop serving and subscribing; returns when both threads are done."""
        self._stop.set()
        if self._threads[1].is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(5)
        if not self._socket.closed and not self._threads[0].is_alive():
            self._socket.close()  # never started
        self._ctx.term()

    def __enter__(self) -> LiveView:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _subscriber(self, address: str) -> zmq.Socket:
        """The SUB socket, connected (used by the subscriber thread alone once it starts)."""
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"cdinn.")
        try:
            sock.connect(address)
        except zmq.ZMQError as err:
            sock.close()
            self._ctx.term()
            self._httpd.server_close()
            raise ValueError(f"cannot subscribe to {address!r}: {err}") from err
        return sock

    def _subscribe(self) -> None:
        """Take every message until :meth:`close` (a malformed one is logged and skipped)."""
        sock = self._socket
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    continue
                while sock.poll(0) and not self._stop.is_set():
                    parts = sock.recv_multipart()
                    try:
                        self.state.add(*decode_message(parts))
                    except (ValueError, KeyError, TypeError) as err:
                        logger.warning("skipped a malformed %r message: %s", bytes(parts[0])[:32], err)
        finally:
            sock.close()


def serve_view(address: str = DEFAULT_ADDRESS, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
               history: int = 5000) -> dict:
    """Serve the view until Ctrl-C; prints its URL. Returns the counts (as ``cdinn-stream listen``)."""
    view = LiveView(address, host=host, port=port, history=history).start()
    try:  # (Ctrl-C as soon as the URL is out stops it cleanly too)
        print(f"cdinn-stream view: {view.url} (results from {address}; Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        view.close()
    return view.state.tally.summary()
