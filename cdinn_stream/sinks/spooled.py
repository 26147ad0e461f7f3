"""A sink that keeps results safe while its store is unreachable or behind: the spool as a wrapper.

:class:`SpooledSink` implements the sink protocol (and :class:`~cdinn_stream.live.blocks.Spills`,
:class:`~cdinn_stream.live.blocks.Idles`, :class:`~cdinn_stream.live.blocks.WritesRefined`)
around a *store* -- anything with the small :class:`Store` protocol, which only writes (create a
run, extend it, finish it, reopen it, write refined frames, answer a probe) and raises when it
fails -- and an on-disk :class:`~cdinn_stream.sinks.spool.Spool`. The wrapper owns everything
else:

* online / offline: a failure the store calls *unreachable* (:meth:`Store.unreachable`) sends
  the run's results to the spool, with one warning; any other failure is raised to the sink
  thread (a bad request is not retried);
* probing: while offline, :meth:`Store.answers` is asked at most every ``retry_interval``
  seconds, with each write and each idle call;
* parking: :meth:`SpooledSink.spill` puts results in the spool while the store is up but behind
  (the sink thread decides, and sets :attr:`SpooledSink.behind`);
* write-back: :meth:`SpooledSink.backfill` writes spooled runs to the store, oldest first, in
  order, a bounded number of chunks per write and per idle call, and ends a run whose end came
  while it was spooled; a spool left behind by an ended process is written the same way later
  (``cdinn-stream backfill``);
* the run's end: ``complete`` is False, with a ``status``, for a run of which no frame was
  reconstructed; a run that ends while its results are spooled is finished at write-back.

Nothing here knows Tiled: :class:`~cdinn_stream.sinks.tiled.TiledSink` is this wrapper around a
:class:`~cdinn_stream.sinks.tiled.TiledStore`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..live.blocks import RefinedBlock, ResultBlock
from .spool import Spool

__all__ = ["SpooledSink", "Store", "StoreRun", "OpenRun", "BACKFILL_CHUNKS_PER_WRITE", "BACKFILL_CHUNKS_IDLE"]

logger = logging.getLogger(__name__)

#: spooled chunks written back per write that finds a spool (two for the one it adds, so the
#: spool shrinks while the sink thread keeps taking results) and per idle call
BACKFILL_CHUNKS_PER_WRITE = 2
BACKFILL_CHUNKS_IDLE = 8


class StoreRun(Protocol):
    """A run as a store holds it (its handles); ``n``: the frames the store holds."""

    n: int


class Store(Protocol):
    """What :class:`SpooledSink` needs of the place results go. Every method raises when it fails;
    :meth:`unreachable` says which failures mean "could not be reached" (spool and retry later)."""

    #: where the runs go and the model card they carry: recorded in each spooled run's manifest, so
    #: that a write-back (in this process or a later one) writes where this one would have
    parent: str
    model_card: dict
    #: which server (its address): a write-back writes only the runs spooled for this one, so a
    #: sink pointed at another server (a test server, a replay) never takes a beamline's backlog
    location: str

    def columns(self, result: ResultBlock) -> dict[str, np.ndarray]:
        """The rows ``result`` adds to the run, as :meth:`extend` takes them and the spool keeps them."""

    def create(self, run_uid: str, start: dict) -> StoreRun:
        """A new, empty run (replacing one of the same uid)."""

    def extend(self, run: StoreRun, cols: dict[str, np.ndarray]) -> None:
        """Add rows after the run's ``n`` frames (and count them in ``n``)."""

    def finish(self, run: StoreRun, end: dict) -> None:
        """Record the run's end (``end``: ``complete``, ``exit_status``, ``stop``, ``model_versions``
        (the weights its frames used), maybe ``status``)."""

    def reopen(self, manifest: dict, previous: StoreRun | None = None) -> StoreRun:
        """The run as a spool manifest left it (``written`` frames in the store), with fresh handles;
        ``previous``: the handle it replaces in this process, if any (what the manifest does not
        record carries over)."""

    def write_refined(self, run: StoreRun, block: RefinedBlock) -> None:
        """Refined frames into the run."""

    def answers(self) -> bool:
        """Whether the store answers now (a cheap probe; never raises)."""

    def unreachable(self, err: BaseException) -> bool:
        """Whether ``err`` means the store could not be reached (as opposed to a bad request)."""


@dataclass
class OpenRun:
    """What the wrapper holds for one open run."""

    start: dict
    stored: StoreRun | None = None  #: the store's handle (None while only the spool has the run)
    stale: bool = False  #: a failed write may have left partial arrays: reopen before writing

    @property
    def n(self) -> int:
        """Frames in the store."""
        return self.stored.n if self.stored is not None else 0


