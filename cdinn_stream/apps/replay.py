"""Replay stored runs from Tiled into the live callback.

``cdinn-stream replay UID --tiled URL`` reads a bluesky run stored by ``TiledWriter`` through the
Tiled client -- the start document, each stream's descriptors and, page by page, its events --
and feeds them to a :class:`~cdinn_stream.live.callback.ReconstructionCallback`, as fast as
possible or at the recorded pace. It needs nothing configured on the server: a stock ``tiled
serve catalog ... --api-key KEY`` holding the run is enough.

Frames stored in Tiled are read from Tiled; frames in the detector's own files (external data:
HDF5, one ``.npy`` per frame) become ``stream_resource``/``stream_datum`` documents, read by the
live path's readers (:mod:`cdinn_stream.live.frames`), so the files must be readable on this
machine, as they must be for the live callback; a frame that cannot be read is rejected and
counted as in a live run. Results go where live ones go, under the Tiled container
``cdinn-replay`` by default so the live ones are kept.

A replay that reconstructs no frame, or whose results a sink did not take, fails:
:func:`replay_run` raises, the command exits non-zero (and a run of which no frame was
reconstructed is not marked complete). A stored run without a stop document (an interrupted
scan) is replayed with a stop of exit status ``abort``. The pages of all streams come in the order
of their first event's time (``--pace recorded`` keeps the run's pace across streams); events are
read in pages of :data:`PAGE`, with seq_nums as stored. A stream without events (a fly scan whose
frames come only as stream_datum) is not replayed, with a warning.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

__all__ = ["run_documents", "replay_documents", "replay_run", "ReplayError"]

logger = logging.getLogger(__name__)

#: events per ``event_page`` document (and per read from Tiled)
PAGE = 256


class ReplayError(ValueError):
    """A replay that could not reconstruct anything."""


def run_documents(client, uid: str, *, page: int = PAGE) -> Iterator[tuple[str, dict]]:
    """``(name, doc)`` of a stored run: start, per stream its descriptors and event pages, stop."""
    try:
        run = client[uid]
    except KeyError:
        raise ValueError(f"no run {uid!r} in the Tiled catalog at {getattr(client, 'uri', client)}") from None
    start = run.metadata.get("start")
    if not isinstance(start, dict) or "uid" not in start:
        raise ValueError(f"{uid!r} in Tiled is not a bluesky run (no start document in its metadata)")
    yield "start", dict(start)
    pages = []
    for name in run:  # every stream's descriptors first, then the pages of all streams in time order
        header, stream_pages = _stream_documents(run[name], name, start["uid"], page)
        yield from header
        pages.append(stream_pages)
    for _, _, docs in heapq.merge(*pages, key=lambda p: (p[0], p[1])):
        yield from docs
    stop = run.metadata.get("stop")
    if stop:
        yield "stop", dict(stop)
    else:  # the sinks still get the run's end; its exit status says what was missing
        logger.warning("run %s has no stop document (it was interrupted, or is still running): replayed as "
                       "aborted", uid)
        yield "stop", {"uid": f"replay-stop-{uid}", "run_start": start["uid"], "time": time.time(),
                       "exit_status": "abort", "reason": "the stored run has no stop document", "num_events": {}}


def _stream_documents(stream, name: str, run_uid: str, page: int
                      ) -> tuple[list[tuple[str, dict]], Iterator[tuple[float, int, list[tuple[str, dict]]]]]:
    """A stream's descriptors and stream resources, and its pages as ``(time of the first event,
    index, documents)``: an event page, then the stream_datum of its frames in files."""
    from bluesky_tiled_plugins.exporters import build_descriptor_docs

    descriptors = build_descriptor_docs(dict(stream.metadata), stream_name=name, run_start_uid=run_uid)
    header: list[tuple[str, dict]] = [("descriptor", desc) for desc in descriptors]
    data_keys = descriptors[0].get("data_keys", {})
    columns = set(stream)
    if "seq_num" not in columns:
        logger.warning("stream %s of run %s has no events: not replayed", name, run_uid)
        return header, iter(())
    external = {key: _stream_resource(stream, key, run_uid) for key, info in data_keys.items()
                if info.get("external") and key in columns}
    header += [("stream_resource", resource) for resource in external.values()]
    return header, _pages(stream, descriptors, data_keys, columns, external, page)


def _pages(stream, descriptors: list[dict], data_keys: dict, columns: set, external: dict, page: int
           ) -> Iterator[tuple[float, int, list[tuple[str, dict]]]]:
    seq_nums = np.asarray(stream["seq_num"].read())
    times = np.asarray(stream["time"].read(), float)
    desc_times = np.array([d["time"] for d in descriptors])
    # an event belongs to the latest descriptor (configuration update) made before it
    owner = np.clip(np.searchsorted(desc_times, times, side="right") - 1, 0, len(descriptors) - 1)
    for lo in range(0, len(seq_nums), page):
        hi = min(lo + page, len(seq_nums))
        for d in np.unique(owner[lo:hi]):
            rows = np.flatnonzero(owner[lo:hi] == d) + lo
            a, b = int(rows[0]), int(rows[-1]) + 1
            uid = descriptors[d]["uid"]
            data = {key: np.asarray(stream[key][a:b]) for key in data_keys if key not in external and key in columns}
            stamps = {key: np.asarray(stream[f"ts_{key}"][a:b]) if f"ts_{key}" in columns else times[a:b]
                      for key in data}
            docs = [("event_page", {"descriptor": uid, "uid": [f"event-{uid}-{s}" for s in seq_nums[a:b]],
                                    "seq_num": seq_nums[a:b].tolist(), "time": times[a:b].tolist(),
                                    "data": data, "timestamps": stamps, "filled": {}})]
            # frames in the detector's own files: the live path's stream_datum reading (live/frames.py)
            docs += [("stream_datum", {"uid": f"{resource['uid']}-{a}", "stream_resource": resource["uid"],
                                       "descriptor": uid, "indices": {"start": a, "stop": b},
                                       "seq_nums": {"start": int(seq_nums[a]), "stop": int(seq_nums[b - 1]) + 1}})
                     for resource in external.values()]
            yield float(times[a]), a, docs


def _stream_resource(stream, key: str, run_uid: str) -> dict:
    """A ``stream_resource`` document for a data key whose values live in the detector's files."""
    (source,) = stream[key].data_sources()
    uris = [a.data_uri for a in sorted(source.assets, key=lambda a: a.num or 0)
            if a.parameter in ("data_uri", "data_uris")]
    return {"uid": f"sr-{stream.metadata.get('uid')}-{key}", "run_start": run_uid, "data_key": key,
            "mimetype": source.mimetype, "uri": uris[0] if uris else "",
            "parameters": {**dict(source.parameters), "data_uris": uris}}


