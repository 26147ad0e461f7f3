"""Acknowledge a work message only once its frames' results are stored: the pool worker's ledger.

A worker of the pool (:mod:`cdinn_stream.apps.worker`) takes frame messages from JetStream and
must acknowledge each one only after every frame it carries is in every tracked sink (Tiled and
ZeroMQ). :class:`AckTracker` keeps, per message, the frames ``(run uid, stream, seq_num)`` still
owed by each sink; :class:`TrackedSink` wraps a sink and reports each write (or failure) to it.
When a message's last frame is written everywhere, ``on_done(token, ok)`` is called (from the
sink's thread): ``ok`` is False when a sink failed on one of its frames, or the model failed on
them (:meth:`AckTracker.lost`, from the engine's ``on_failed``): the worker then asks for a
redelivery. Frames that never produce a result (rejected: an empty frame, a stream without
images) are settled with :meth:`AckTracker.settle` once the pipeline is idle.

:func:`tracked` wraps a sink so that the sink thread sees the same optional abilities
(:class:`~cdinn_stream.live.blocks.Spills`, :class:`~cdinn_stream.live.blocks.CountsUndelivered`)
as the sink has: a spooled sink still parks results on disk while it is behind, and a parked
frame counts as written (it is on the worker's disk and reaches the store with the write-back).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .blocks import Closes, CountsUndelivered, Idles, RefinedBlock, ResultBlock, Sink, Spills, WritesRefined

__all__ = ["AckTracker", "TrackedSink", "tracked"]

Key = tuple[str, str, int]  # (run uid, stream, seq_num)


@dataclass(eq=False)
class _Pending:
    token: object
    owed: dict[Key, set[int]]  #: frame -> sinks that have not written it yet
    keys: frozenset = frozenset()  #: all its frames
    seen: set[Key] = field(default_factory=set)  #: frames some sink wrote
    failed: bool = False
    fed: bool = False
    since: float = field(default_factory=time.monotonic)


class AckTracker:
    """Which sinks still owe which frames of which message (see the module docstring).

    Args:
        sinks: how many tracked sinks there are (indices ``0 .. sinks - 1``).
        on_done: called with ``(token, ok)`` once a message is settled.
    """

    def __init__(self, sinks: int, on_done: Callable[[object, bool], None]):
        self.sinks = sinks
        self.on_done = on_done
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._by_key: dict[Key, list[_Pending]] = {}

    def expect(self, token, run_uid: str, stream: str, seq_nums, since: float | None = None) -> None:
        """A message (``token``) carrying these frames is about to be fed to the pipeline (held
        since ``since``, ``time.monotonic()``: now by default; :meth:`waiting` counts from it)."""
        keys = {(run_uid, stream, int(s)) for s in seq_nums}
        entry = _Pending(token, {k: set(range(self.sinks)) for k in keys}, frozenset(keys))
        if since is not None:
            entry.since = since
        with self._lock:
            self._pending[id(token)] = entry
            for k in keys:
                self._by_key.setdefault(k, []).append(entry)
        if not keys or not self.sinks:
            self._finish([entry])

    def forget(self, token) -> None:
        """Drop a message from the ledger without settling it (it was given back to the server)."""
        with self._lock:
            entry = self._pending.pop(id(token), None)
            if entry is None:
                return
            for key in entry.keys:
                lst = self._by_key.get(key, [])
                if entry in lst:
                    lst.remove(entry)
                if not lst:
                    self._by_key.pop(key, None)

    def fed(self, token) -> None:
        """The message's frames are in the pipeline (results or rejections follow)."""
        entry = self._pending.get(id(token))
        if entry is not None:
            entry.fed = True

    def written(self, sink: int, run_uid: str, stream: str, seq_nums, ok: bool = True) -> None:
        """Sink ``sink`` wrote (``ok``) or failed to write these frames."""
        done = []
        with self._lock:
            for s in seq_nums:
                key = (run_uid, stream, int(s))
                for entry in self._by_key.get(key, []):
                    owed = entry.owed.get(key)
                    if owed is None:
                        continue
                    entry.seen.add(key)
                    entry.failed |= not ok
                    owed.discard(sink)
                    if not owed:
                        del entry.owed[key]
                        if not entry.owed:
                            done.append(entry)
        self._finish(done)

    def lost(self, run_uid: str, stream: str, seq_nums) -> None:
        """These frames will reach no sink (the model failed on them): the messages carrying them
        are settled as failed once nothing else is owed, so they are redelivered, not acknowledged."""
        done = []
        with self._lock:
            for s in seq_nums:
                key = (run_uid, stream, int(s))
                for entry in self._by_key.get(key, []):
                    if entry.owed.pop(key, None) is not None:
                        entry.failed = True
                        if not entry.owed:
                            done.append(entry)
        self._finish(done)

    def settle(self) -> int:
        """(With the pipeline idle.) Settle the fed messages still owed frames: frames no sink
        wrote were rejected by the pipeline (acknowledged: they would be rejected again); frames
        some sink wrote and another did not were lost by that sink (redelivered). Returns how many
        messages were settled."""
        with self._lock:
            entries = [e for e in self._pending.values() if e.fed and e.owed]
            for e in entries:
                e.failed |= any(k in e.seen for k in e.owed)
                e.owed.clear()
        self._finish(entries)
        return len(entries)

    def _finish(self, entries: list[_Pending]) -> None:
        with self._lock:
            for e in entries:
                self._pending.pop(id(e.token), None)
                for key in e.keys:
                    lst = self._by_key.get(key, [])
                    if e in lst:
                        lst.remove(e)
                    if not lst:
                        self._by_key.pop(key, None)
        for e in entries:
            self.on_done(e.token, not e.failed)

    def waiting(self) -> list:
        """The tokens of the messages not yet settled, oldest first, with their age (s)."""
        now = time.monotonic()
        with self._lock:
            return [(e.token, now - e.since) for e in self._pending.values()]

    def __len__(self) -> int:
        return len(self._pending)


