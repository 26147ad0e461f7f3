"""Publishing stage: each sink runs in its own thread behind its own bounded queue.

The inference worker hands every :class:`~cdinn_stream.live.engine.ResultBlock` and run marker to
each :class:`SinkThread` and goes straight back to the model, so a slow sink (Tiled over HTTP)
holds up neither the model nor a fast sink (ZeroMQ). A sink thread takes what is waiting in
its queue (up to a write's worth) and merges consecutive results of the same run and stream into writes of up
to ``max_write_frames`` frames and ``max_write_bytes`` of reconstructions (8,192 frames at
32x32, 4,096 at 64x64 by default): the slower a sink is, the larger its writes and the fewer of them
(one Tiled request per array per write, however many frames it holds), while no write holds
more than a bounded amount of memory.

Back-pressure: a sink that can park results cheaply (:class:`~cdinn_stream.live.blocks.Spills`:
the Tiled sink's on-disk spool) gets them parked instead of written while its backlog is past
``spill_frames`` (half the queue bound), so a server that cannot keep up with a burst loses
nothing: the sink writes the parked results back, in order, as it catches up (parking happens
between writes, so the queue bound must hold what arrives during one write; the thread sets the
sink's ``behind`` to a function saying whether the backlog is past ``spill_frames``, so that its
catch-up writes stop early and the thread gets back to parking). A sink's queue holds at most
``max_queued_frames`` frames. Past that, results for that sink are dropped, counted in its
``frames_dropped`` and logged as a warning with the run uid and seq_nums -- the other sinks
still get them. Run markers are never dropped, so a sink always
sees ``open_run`` ... ``close_run`` in order. A sink's exception is logged with context and
counted in ``errors``; its thread goes on. Refined results (:mod:`cdinn_stream.live.refine`) go to
sinks that store them (:class:`~cdinn_stream.live.blocks.WritesRefined`). A sink that
:class:`~cdinn_stream.live.blocks.Idles` is called about once a second while nothing comes (the
ZeroMQ sink sends a heartbeat). The sink abilities are Protocols in
:mod:`cdinn_stream.live.blocks`; the thread is a :class:`~cdinn_stream.live.worker.Worker`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..core.timing import LatencyWindow, latency_ms
from .blocks import (
    CountsUndelivered,
    FrameBlock,
    Idles,
    RefinedBlock,
    ResultBlock,
    RunMarker,
    Sink,
    Spills,
    WritesRefined,
)
from .worker import Worker

__all__ = ["SinkThread", "SinkStats", "to_all"]

logger = logging.getLogger(__name__)

IDLE_INTERVAL = 1.0  # seconds without results before a sink's idle() is called


def to_all(threads: list[SinkThread]) -> Callable[[object], None]:
    """A function that queues an item (result, refined result, run marker) for every sink thread."""
    def put(item) -> None:
        for t in threads:
            t.put(item)

    return put


@dataclass
class SinkStats:
    """Counters of one sink (frames unless said); ``frames_spilled`` went to the sink's ``spill``
    (parked, written back by the sink later) instead of ``write``; ``latencies``: seconds from a
    frame entering the pipeline to the end of the sink's write that held it. A sink that counts
    the frames its ``write`` took but could not deliver in a ``frames_undelivered`` attribute (the
    EPICS sink without its IOC) has them counted as dropped and the write as an error, not as written."""

    frames_written: int = 0
    frames_dropped: int = 0
    frames_spilled: int = 0
    writes: int = 0
    errors: int = 0
    latencies: LatencyWindow = field(default_factory=LatencyWindow, repr=False)

    def summary(self) -> dict:
        return {"frames_written": self.frames_written, "frames_dropped": self.frames_dropped,
                "frames_spilled": self.frames_spilled, "writes": self.writes, "errors": self.errors,
                **latency_ms(self.latencies)}


def _merged(blocks: list, per_frame: tuple[str, ...], shared: tuple[str, ...]):
    """One block of the same type from ``blocks``: their frames and ``per_frame`` arrays joined,
    the ``shared`` fields of the first (all blocks agree on them)."""
    first = blocks[0]
    if len(blocks) == 1:
        return first
    return type(first)(FrameBlock.concat([b.frames for b in blocks]),
                       *(np.concatenate([getattr(b, k) for b in blocks]) for k in per_frame),
                       *(getattr(first, k) for k in shared))


def merge_results(results: list[ResultBlock]) -> ResultBlock:
    """One result from consecutive results of the same run, stream and model version (an
    observable some of them lack is NaN on their frames)."""
    merged = _merged(results, ("amplitude", "phase", "latency", "chi2"), ("model_version", "model"))
    if len(results) > 1:
        names = list(dict.fromkeys(k for r in results for k in r.observables))
        merged.observables = {k: np.concatenate([r.observables.get(k, np.full(len(r.chi2), np.nan, np.float32))
                                                 for r in results]) for k in names}
    return merged


class SinkThread(Worker):
    """One sink, its queue and its thread (see the module docstring)."""

    idle_interval = IDLE_INTERVAL

    def __init__(self, sink: Sink, *, max_queued_frames: int = 50_000, max_write_frames: int = 8192,
                 max_write_bytes: int = 128 * 2**20, spill_frames: int | None = None):
        super().__init__(f"cdinn-sink-{type(sink).__name__}")
        self.sink = sink
        self.name = type(sink).__name__
        self.max_queued_frames = max_queued_frames
        #: backlog (frames) past which results go to the sink's ``spill`` instead of ``write``
        self.spill_frames = max_queued_frames // 2 if spill_frames is None else spill_frames
        if isinstance(sink, Spills):  # the sink's catch-up yields to new results
            sink.behind = lambda: self._queued > self.spill_frames
        self._spilling = False
        self.max_write_frames = max_write_frames
        self.max_write_bytes = max_write_bytes
        self.stats = SinkStats()
        self._queued = 0
        self._start()

    def put(self, item: ResultBlock | RunMarker | RefinedBlock) -> None:
        """Queue a result, a refined result or a run marker; never blocks."""
        with self._cond:
            if isinstance(item, ResultBlock):
                n = len(item.frames)
                if self._queued + n > self.max_queued_frames:
                    self.stats.frames_dropped += n
                    f = item.frames
                    logger.warning("%s is %d frames behind: dropped %d results of run %s, seq_nums %s..%s",
                                   self.name, self._queued, n, f.run_uid, f.seq_nums[0], f.seq_nums[-1])
                    return
                self._queued += n
            self._queue.append(item)
            self._cond.notify_all()

    @property
    def queued_frames(self) -> int:
        """Frames waiting for this sink."""
        return self._queued

    def close(self, timeout: float | None = 30.0) -> bool:
        """Hand over what is queued, then stop the thread (a warning says what was left)."""
        done = super().close(timeout)
        if not done:
            logger.warning("%s did not take everything within %s s: %d frames left unwritten", self.name, timeout,
                           self._queued)
        return done

    def _take(self) -> list:
        items, frames = [], 0  # at most about one write's worth: the queue count stays honest
        limit = self._write_limit()
        while self._queue and frames < limit:
            item = self._queue.popleft()
            items.append(item)
            if isinstance(item, ResultBlock):
                frames += len(item.frames)
        self._queued -= frames
        return items

    def _write_limit(self, items=None) -> int:
        """Frames per write: ``max_write_frames``, fewer where the frames' reconstructions would
        pass ``max_write_bytes`` (sized from the first result waiting)."""
        first = next((i for i in (self._queue if items is None else items) if isinstance(i, ResultBlock)
                      and len(i.frames)), None)
        if first is None:
            return self.max_write_frames
        per_frame = first.amplitude[0].nbytes + first.phase[0].nbytes
        return max(1, min(self.max_write_frames, self.max_write_bytes // max(per_frame, 1)))

    def _handle(self, items: list) -> None:
        for group in _groups(items, self._write_limit(items)):
            if isinstance(group, RunMarker):
                self._marker(group)
                continue
            try:
                merged = merge_refined(group.blocks) if isinstance(group, RefinedGroup) else merge_results(group)
            except Exception:  # never the rest of the round (a run's end may be in it)
                self.stats.errors += 1
                logger.exception("sink %s could not join %d blocks into one write", self.name, len(group))
                continue
            if isinstance(group, RefinedGroup):
                self._refined(merged)
            elif isinstance(self.sink, Spills) and self._queued > self.spill_frames:
                self._park(merged)
            else:
                self._write(merged)

    def _idle(self) -> None:
        if isinstance(self.sink, Idles):
            self.sink.idle()

    def _write(self, result: ResultBlock) -> None:
        f = result.frames
        counts = isinstance(self.sink, CountsUndelivered)
        undelivered = self.sink.frames_undelivered if counts else 0
        try:
            self.sink.write(result)
        except Exception:
            self.stats.errors += 1
            logger.exception("sink %s failed on run %s seq_nums %s..%s", self.name, f.run_uid,
                             f.seq_nums[0], f.seq_nums[-1])
            return
        lost = self.sink.frames_undelivered - undelivered if counts else 0  # taken, not delivered (the sink warns)
        if lost:
            self.stats.errors += 1
            self.stats.frames_dropped += lost
            if lost >= len(f):
                return
        self.stats.writes += 1
        self.stats.frames_written += len(f) - lost
        if self._spilling and self._queued <= self.spill_frames // 2:
            logger.info("%s caught up (%d frames behind)", self.name, self._queued)
            self._spilling = False
        self.stats.latencies.extend(time.monotonic() - f.received)

    def _park(self, result: ResultBlock) -> None:
        f = result.frames
        if not self._spilling:
            logger.warning("%s is %d frames behind: parking results on local disk from run %s seq_num %s on; "
                           "they are written back in order as it catches up", self.name, self._queued, f.run_uid,
                           f.seq_nums[0])
            self._spilling = True
        try:
            self.sink.spill(result)
        except Exception:
            logger.exception("sink %s could not park run %s seq_nums %s..%s; writing them instead", self.name,
                             f.run_uid, f.seq_nums[0], f.seq_nums[-1])
            self._write(result)
            return
        self.stats.frames_spilled += len(f)

    def _refined(self, block: RefinedBlock) -> None:
        if not isinstance(self.sink, WritesRefined):
            return
        try:
            self.sink.write_refined(block)
        except Exception:
            self.stats.errors += 1
            logger.exception("sink %s failed on refined frames of run %s seq_nums %s", self.name, block.run_uid,
                             block.frames.seq_nums.tolist())

    def _marker(self, marker: RunMarker) -> None:
        try:
            if marker.kind == "open":
                self.sink.open_run(marker.run_uid, marker.document)
            else:
                self.sink.close_run(marker.run_uid, marker.document)
        except Exception:
            self.stats.errors += 1
            logger.exception("sink %s failed to %s run %s", self.name, marker.kind, marker.run_uid)


@dataclass(eq=False)
class RefinedGroup:
    """Refined results of one run and stream (same grid, iterations and model version) that one
    write can take together."""

    blocks: list[RefinedBlock]

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def frames(self) -> int:
        return sum(len(b.frames) for b in self.blocks)


def _refined_key(b: RefinedBlock) -> tuple:
    return b.run_uid, b.frames.stream, b.amplitude.shape[1:], b.iterations, b.model_version


def merge_refined(blocks: list[RefinedBlock]) -> RefinedBlock:
    """One refined result from refined results of the same :func:`_refined_key`."""
    return _merged(blocks, ("amplitude", "phase", "chi2_nn", "chi2_refined"), ("iterations", "model_version"))


def _same_write(a: ResultBlock, b: ResultBlock) -> bool:
    """Whether two results may share a write: same run, stream and model version."""
    return (a.frames.run_uid, a.frames.stream, a.model_version) == (b.frames.run_uid, b.frames.stream,
                                                                     b.model_version)


def _groups(items: list, max_frames: int) -> list:
    """Markers alone; consecutive results of the same run, stream and model version together, up
    to ``max_frames`` frames a group (a single larger result stays whole); refined results of the
    same run between two markers in one :class:`RefinedGroup` of up to ``max_frames`` frames (one
    write, however many rounds of refinement waited), placed where the latest of them came."""
    out: list = []
    count = 0
    refined: dict[tuple, RefinedGroup] = {}  # since the last marker: refined results join the first of their kind
    for item in items:
        if isinstance(item, RefinedBlock):  # their own arrays: joined, at the place of the latest of them
            group = refined.get(_refined_key(item))
            if group is None or group.frames + len(item.frames) > max_frames:
                group = refined[_refined_key(item)] = RefinedGroup([])
            else:
                del out[next(i for i, g in enumerate(out) if g is group)]
            group.blocks.append(item)
            out.append(group)
            continue
        if not isinstance(item, ResultBlock):  # markers stand alone, and close the refined groups
            out.append(item)
            refined.clear()
            continue
        n = len(item.frames)
        if out and isinstance(out[-1], list) and count + n <= max_frames and _same_write(out[-1][0], item):
            out[-1].append(item)
            count += n
        else:
            out.append([item])
            count = n
    return out
