"""ZeroMQ PUB sink and its wire format.

Every message is multipart::

    [topic, header, amplitude, phase]          topic b"cdinn.result" / b"cdinn.refined"
    [topic, header]                            topic b"cdinn.start" / b"cdinn.stop" / b"cdinn.heartbeat"

``header`` is UTF-8 JSON. For results: ``version`` (1), ``run_uid``, ``stream``, ``seq_num``
(list, one per frame), ``time`` (event times), ``shape`` ``[n, h, w]``, ``dtype`` (``"float32"``),
``crop_origin`` and ``peak`` (``[[row, col], ...]`` in detector pixels), ``latency_s`` (pipeline
entry to model output, per frame), ``chi2`` (per frame: the trust figure, chi^2 of the
reconstruction against the measured crop), ``model_version`` and ``model`` (which weights made
these frames: 0 and the model's name until a live adaptation swaps new weights in), ``published``
(send time), ``observables`` (per frame, by name: :data:`cdinn_stream.core.observables.OBSERVABLES`
but ``chi2``, which has its own field) and ``run_frames`` (frames of the
run published so far, this message included; the stop message carries the run's total and
``model_versions``, the weights its frames used). Refined results
(NN-seeded ER/HIO of selected frames, :mod:`cdinn_stream.live.refine`) have the same layout plus ``iterations``,
``chi2_nn`` and
``chi2_refined`` (per frame, against the pattern refined on) and ``model_version``. ``amplitude`` and ``phase``
are the raw C-ordered buffers of ``n`` frames. For start/stop: ``run_uid`` and the document.
A heartbeat (:meth:`ZmqPublisherSink.heartbeat`, sent every second while the pipeline is idle)
carries ``time``, ``frames_sent`` and ``runs`` (frames published per recent run): a subscriber
can tell a live, idle publisher from a dead one, wait for its subscription to take effect before
a run starts, and count what it missed even when the stop message was among the drops.

The socket binds ``tcp://127.0.0.1:5578`` by default. Drop policy: a PUB socket never blocks the
pipeline. Past the high-water mark (``hwm`` messages queued for one subscriber, default 10,000;
a message holds one batch) ZeroMQ drops further messages *for that subscriber only*; the others,
and the pipeline's pace, are unaffected. A subscriber counts what it missed from each run's stop
message, each result's ``run_frames`` and the heartbeats (``cdinn-stream listen`` reports it; see
:class:`cdinn_stream.apps.listen.Tally`); the publisher counts ``messages_sent`` and ``frames_sent``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict

import numpy as np
import zmq

from ..live.blocks import RefinedBlock, ResultBlock

__all__ = ["ZmqPublisherSink", "decode_message", "DEFAULT_ADDRESS", "TOPIC_RESULT", "TOPIC_REFINED"]

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS = "tcp://127.0.0.1:5578"
TOPIC_RESULT = b"cdinn.result"
TOPIC_START = b"cdinn.start"
TOPIC_STOP = b"cdinn.stop"
TOPIC_HEARTBEAT = b"cdinn.heartbeat"
TOPIC_REFINED = b"cdinn.refined"


def _json(obj) -> bytes:
    return json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)).encode()


class ZmqPublisherSink:
    """Publishes results on a ZeroMQ PUB socket (see the module docstring for the format).

    Args:
        address: bind address; ``tcp://127.0.0.1:0`` picks a free port (see :attr:`address`).
        hwm: send high-water mark, in messages per subscriber.
        sndbuf: kernel send buffer per connection, in bytes (``None``: the system's); with a small
            one the high-water mark alone decides how far a subscriber may fall behind.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, *, hwm: int = 10_000, sndbuf: int | None = None,
                 context: zmq.Context | None = None):
        self._ctx = context or zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.PUB)
        self._socket.setsockopt(zmq.SNDHWM, hwm)
        if sndbuf is not None:
            self._socket.setsockopt(zmq.SNDBUF, sndbuf)
        self._socket.setsockopt(zmq.LINGER, 1000)
        if address.endswith(":0"):
            port = self._socket.bind_to_random_port(address.rsplit(":", 1)[0])
            address = f"{address.rsplit(':', 1)[0]}:{port}"
        else:
            self._socket.bind(address)
        self.address = address
        self.messages_sent = 0
        self.frames_sent = 0
        self._run_frames: OrderedDict[str, int] = OrderedDict()  # recent runs only

    def open_run(self, run_uid: str, start: dict) -> None:
        self._socket.send_multipart([TOPIC_START, _json({"version": 1, "run_uid": run_uid, "start": start})])

    def write(self, result: ResultBlock) -> None:
        f = result.frames
        amp = np.ascontiguousarray(result.amplitude, np.float32)
        header = {"version": 1, "run_uid": f.run_uid, "stream": f.stream, "seq_num": f.seq_nums,
                  "time": f.times, "shape": list(amp.shape), "dtype": "float32", "crop_origin": f.origins,
                  "peak": f.peaks, "latency_s": result.latency, "chi2": result.chi2,
                  "model_version": result.model_version, "model": result.model, "published": time.time(),
                  "run_frames": self._count(f.run_uid, len(amp)), "observables": result.observables}
        self._socket.send_multipart([TOPIC_RESULT, _json(header), amp,
                                     np.ascontiguousarray(result.phase, np.float32)], copy=False)
        self.messages_sent += 1
        self.frames_sent += len(amp)

    def write_refined(self, block: RefinedBlock) -> None:
        f = block.frames
        amp = np.ascontiguousarray(block.amplitude, np.float32)
        header = {"version": 1, "run_uid": f.run_uid, "stream": f.stream, "seq_num": f.seq_nums, "time": f.times,
                  "shape": list(amp.shape), "dtype": "float32", "crop_origin": f.origins, "peak": f.peaks,
                  "iterations": block.iterations, "chi2_nn": block.chi2_nn, "chi2_refined": block.chi2_refined,
                  "model_version": block.model_version,
                  "published": time.time()}
        self._socket.send_multipart([TOPIC_REFINED, _json(header), amp,
                                     np.ascontiguousarray(block.phase, np.float32)], copy=False)

    def close_run(self, run_uid: str, summary: dict) -> None:
        self._socket.send_multipart([TOPIC_STOP, _json({"version": 1, "run_uid": run_uid, **summary,
                                                         "run_frames": self._run_frames.get(run_uid, 0)})])

    def _count(self, run_uid: str, n: int) -> int:
        self._run_frames[run_uid] = self._run_frames.pop(run_uid, 0) + n
        while len(self._run_frames) > 16:
            self._run_frames.popitem(last=False)
        return self._run_frames[run_uid]

    def heartbeat(self) -> None:
        """Publish a heartbeat (see the module docstring)."""
        self._socket.send_multipart([TOPIC_HEARTBEAT, _json({"version": 1, "time": time.time(),
                                                              "frames_sent": self.frames_sent,
                                                              "runs": dict(self._run_frames)})])

    def idle(self) -> None:
        """Called by the sink's thread about once a second while no results come: a heartbeat."""
        self.heartbeat()

    def close(self) -> None:
        self._socket.close()


def decode_message(parts: list[bytes]) -> tuple[str, dict, np.ndarray | None, np.ndarray | None]:
    """``(topic, header, amplitude, phase)`` of a received multipart message (arrays for results)."""
    topic = bytes(parts[0]).decode()
    header = json.loads(bytes(parts[1]))
    if topic not in (TOPIC_RESULT.decode(), TOPIC_REFINED.decode()):
        return topic, header, None, None
    if len(parts) != 4:
        raise ValueError(f"a {topic} message has 4 parts, got {len(parts)}")
    shape = tuple(header["shape"])
    amp = np.frombuffer(parts[2], dtype=header["dtype"]).reshape(shape)
    phase = np.frombuffer(parts[3], dtype=header["dtype"]).reshape(shape)
    return topic, header, amp, phase