class SpooledSink:
    """A sink writing to ``store``, spooling to ``spool_dir`` while the store is away or behind
    (see the module docstring).

    Args:
        store: where results go (the :class:`Store` protocol).
        spool_dir: where results wait (default ``$CDINN_SPOOL`` or ``~/.cache/cdinn-stream/spool``).
        retry_interval: seconds between probes of an unreachable store.
    """

    #: how the warnings name the store ("Tiled": "Tiled server unreachable ...")
    store_name = "store"
    #: the command that writes a spool left behind, named by the warning at the end of a run
    #: (``{spool}``: the spool's root)
    backfill_command = "SpooledSink(store, spool_dir='{spool}').backfill()"

    def __init__(self, store: Store, *, spool_dir: str | Path | None = None, retry_interval: float = 2.0):
        self.store = store
        self.spool = Spool(spool_dir)
        self.retry_interval = retry_interval
        self.online = True
        self.frames_spooled = 0
        self._next_probe = 0.0
        self._runs: dict[str, OpenRun] = {}
        #: set by the :class:`~cdinn_stream.live.publish.SinkThread`: whether results are piling up
        #: (past its parking threshold); writing parked results back then stops early
        self.behind: Callable[[], bool] = lambda: False

    # -- online / offline ----------------------------------------------------------------
    def _went_away(self, err: BaseException, what: str) -> None:
        if self.online:
            logger.warning("%s server unreachable (%s: %s); spooling results to %s", self.store_name, what, err,
                           self.spool.root)
        self.online = False
        self._next_probe = time.monotonic() + self.retry_interval

    def _probe(self) -> bool:
        """While offline: whether the store answers again (at most every ``retry_interval`` s)."""
        if self.online:
            return True
        if time.monotonic() < self._next_probe:
            return False
        if not self.store.answers():
            self._next_probe = time.monotonic() + self.retry_interval
            return False
        logger.warning("%s server is back; writing spooled results", self.store_name)
        self.online = True
        return True

    def _extend(self, run: StoreRun, cols: dict[str, np.ndarray]) -> None:
        """Every write of results to the store goes through here (live writes and write-back)."""
        self.store.extend(run, cols)

    def _open(self, run_uid: str) -> OpenRun:
        run = self._runs.get(run_uid)
        if run is None:
            raise RuntimeError(f"results for run {run_uid} before its start")
        return run

    # -- sink protocol -------------------------------------------------------------------
    def open_run(self, run_uid: str, start: dict) -> None:
        if self.spool.has(run_uid):  # left by an earlier attempt at this run (a killed process): replaced
            logger.warning("run %s starts again: the %d frames spooled for it earlier are dropped (the new run "
                           "replaces them)", run_uid, self.spool.frames(run_uid))
            self.spool.remove(run_uid)
        run = self._runs[run_uid] = OpenRun(start)
        if self._probe():
            try:
                run.stored = self.store.create(run_uid, start)
                return
            except Exception as err:
                if not self.store.unreachable(err):
                    del self._runs[run_uid]  # not open: its results are refused (and counted) as before a start
                    raise
                self._went_away(err, f"opening run {run_uid}")
        self._begin_spool(run_uid, run)

    def write(self, result: ResultBlock) -> None:
        run = self._open(result.run_uid)
        cols = self.store.columns(result)
        if not self.spool.has(result.run_uid) and self._probe():
            try:
                self._extend(run.stored, cols)
                return
            except Exception as err:
                if not self.store.unreachable(err):
                    raise
                run.stale = True  # the failed write may have left partial arrays: reopen them
                self._went_away(err, f"writing run {result.run_uid}")
        self._to_spool(result.run_uid, run, cols, len(result.frames))
        if self._probe():  # catch up a bounded amount per write, so the sink thread keeps taking results
            self.backfill(max_chunks=BACKFILL_CHUNKS_PER_WRITE)

    def spill(self, result: ResultBlock) -> None:
        """Park ``result`` in the spool (local disk, fast) while the store is behind; the next
        writes, the idle probe and the end of the run write it back, in order."""
        run = self._open(result.run_uid)
        self._to_spool(result.run_uid, run, self.store.columns(result), len(result.frames))

    def _begin_spool(self, run_uid: str, run: OpenRun) -> None:
        self.spool.begin(run_uid, parent=self.store.parent, start=run.start, model_card=self.store.model_card,
                         written=run.n, server=self.store.location)

    def _to_spool(self, run_uid: str, run: OpenRun, cols: dict[str, np.ndarray], frames: int) -> None:
        self._begin_spool(run_uid, run)
        self.spool.append(run_uid, cols)
        self.frames_spooled += frames

    def close_run(self, run_uid: str, summary: dict) -> None:
        run = self._runs.pop(run_uid, None)
        if run is None:
            return
        stop = summary.get("stop", {})
        # a run of which no frame was reconstructed is not complete: a reader must not take it for results
        done = bool(run.n or (self.spool.has(run_uid) and self.spool.frames(run_uid)))
        end = {"complete": done, "exit_status": stop.get("exit_status"), "stop": stop,
               "model_versions": summary.get("model_versions", []),
               "frames_rejected": summary.get("frames_rejected") or {}}  # by category, seq_num ranges
        if not done:
            end["status"] = "no frame reconstructed"
        if not self.spool.has(run_uid):
            try:
                self.store.finish(run.stored, end)
                return
            except Exception as err:
                if not self.store.unreachable(err):
                    raise
                self._went_away(err, f"closing run {run_uid}")
                self._begin_spool(run_uid, run)
        self.spool.update(run_uid, close=end)
        if self._probe():
            self.backfill()
        if self.spool.has(run_uid) and not self.online:
            logger.warning("run %s ended while %s is unreachable: %d frames wait in %s and are written when it "
                           "answers again (or with `%s`)", run_uid, self.store_name, self.spool.frames(run_uid),
                           self.spool.root / run_uid, self.backfill_command.format(spool=self.spool.root))
        elif self.spool.has(run_uid):  # the write-back yielded to new results (see behind)
            logger.info("run %s ended with %d frames still parked in %s: they are written back with the next "
                        "writes and while idle", run_uid, self.spool.frames(run_uid), self.spool.root / run_uid)

    def idle(self) -> None:
        """Called about once a second while no results come: write spooled results back if the
        store answers (a bounded amount per call, so that new results are not held up)."""
        if self.spool.runs() and self._probe():
            self.backfill(max_chunks=BACKFILL_CHUNKS_IDLE)

    def write_refined(self, block: RefinedBlock) -> None:
        """Refined frames into the run (:meth:`Store.write_refined`). While the store is away or the
        run's results are spooled they are not spooled: the error is raised (the sink thread logs
        and counts it)."""
        run = self._runs.get(block.run_uid)
        if run is None or run.stored is None or self.spool.has(block.run_uid):
            raise ConnectionError(f"no {self.store_name} container for run {block.run_uid} now: refined frames "
                                  f"{block.frames.seq_nums.tolist()} not stored")
        self.store.write_refined(run.stored, block)

    # -- write-back ----------------------------------------------------------------------
    def backfill(self, max_chunks: int | None = None) -> int:
        """Write spooled runs back to the store, in order; returns the frames written. Stops
        after ``max_chunks`` chunks (``None``: everything), after any chunk past the first while
        :attr:`behind` says new results are piling up, or (going offline) if the store goes
        away again."""
        total = chunks_done = 0
        for run_uid in self.spool.runs():
            manifest = self.spool.manifest(run_uid)
            if manifest.get("server", self.store.location) != self.store.location:
                continue  # spooled for another server: left for a sink pointed at that one
            live = self._runs.get(run_uid)
            finished = True
            try:
                if (live is not None and live.stored is not None and not live.stale
                        and live.stored.n == manifest["written"]):
                    run = live.stored  # parked while the store was up: the live handles are good
                else:  # fresh handles: a failed write may have left partial arrays
                    run = self.store.reopen(manifest, live.stored if live is not None else None)
                for chunk in self.spool.chunks(run_uid):
                    if (max_chunks is not None and chunks_done >= max_chunks) or (chunks_done and self.behind()):
                        finished = False
                        break
                    before = run.n
                    self._extend(run, Spool.read(chunk))
                    self.spool.update(run_uid, written=run.n)
                    chunk.unlink()
                    total += run.n - before
                    chunks_done += 1
                if live is not None and run is not live.stored:
                    live.stored, live.stale = run, False
                if not finished:
                    break
                if "close" in manifest or "close" in self.spool.manifest(run_uid):
                    self.store.finish(run, self.spool.manifest(run_uid)["close"])
                    self.spool.remove(run_uid)
                elif live is not None:
                    self.spool.remove(run_uid)  # the run goes on, straight to the store again
            except Exception as err:
                if not self.store.unreachable(err):
                    raise
                if live is not None:
                    live.stale = True  # a write may have stopped half-way: reopen the handles next time
                self._went_away(err, f"writing spooled run {run_uid}")
                break
        return total