def replay_documents(docs: Iterable[tuple[str, dict]], callback: Callable[[str, dict], None], *,
                     pace: str = "fast") -> int:
    """Feed documents to ``callback``; ``pace="recorded"`` sleeps to reproduce the event times.
    Returns the number of documents."""
    n = 0
    t_first = wall_first = None
    for name, doc in docs:
        if pace == "recorded" and name in ("event", "event_page"):
            t = doc["time"][0] if name == "event_page" else doc["time"]
            if t_first is None:
                t_first, wall_first = t, time.monotonic()
            else:
                delay = (t - t_first) - (time.monotonic() - wall_first)
                if delay > 0:
                    time.sleep(delay)
        callback(name, doc)
        n += 1
    return n


def replay_run(client, uid: str, callback, *, pace: str = "fast", timeout: float | None = None) -> dict:
    """Replay run ``uid`` from ``client`` into ``callback`` (a ReconstructionCallback), wait for its
    results to be published and close it. Returns its statistics plus ``documents``; raises
    :class:`ReplayError` when no frame was reconstructed (the reasons are in ``rejected``)."""
    try:
        n = replay_documents(run_documents(client, uid), callback, pace=pace)
        flushed = callback.flush(timeout=timeout)
    finally:
        closed = callback.close()
    stats = {"documents": n, **callback.stats()}
    if not stats.get("frames_out"):
        raise ReplayError(f"replay of run {uid} reconstructed no frame (rejected: {stats.get('rejected') or 'none'}; "
                          f"{n} documents read)")
    if not (flushed and closed):
        raise ReplayError(f"replay of run {uid}: results were still queued when the pipeline closed ({stats})")
    short = {name: s for name, s in stats["sinks"].items()
             if s["errors"] or s["frames_written"] + s.get("frames_spilled", 0) < stats["frames_out"]}
    if short:
        raise ReplayError(f"replay of run {uid}: {stats['frames_out']} frames reconstructed, but not all were "
                          f"stored: {short}")
    return stats