class TrackedSink:
    """A sink that reports each write of results to an :class:`AckTracker` (as sink ``index``),
    and passes everything else on to the sink it wraps (idle calls, refined results, close).
    :func:`tracked` adds what the wrapped sink can do beyond that (parking, undelivered counts)."""

    def __init__(self, sink: Sink, tracker: AckTracker, index: int):
        self.sink = sink
        self.tracker = tracker
        self.index = index

    def open_run(self, run_uid: str, start: dict) -> None:
        self.sink.open_run(run_uid, start)

    def write(self, result: ResultBlock) -> None:
        f = result.frames
        counts = isinstance(self.sink, CountsUndelivered)
        before = self.sink.frames_undelivered if counts else 0
        try:
            self.sink.write(result)
        except BaseException:
            self.tracker.written(self.index, f.run_uid, f.stream, f.seq_nums, ok=False)
            raise
        # frames a sink took and could not deliver (it counts them) are not written
        ok = not counts or self.sink.frames_undelivered == before
        self.tracker.written(self.index, f.run_uid, f.stream, f.seq_nums, ok=ok)

    def close_run(self, run_uid: str, summary: dict) -> None:
        self.sink.close_run(run_uid, summary)

    def idle(self) -> None:
        if isinstance(self.sink, Idles):
            self.sink.idle()

    def write_refined(self, block: RefinedBlock) -> None:
        if isinstance(self.sink, WritesRefined):
            self.sink.write_refined(block)

    def close(self) -> None:
        if isinstance(self.sink, Closes):
            self.sink.close()


class _TrackedSpills:
    """For a sink that :class:`~cdinn_stream.live.blocks.Spills`: park results in its spool; a parked
    frame counts as written (on the worker's disk, written back to the store in order)."""

    sink: Spills
    tracker: AckTracker
    index: int

    def spill(self, result: ResultBlock) -> None:
        self.sink.spill(result)  # a failure is raised: the sink thread writes the result instead
        f = result.frames
        self.tracker.written(self.index, f.run_uid, f.stream, f.seq_nums)

    @property
    def behind(self):
        return self.sink.behind

    @behind.setter
    def behind(self, value) -> None:  # set by the sink thread: the wrapped sink's write-back yields
        self.sink.behind = value


class _TrackedCounts:
    """For a sink that :class:`~cdinn_stream.live.blocks.CountsUndelivered`: its count, for the sink thread."""

    sink: CountsUndelivered

    @property
    def frames_undelivered(self) -> int:
        return self.sink.frames_undelivered


def tracked(sink: Sink, tracker: AckTracker, index: int) -> TrackedSink:
    """``sink`` wrapped in a :class:`TrackedSink` whose class is named ``Tracked<its class>`` (the
    pipeline's statistics name each sink by its class), with the optional abilities ``sink`` has
    (the protocols are checked with ``isinstance``: the wrapper must not claim one its sink lacks)."""
    bases: list[type] = [TrackedSink]
    if isinstance(sink, Spills):
        bases.insert(0, _TrackedSpills)
    if isinstance(sink, CountsUndelivered):
        bases.insert(0, _TrackedCounts)
    cls = type(f"Tracked{type(sink).__name__}", tuple(bases), {})
    return cls(sink, tracker, index)
