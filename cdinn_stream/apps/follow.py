"""Follow runs live as bluesky's ``TiledWriter`` stores them in Tiled: ``cdinn-stream serve --tiled-follow URL``.

A third way in for documents, beside ``RE.subscribe(callback)`` and the bluesky 0MQ proxy: the
scan writes its runs to Tiled (``RE.subscribe(TiledWriter(client, batch_size=1))``) and
:class:`TiledFollower` subscribes to the catalog through Tiled's streaming API (one websocket
per node, ``node.subscribe()``: the catalog, then each new run, its stream, the stream's image
array and its ``internal`` table). For each run it makes bluesky documents again -- the start
from the run's metadata, the stream's descriptor, ``event_page`` documents of the rows as they
are written, the stop from the run's stop metadata -- and feeds them to a
:class:`~cdinn_stream.live.callback.ReconstructionCallback`.

Every frame reaches the callback once and in order. An image row is fed when its frame (from the
array's updates, which carry their row offset) and its table row (``seq_num``, ``time``, the
scalar fields) have both arrived. Updates that repeat rows already held are dropped; a row
offset beyond the next expected row, a missed table update (its node's sequence number skips)
or a run whose rows stop coming for ``poll`` seconds (a message over ``max_message``, a lost
websocket, an idle scan) make the follower read what is missing from Tiled by slicing the
array; at the run's end the rest is read the same way before the stop is fed. Runs started
before the follower are left alone.

The server must stream: ``tiled serve catalog --temp`` does (an in-memory streaming cache);
a catalog on disk needs ``--cache memory`` (one server process) or ``--cache redis://...``.
A server without one refuses the websocket: the follower says so and polls every ``poll`` s
(new runs, array lengths) with the same guarantees, less promptly. ``TiledWriter`` writes every
``batch_size`` events (default 10,000): give it ``batch_size=1`` (or a few) for live frames.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TiledFollower", "follow"]

logger = logging.getLogger(__name__)

#: rows per ``event_page`` (and per read from Tiled)
PAGE = 256
#: runs looked at for new ones when polling (the catalog's latest)
RECENT = 20
#: while streaming, the catalog is also listed every this many ``poll`` periods: runs whose creation
#: was missed (the server restarted, its streaming cache evicted them) and a server gone away are noticed
LIST_EVERY = 10
#: table nodes of a stream holding ``seq_num`` (TiledWriter splits tables of over 1,024 columns)
TABLES = ("internal", "internal_0")


class _Inline(concurrent.futures.Executor):
    """Runs a subscription's callbacks on its receiving thread (in order); never refuses work, so a
    subscription closed by the server while it is being disconnected raises nothing."""

    def submit(self, fn, /, *args, **kwargs):
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as err:
            logger.exception("tiled-follow: a subscription callback failed")
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        pass


class _Watch:
    """One Tiled subscription on a thread of its own; ``deliver(kind, update)`` gets its updates.
    An error ends it (kept in :attr:`error`), never as an exception in a thread; tiled itself
    reconnects a dropped websocket, resuming after the last update received."""

    def __init__(self, node, deliver: Callable[[str, object], None], kind: str, *, max_size: int):
        self.what = str(getattr(node, "uri", type(node).__name__))
        self.sub = node.subscribe(executor=_Inline())
        self.max_size = max_size
        self.error: BaseException | None = None
        self.ended = threading.Event()
        # the subscription keeps weak references: these are the strong ones
        self._callbacks = [lambda u: deliver(kind, u), lambda u: deliver(f"{kind}-metadata", u)]
        if hasattr(self.sub, "child_created"):
            self.sub.child_created.add_callback(self._callbacks[0])
            self.sub.child_metadata_updated.add_callback(self._callbacks[1])
        else:
            self.sub.new_data.add_callback(self._callbacks[0])

    def run(self, start: int | None = 0) -> BaseException | None:
        """Receive until the stream ends, :meth:`close` or an error (returned)."""
        try:
            self.sub.start(start, max_size=self.max_size)
        except Exception as err:
            self.error = err
        finally:
            self.ended.set()
        return self.error

    def start(self) -> _Watch:
        threading.Thread(target=self.run, name=f"tiled-follow {self.what}", daemon=True).start()
        return self

    def close(self) -> None:
        try:
            self.sub.disconnect()
        except Exception as err:
            logger.debug("tiled-follow: closing the subscription of %s: %s", self.what, err)


@dataclass(eq=False)
class _Run:
    """What the follower knows of one run, and how far it has fed it."""

    uid: str
    start: dict
    descriptor: dict | None = None
    image_key: str | None = None
    fed: int = 0  # rows fed to the callback
    image_rows: int = 0  # rows whose frame is held (fed or pending)
    table_rows: int = 0  # rows whose table row is held (fed or pending)
    last_seq: int = 0  # seq_num of the last table row held
    table_sequence: int | None = None  # streaming sequence number of the last table update taken
    frames: list = field(default_factory=list)  # pending frames, from row ``fed``
    rows: list = field(default_factory=list)  # pending table rows (DataFrames), from row ``fed``
    watches: list = field(default_factory=list)
    progress: float = field(default_factory=time.monotonic)  # when rows were last fed


class TiledFollower:
    """Follows the runs ``TiledWriter`` writes under ``client`` (a Tiled container) and feeds their
    documents to ``callback`` (``callback(name, doc)``).

    Args:
        client: the Tiled container the runs are written to (``connect_tiled(url, key)``).
        callback: where the documents go (a ``ReconstructionCallback``).
        stream: the event stream holding the frames.
        image_key: the detector's data key (default: the stream's one field of 2 or more dimensions).
        poll: seconds without new rows before a run is read from Tiled (and the polling period of a
            server that does not stream).
        max_message: largest websocket message taken, in bytes (larger ones: read by slicing).
    """

    def __init__(self, client, callback: Callable[[str, dict], None], *, stream: str = "primary",
                 image_key: str | None = None, poll: float = 2.0, max_message: int = 1 << 28):
        self.client = client
        self.callback = callback
        self.stream = stream
        self.image_key = image_key
        self.poll = poll
        self.max_message = max_message
        self.since = time.time()  # runs started before are not followed
        self.runs: dict[str, _Run] = {}
        self.done: set[str] = set()
        self.counts = {"runs": 0, "runs_done": 0, "frames": 0, "gaps": 0, "reads": 0, "errors": 0}
        self.streaming = True
        self._inbox: queue.Queue = queue.Queue()
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._root: _Watch | None = None
        self._unreachable = False

    @property
    def where(self) -> str:
        return str(getattr(self.client, "uri", self.client))

    # -- threads -----------------------------------------------------------------------------

    def start(self) -> TiledFollower:
        """Subscribe to the catalog and start feeding (returns at once)."""
        for target, name in ((self._follow_catalog, "catalog"), (self._work, "worker")):
            thread = threading.Thread(target=target, name=f"tiled-follow {name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def join(self, timeout: float | None = None) -> None:
        """Wait until :meth:`close` (Ctrl-C stops the wait)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._closing.is_set() and (end is None or time.monotonic() < end):
            self._closing.wait(0.5)

    def close(self, timeout: float = 10.0) -> None:
        """Stop following: unsubscribe and stop the threads (runs in progress get no stop)."""
        self._closing.set()
        self._inbox.put(("close", None, None))
        if self._root is not None:
            self._root.close()
        for thread in self._threads:
            thread.join(timeout)

    def stats(self) -> dict:
        """Runs followed and ended, frames fed, updates found missing (``gaps``), reads from Tiled, errors;
        streaming or polling."""
        return {**self.counts, "active": sorted(self.runs), "mode": "streaming" if self.streaming else "polling"}

    def _deliver(self, kind: str, update, uid: str | None = None) -> None:
        self._inbox.put((kind, uid, update))

    def _follow_catalog(self) -> None:
        """The catalog's subscription, made again after each loss; polling if the server does not stream."""
        import websockets.exceptions

        delay = 1.0
        while not self._closing.is_set():
            try:
                self._root = _Watch(self.client, self._deliver, "catalog", max_size=self.max_message)
            except Exception as err:  # e.g. a client that cannot subscribe
                self._no_streaming(f"cannot subscribe ({err})")
                return
            error = self._root.run()  # blocks while the catalog streams
            if self._closing.is_set():
                return
            if isinstance(error, websockets.exceptions.InvalidStatus):
                self._no_streaming(f"its websocket answered {error}")
                return
            logger.error("tiled-follow: lost the stream of the Tiled server at %s (%s): reconnecting in %g s, "
                         "then reading what was missed", self.where, error or "closed by the server", delay)
            self._closing.wait(delay)
            delay = min(2 * delay, 30.0)
            self._deliver("resync", None)

    def _no_streaming(self, why: str) -> None:
        logger.warning("tiled-follow: the Tiled server at %s does not stream (%s; start it with `tiled serve catalog "
                       "--temp`, or with --cache memory or --cache redis://...): polling it every %g s instead",
                       self.where, why, self.poll)
        self._deliver("polling", None)

    def _work(self) -> None:
        """The one thread that handles updates and feeds the callback, so runs keep their order."""
        last_poll, ticks = time.monotonic(), 0
        while True:
            try:
                kind, uid, update = self._inbox.get(timeout=self.poll)
            except queue.Empty:
                kind, uid, update = "poll", None, None
            if kind == "close":
                for run in self.runs.values():
                    for watch in run.watches:
                        watch.close()
                return
            try:
                self._handle(kind, uid, update)
                if time.monotonic() - last_poll >= self.poll:
                    last_poll, ticks = time.monotonic(), ticks + 1
                    if not self.streaming or ticks % LIST_EVERY == 0:
                        self._discover()
                    self._check_stalled()
            except Exception:  # never end the worker: the next poll reads what was missed
                self.counts["errors"] += 1
                logger.exception("tiled-follow: handling a %s update failed", kind)

    # -- updates -----------------------------------------------------------------------------

    def _handle(self, kind: str, uid: str | None, update) -> None:
        if kind == "polling":
            self.streaming = False
            self._discover()
        elif kind == "resync":  # the catalog's stream was lost: runs created or ended meanwhile
            self._discover()
            for run in list(self.runs.values()):
                run.progress = 0.0  # read at the next check
        elif kind == "catalog":
            if self._new_run(update.key, update.metadata, update.specs) is not None:
                self._watch(self.runs[update.key], update.child(), "run")
        elif kind == "catalog-metadata":
            run = self.runs.get(update.key)
            if run is not None and "stop" in update.metadata:
                self._finish(run, update.metadata["stop"])
        elif kind in ("run", "stream", "image", "table") and uid in self.runs:
            handler = {"run": self._stream_created, "stream": self._node_created, "image": self._image_update,
                       "table": self._table_update}[kind]
            handler(self.runs[uid], update)

    def _new_run(self, uid: str, metadata: dict, specs) -> _Run | None:
        if uid in self.runs or uid in self.done or not any(getattr(s, "name", s) == "BlueskyRun" for s in specs):
            return None
        start = metadata.get("start")
        if not isinstance(start, dict) or "uid" not in start:
            logger.error("tiled-follow: run %s has no start document in its metadata: not followed", uid)
            return None
        if start.get("time", 0) < self.since:
            return None
        run = self.runs[uid] = _Run(uid, dict(start))
        self.counts["runs"] += 1
        logger.info("tiled-follow: following run %s", uid)
        self._feed("start", run.start)
        return run

    def _watch(self, run: _Run, node, kind: str) -> None:
        """Subscribe to a node of the run; its updates come back tagged with the run's uid."""
        def deliver(k: str, update, uid: str = run.uid) -> None:
            if not k.endswith("-metadata"):
                self._deliver(k, update, uid)

        run.watches.append(_Watch(node, deliver, kind, max_size=self.max_message).start())

    def _stream_created(self, run: _Run, update) -> None:
        if update.key == self.stream and run.descriptor is None:
            self._open_stream(run, update.metadata)
            if run.image_key is not None:
                self._watch(run, update.child(), "stream")

    def _open_stream(self, run: _Run, metadata: dict) -> None:
        """The stream's descriptor (fed) and its image field."""
        from bluesky_tiled_plugins.exporters import build_descriptor_docs

        try:
            run.descriptor = build_descriptor_docs(dict(metadata), stream_name=self.stream, run_start_uid=run.uid)[0]
        except Exception as err:  # metadata the schema does not take: keep what is there
            logger.warning("tiled-follow: run %s: descriptor of %s rebuilt loosely (%s)", run.uid, self.stream, err)
            run.descriptor = {**metadata, "name": self.stream, "run_start": run.uid, "object_keys": {}}
        keys = run.descriptor.get("data_keys", {})
        images = [k for k, dk in keys.items() if len(dk.get("shape") or []) >= 2]
        if self.image_key is not None:
            images = [self.image_key] if self.image_key in keys else []
        if len(images) == 1:
            run.image_key = images[0]
        else:
            self.counts["errors"] += 1
            logger.error("tiled-follow: run %s stream %s has %s image field (data keys: %s)%s: not reconstructed",
                         run.uid, self.stream, "no" if not images else f"several ({images})", sorted(keys),
                         "" if not images or self.image_key else "; pass image_key")
        self._feed("descriptor", run.descriptor)

    def _node_created(self, run: _Run, update) -> None:
        if update.key == run.image_key:
            self._watch(run, update.child(), "image")
        elif update.key in TABLES and str(update.structure_family).endswith("table"):
            self._watch(run, update.child(), "table")

    def _image_update(self, run: _Run, update) -> None:
        rows = _rows_of(update)
        if rows is None:  # a block of a chunked write: read by slicing
            self._sync(run)
            return
        a, b = rows
        if b <= run.image_rows:
            return  # rows held already
        if a > run.image_rows:
            self.counts["gaps"] += 1
            self._sync(run)  # rows missed (or a message too large): read them
            return
        frames = np.asarray(update.data())
        run.frames.append(frames[run.image_rows - a :])
        run.image_rows = b
        self._feed_ready(run)

    def _table_update(self, run: _Run, update) -> None:
        expected = 1 if run.table_sequence is None else run.table_sequence + 1
        run.table_sequence = update.sequence
        if update.sequence != expected:
            self.counts["gaps"] += 1
            self._sync(run)  # an update was missed: its rows have no offset, read the table
            return
        table = update.data()
        if "seq_num" not in table:
            return
        new = table[table["seq_num"] > run.last_seq]
        if len(new):
            run.rows.append(new)
            run.table_rows += len(new)
            run.last_seq = int(new["seq_num"].iloc[-1])
            self._feed_ready(run)

    # -- rows to documents --------------------------------------------------------------------

    def _feed_ready(self, run: _Run) -> None:
        """Feed the rows whose frame and table row are both held."""
        n = min(run.image_rows, run.table_rows) - run.fed
        if n <= 0:
            return
        import pandas as pd

        frames = np.concatenate(run.frames) if len(run.frames) > 1 else run.frames[0]
        rows = pd.concat(run.rows) if len(run.rows) > 1 else run.rows[0]
        run.frames, run.rows = ([frames[n:]] if len(frames) > n else []), ([rows.iloc[n:]] if len(rows) > n else [])
        self._emit(run, frames[:n], rows.iloc[:n])

    def _emit(self, run: _Run, frames: np.ndarray, rows) -> None:
        """Event pages of these rows (their frames and table rows), in pages of :data:`PAGE`."""
        desc = run.descriptor
        seq = rows["seq_num"].to_numpy()
        times = rows["time"].to_numpy(float) if "time" in rows else np.full(len(rows), time.time())
        fields = [k for k in desc.get("data_keys", {}) if k != run.image_key and k in rows]
        for a in range(0, len(seq), PAGE):
            b = min(a + PAGE, len(seq))
            data = {run.image_key: frames[a:b], **{k: rows[k].to_numpy()[a:b] for k in fields}}
            stamps = {k: rows[f"ts_{k}"].to_numpy()[a:b] if f"ts_{k}" in rows else times[a:b] for k in data}
            self._feed("event_page", {"descriptor": desc["uid"], "uid": [f"{desc['uid']}-{s}" for s in seq[a:b]],
                                      "seq_num": seq[a:b].tolist(), "time": times[a:b].tolist(), "data": data,
                                      "timestamps": stamps, "filled": {}})
        run.fed += len(seq)
        run.progress = time.monotonic()
        self.counts["frames"] += len(seq)

    def _feed(self, name: str, doc: dict) -> None:
        try:
            self.callback(name, doc)
        except Exception:
            self.counts["errors"] += 1
            logger.exception("tiled-follow: the callback failed on a %s document", name)

    # -- reading from Tiled --------------------------------------------------------------------

    def _sync(self, run: _Run) -> None:
        """Read from Tiled, by slicing, the rows of ``run`` not fed yet (replacing what was held) and feed them."""
        try:
            node = self.client[run.uid]
            if self.stream not in node:
                return
            stream = node[self.stream]
            base = getattr(stream, "base", stream)
            if run.descriptor is None:
                self._open_stream(run, dict(stream.metadata))
                if self.streaming and run.image_key is not None:
                    self._watch(run, base, "stream")
            if run.image_key is None:
                return
            tables = [t for t in TABLES if t in base]
            table = base[tables[0]].read() if tables else None
            n_table = 0 if table is None or "seq_num" not in table else len(table)
            n_image = base[run.image_key].shape[0] if run.image_key in base else 0
            self.counts["reads"] += 1
            # hold what was read (the rows past the other side's too: their updates have gone by), feed page by page
            run.frames, run.rows = [], []
            run.image_rows = run.table_rows = run.fed
            if n_table > run.fed:
                run.rows, run.table_rows = [table.iloc[run.fed :]], n_table
                run.last_seq = int(table["seq_num"].iloc[-1])
            for a in range(run.fed, n_image, PAGE):
                b = min(a + PAGE, n_image)
                run.frames.append(np.asarray(base[run.image_key][a:b]))
                run.image_rows = b
                self._feed_ready(run)
        except Exception as err:
            self._unreachable_error(err, f"reading run {run.uid}")
        else:
            self._reachable()

    def _finish(self, run: _Run, stop: dict) -> None:
        """The run has ended: read what is missing, feed the stop, unsubscribe."""
        self._sync(run)
        expected = (stop.get("num_events") or {}).get(self.stream)
        if run.image_key is not None and expected is not None and run.fed < expected:
            self.counts["errors"] += 1
            logger.error("tiled-follow: run %s ended with %d events in %s, but only %d could be read from Tiled",
                         run.uid, expected, self.stream, run.fed)
        self._feed("stop", dict(stop))
        for watch in run.watches:
            watch.close()
        del self.runs[run.uid]
        self.done.add(run.uid)
        self.counts["runs_done"] += 1
        logger.info("tiled-follow: run %s done (%d frames)", run.uid, run.fed)

    def _check_stalled(self) -> None:
        """Runs without new rows for ``poll`` s: read them (and see if they ended)."""
        for run in list(self.runs.values()):
            if time.monotonic() - run.progress < self.poll:
                continue
            run.progress = time.monotonic()
            self._sync(run)
            try:
                stop = self.client[run.uid].metadata.get("stop")
            except Exception as err:
                self._unreachable_error(err, f"reading run {run.uid}")
                continue
            if stop:
                self._finish(run, stop)

    def _discover(self) -> None:
        """New runs among the catalog's latest (polling; while streaming, now and then)."""
        try:
            keys = list(self.client.keys()[-1 : -(RECENT + 1) : -1])[::-1]
            for uid in keys:
                if uid not in self.runs and uid not in self.done:
                    node = self.client[uid]
                    run = self._new_run(uid, dict(node.metadata), node.specs)
                    if run is not None:
                        run.progress = 0.0  # read at the next check
                        if self.streaming:
                            self._watch(run, node, "run")
        except Exception as err:
            self._unreachable_error(err, "listing its runs")
        else:
            self._reachable()

    def _unreachable_error(self, err: Exception, doing: str) -> None:
        self.counts["errors"] += 1
        if not self._unreachable:
            logger.error("tiled-follow: the Tiled server at %s failed %s (%s: %s): will try again (said once until it "
                         "answers)", self.where, doing, type(err).__name__, err)
        self._unreachable = True

    def _reachable(self) -> None:
        if self._unreachable:
            logger.warning("tiled-follow: the Tiled server at %s answers again", self.where)
        self._unreachable = False


def _rows_of(update) -> tuple[int, int] | None:
    """Rows ``[a, b)`` of an array update: a write of the whole array, a patch at an offset, an
    external array's new shape; ``None`` for a block of a chunked write."""
    patch = getattr(update, "patch", None)
    if patch is not None:
        return patch.offset[0], patch.offset[0] + patch.shape[0]
    if getattr(update, "block", None) is not None:
        return None
    offset = getattr(update, "offset", None)
    a = offset[0] if offset else 0
    return a, a + update.shape[0]


def follow(client, callback: Callable[[str, dict], None], **options) -> TiledFollower:
    """A started :class:`TiledFollower` (see its arguments)."""
    return TiledFollower(client, callback, **options).start()
