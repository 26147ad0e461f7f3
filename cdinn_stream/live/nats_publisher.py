"""The publishing side of the worker pool: bluesky documents into NATS JetStream.

``RE.subscribe(JetStreamPublisher(JetStreamSettings(url=..., beamline="34idc")))`` publishes
every document of every run on ``<prefix>.<beamline>.<document name>`` (subjects, streams and
wire format: :mod:`cdinn_stream.live.jetstream`), in the order the RunEngine emits them, from a
thread of its own: the RunEngine's thread only encodes and queues.

Frames travel three ways:

* inline (``event``/``event_page`` data, small frames such as 128 x 128 crops or a simulated
  detector): in the message. A page bigger than the server's ``max_payload`` (1 MiB by
  default in ``nats-server``; up to 64 MiB with ``max_payload`` in its configuration) is split
  into several pages; a single event bigger than that raises :class:`PayloadTooLarge` with what
  to do (cut the frames to windows, write them to files, or raise ``max_payload``);
* by reference (``stream_resource``/``stream_datum`` of ophyd-async's HDF5 writers, AreaDetector
  ``resource``/``datum``): only the documents travel; the workers read the files (a shared file
  system), only the Bragg peak's window of each frame while the peak is tracked;
* cut to windows here (``window=``: inline detector frames and no shared file system): each
  frame travels as a ``window x window`` cut around its Bragg peak, with where it lies on the
  detector (:mod:`cdinn_stream.live.windows`), the peak found on this host as the pipeline finds it.

Nothing is lost while the server is away: documents wait in the queue (``max_queued``
documents; past it the RunEngine's thread waits, with a warning) and are published again with
the same ``Nats-Msg-Id``, so a retried publish is stored once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from .jetstream import (
    FRAME_DOCUMENTS,
    RUN_HEADER,
    JetStreamSettings,
    PayloadTooLarge,
    document_subject,
    encode_document,
    ensure_streams,
    message_id,
)
from .windows import PeakWindows

__all__ = ["JetStreamPublisher", "split_page", "nats_client"]

logger = logging.getLogger(__name__)

#: page keys that hold one value per event
_PAGE_LISTS = ("uid", "seq_num", "time")
_PAGE_DICTS = ("data", "timestamps", "filled")


def split_page(doc: dict, lo: int, hi: int) -> dict:
    """Events ``lo:hi`` of an event page, as an event page."""
    out = {k: v for k, v in doc.items() if k not in _PAGE_LISTS + _PAGE_DICTS}
    out.update({k: list(doc[k][lo:hi]) for k in _PAGE_LISTS if k in doc})
    out.update({k: {key: v[lo:hi] for key, v in doc[k].items()} for k in _PAGE_DICTS if k in doc})
    return out


def nats_client():
    """The ``nats`` package, or an ImportError that names the extra to install."""
    try:
        import nats
    except ImportError:
        raise ImportError("the worker pool needs nats-py: pip install 'cdinn-stream[nats]'") from None
    return nats


async def connect(settings: JetStreamSettings, name: str):
    """A NATS connection that keeps reconnecting (every 0.5 s) while the server is away."""
    nats = nats_client()
    return await nats.connect(settings.url, name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                              connect_timeout=5, allow_reconnect=True)


class JetStreamPublisher:
    """A bluesky callback publishing documents into JetStream (see the module docstring).

    Args:
        settings: the server, subject prefix and beamline.
        max_queued: documents waiting to be published at most before the caller waits.
        connect_timeout: seconds to reach the server at start.
        window: cut each inline detector frame to a ``window x window`` window around its Bragg
            peak before it travels (:class:`~cdinn_stream.live.windows.PeakWindows`: at least the
            model's window on the detector plus 16 pixels; twice it is safe); ``None``: whole frames.
        image_key: with ``window``, the detector's data key (default: the one 2-D image field).
        mask: with ``window``, ``(H, W)`` bool, True for good detector pixels (the peak search
            skips the others, and they travel as 0).
    """

    def __init__(self, settings: JetStreamSettings, *, max_queued: int = 10_000, connect_timeout: float = 30.0,
                 window: int | None = None, image_key: str | None = None, mask=None):
        self.settings = settings
        self.windows = None if window is None else PeakWindows(window, image_key=image_key, mask=mask)
        self.max_queued = max_queued
        self.published = 0
        self.retries = 0
        self._runs: dict[str, str] = {}  # descriptor, resource or stream_resource uid -> run uid
        self._cond = threading.Condition()
        self._waiting = 0
        self._loop = asyncio.new_event_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cdinn-nats-publisher", daemon=True)
        self._thread.start()
        try:
            self._nc = asyncio.run_coroutine_threadsafe(self._connect(), self._loop).result(connect_timeout)
        except Exception as err:
            self._stop_loop()
            raise ValueError(f"cannot reach the NATS server at {settings.url}: {err!r}") from None
        self.max_payload = int(self._nc.max_payload)
        self._task = asyncio.run_coroutine_threadsafe(self._publish_forever(), self._loop)

    async def _connect(self):
        nc = await connect(self.settings, "cdinn-stream-publisher")
        await ensure_streams(nc.jetstream(), self.settings)
        return nc

    # -- the RunEngine's side --------------------------------------------------------------
    def __call__(self, name: str, doc: dict) -> None:
        run_uid = self._run_of(name, doc)
        if run_uid is None:
            logger.warning("%s document of no known run: not published", name)
            return
        subject = document_subject(self.settings.prefix, self.settings.beamline, name, run_uid)
        if self.windows is not None:
            doc = self._cut(name, doc)
        for part_name, part in self._parts(name, doc):
            self._put(subject, encode_document(part_name, part), message_id(part_name, part, run_uid), run_uid)

    def _cut(self, name: str, doc: dict) -> dict:
        """The document as it travels with windows (:attr:`windows`; as it is when it cannot be cut)."""
        try:
            if name in ("descriptor", "event", "event_page"):
                return getattr(self.windows, name)(doc)
            if name == "stop":
                self.windows.stop(doc)
        except Exception as err:  # never into the RunEngine: the workers judge the document as it is
            logger.warning("%s document not cut to windows (published as it is): %r", name, err)
        return doc

    def _run_of(self, name: str, doc: dict) -> str | None:
        if name == "start":
            return doc["uid"]
        if name in ("event", "event_page", "stream_datum"):
            return self._runs.get(doc.get("descriptor"))
        if name in ("datum", "datum_page"):
            return self._runs.get(doc.get("resource"))
        run_uid = doc.get("run_start")
        if name in ("descriptor", "resource", "stream_resource") and run_uid:
            self._runs[doc["uid"]] = run_uid
        if name == "stop":
            self._runs = {k: v for k, v in self._runs.items() if v != run_uid}
        return run_uid

    def _parts(self, name: str, doc: dict) -> list[tuple[str, dict]]:
        """The document, or an event page split into pages that fit ``max_payload``."""
        size = len(encode_document(name, doc))
        if size <= self.max_payload - 1024:  # headroom for the subject and headers
            return [(name, doc)]
        events = len(doc["seq_num"]) if name == "event_page" else 1
        if events <= 1:
            raise PayloadTooLarge(
                f"a {name} document of {size} bytes (one frame) is larger than the NATS server's max_payload "
                f"({self.max_payload} bytes): cut the frames to windows around their peak here "
                "(JetStreamPublisher(..., window=256)), write them to files (stream_resource/stream_datum or resource/"
                "datum: the workers read them), or raise max_payload in the server's configuration (at most 64 MiB)")
        half = events // 2
        return self._parts(name, split_page(doc, 0, half)) + self._parts(name, split_page(doc, half, events))

    def _put(self, subject: str, data: bytes, msg_id: str, run_uid: str) -> None:
        with self._cond:
            if self._waiting >= self.max_queued:
                logger.warning("%d documents wait for the NATS server at %s: the caller waits", self._waiting,
                               self.settings.url)
                self._cond.wait_for(lambda: self._waiting < self.max_queued)
            self._waiting += 1
        headers = {"Nats-Msg-Id": msg_id, RUN_HEADER: run_uid}
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (subject, data, headers))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every document given so far is stored by the server."""
        with self._cond:
            return self._cond.wait_for(lambda: self._waiting == 0, timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Publish what is queued (at most ``timeout`` s), then disconnect."""
        done = self.flush(timeout)
        if not done:
            logger.warning("%d documents were not published to %s", self._waiting, self.settings.url)
        self._task.cancel()
        try:
            asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(10)
        except Exception:
            logger.debug("closing the NATS connection failed", exc_info=True)
        self._stop_loop()
        return done

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- the publishing thread -------------------------------------------------------------
    async def _publish_forever(self) -> None:
        js = self._nc.jetstream()
        while True:
            subject, data, headers = await self._queue.get()
            stream = self.settings.frames_stream if subject.split(".")[2] in FRAME_DOCUMENTS else None
            while True:
                try:
                    await js.publish(subject, data, timeout=5.0, headers=headers, stream=stream)
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # the server away or restarting: the same message again
                    self.retries += 1
                    if self.retries % 20 == 1:
                        logger.warning("publishing to %s failed (%r): retrying", self.settings.url, err)
                    await asyncio.sleep(0.2)
            self.published += 1
            with self._cond:
                self._waiting -= 1
                self._cond.notify_all()

    def stats(self) -> dict:
        """Documents published, publishes retried, documents still waiting and (with ``window``)
        frames cut to windows and frames that could not be cut."""
        return {"published": self.published, "retries": self.retries, "waiting": self._waiting,
                **(self.windows.counts if self.windows is not None else {}), "time": time.time()}
