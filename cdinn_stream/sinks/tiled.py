"""Tiled sink: one container per raw run, arrays that grow as batches land.

Where results go: ``client[parent][run_uid]`` -- ``parent`` is ``"cdinn"`` by default
(``"cdinn-replay"`` for replays), ``run_uid`` is the uid of the raw run's start document, so a
user who knows the raw run finds its reconstruction next to it::

    from tiled.client import from_uri
    rec = from_uri(URL, api_key=KEY)["cdinn"][raw_run_uid]
    rec["amplitude"].read(), rec["phase"].read()        # (N, h, w) float32
    info = read_frame_info(rec)                         # per-frame metadata, same order
    info["seq_num"], info["peak"]                       # (N,) int64, (N, 2) int64
    rec.metadata["model_card"], rec.metadata["complete"]

Arrays: ``amplitude``, ``phase`` ``(N, h, w)`` float32 and ``frame_info`` ``(N, 7)`` float64,
one row per frame with the columns :data:`FRAME_INFO_COLUMNS` (seq_num, event time, crop
origin row and column, Bragg peak row and column, latency in s; also in the array's metadata
``columns``; the integers are exact in float64). :func:`read_frame_info` and :func:`read_run`
give them back as named arrays. The per-frame metadata share one array because every array
costs one request per write, and on a busy server each request costs about as much as
megabytes of data (``docs/design.md``, section 13). Each write extends the three arrays with
``ArrayClient.patch(..., extend=True)``. Refined frames (NN-seeded
ER/HIO, :mod:`cdinn_stream.live.refine`) add ``refined_amplitude``, ``refined_phase``,
``refined_seq_num``, ``refined_chi2_nn`` and ``refined_chi2``. The container's metadata
holds the model card, the raw run's start document, and at the end ``complete`` and counts
(``complete`` stays False, with ``status``, for a run of which no frame was reconstructed).

When the server cannot be reached (stopped, restarting, network down) nothing is lost: results
go to an on-disk spool (:mod:`cdinn_stream.sinks.spool`; ``spool_dir``, default
``$CDINN_SPOOL`` or ``~/.cache/cdinn-stream/spool``) and are written back, in order, as soon as
the server answers again (probed at most every ``retry_interval`` seconds, with each write and
every second while idle); the run's container then ends ``complete``. If the process ends
before the server is back, the spool stays on disk and ``cdinn-stream backfill --tiled URL``
writes it later. A server that is up but slower than the results come (a burst from a fast
detector) gets the same treatment: past a backlog of half its queue bound, the sink
thread parks results in the spool (:meth:`TiledSink.spill`, local disk) instead of writing them,
and each later write and idle call writes a bounded number of parked chunks back, oldest first,
so nothing is dropped and the run's arrays stay in seq_num order. The first failing request takes the
Tiled client's own retries (``TILED_RETRY_TIMEOUT``, 45 s by default) before spooling starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..live.blocks import RefinedBlock, ResultBlock
from .spool import Spool
from .tiled_layout import ARRAYS, FRAME_INFO_COLUMNS, frame_count, read_frame_info, read_run, result_columns

__all__ = ["TiledSink", "FRAME_INFO_COLUMNS", "read_frame_info", "read_run"]

logger = logging.getLogger(__name__)

#: spooled chunks written back per write that finds a spool (two for the one it adds, so the
#: spool shrinks while the sink thread keeps taking results) and per idle call
BACKFILL_CHUNKS_PER_WRITE = 2
BACKFILL_CHUNKS_IDLE = 8

@dataclass
class RunState:
    """What the sink holds for one open run."""

    start: dict
    container: Any = None  #: the run's Tiled container (None while only the spool has the run)
    arrays: dict = field(default_factory=dict)  #: key -> Tiled array client, once written
    n: int = 0  #: frames in Tiled
    stale: bool = False  #: a failed write may have left partial arrays: reopen before writing
    refined: dict = field(default_factory=dict)  #: refined_* key -> Tiled array client
    n_refined: int = 0


def _unreachable(err: BaseException) -> bool:
    """Whether ``err`` means the server could not be reached (as opposed to a bad request)."""
    import httpx

    if isinstance(err, httpx.HTTPStatusError):  # a proxy's 502/503 while Tiled restarts, or too busy
        return err.response.status_code >= 500 or err.response.status_code == 429
    return isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError))


class TiledSink:
    """Writes each run's reconstructions to Tiled (see the module docstring for the layout).

    Args:
        client: a tiled client container (``tiled.client.from_uri(url, api_key=...)``).
        parent: name of the container that holds one container per run.
        model_card: stored in every run's metadata.
        spool_dir: where results wait while the server is unreachable.
        retry_interval: seconds between probes of an unreachable server.
    """

    def __init__(self, client, *, parent: str = "cdinn", model_card: dict | None = None,
                 spool_dir: str | Path | None = None, retry_interval: float = 2.0):
        self.client = client
        self.parent_name = parent
        self.model_card = model_card or {}
        self.spool = Spool(spool_dir)
        self.retry_interval = retry_interval
        self.online = True
        self.frames_spooled = 0
        self._next_probe = 0.0
        self._runs: dict[str, RunState] = {}
        self._parent = None
        #: set by the :class:`~cdinn_stream.live.publish.SinkThread`: whether results are piling up
        #: (past its parking threshold); writing parked results back then stops early
        self.behind: Callable[[], bool] = lambda: False
        try:  # tiled's write_array imports dask.array on first use: about 0.8 s of imports under the
            import dask.array  # noqa: F401  GIL, which would stall the scan's thread at a run's first write
        except Exception:  # missing or broken: write_array says so when it is called
            logger.debug("dask.array did not import ahead of the first write", exc_info=True)

    @classmethod
    def from_uri(cls, uri: str, *, api_key: str | None = None, **kwargs) -> TiledSink:
        """Connect to a Tiled server (``api_key`` or ``TILED_API_KEY`` from the environment)."""
        from tiled.client import from_uri

        return cls(from_uri(uri, api_key=api_key), **kwargs)

    # -- the server ----------------------------------------------------------------------
    def _parent_container(self):
        if self._parent is None:
            self._parent = self._container(self.parent_name)
        return self._parent

    def _container(self, name: str):
        """The top-level container ``name``, created if missing (another writer may create it at the
        same moment: then use theirs)."""
        if name in self.client:
            return self.client[name]
        try:
            return self.client.create_container(name, metadata={"description": "cdinn-stream reconstructions"})
        except Exception:
            if name in self.client:
                return self.client[name]
            raise

    def _went_away(self, err: BaseException, what: str) -> None:
        if self.online:
            logger.warning("Tiled server unreachable (%s: %s); spooling results to %s", what, err, self.spool.root)
        self.online = False
        self._next_probe = time.monotonic() + self.retry_interval

    def _probe(self) -> bool:
        """While offline: whether the server answers again (at most every ``retry_interval`` s)."""
        if self.online:
            return True
        if time.monotonic() < self._next_probe:
            return False
        import httpx

        try:
            httpx.get(str(self.client.context.api_uri), timeout=2.0).raise_for_status()
        except Exception:
            self._next_probe = time.monotonic() + self.retry_interval
            return False
        logger.warning("Tiled server is back; writing spooled results")
        self.online = True
        return True

    # -- sink protocol -------------------------------------------------------------------
    def open_run(self, run_uid: str, start: dict) -> None:
        run = self._runs[run_uid] = RunState(start)
        if self._probe():
            try:
                run.container = self._create(run_uid, start)
                return
            except Exception as err:
                if not _unreachable(err):
                    raise
                self._went_away(err, f"opening run {run_uid}")
        self.spool.begin(run_uid, parent=self.parent_name, start=start, model_card=self.model_card, written=0)

    def write(self, result: ResultBlock) -> None:
        run = self._runs.get(result.run_uid)
        if run is None:
            raise RuntimeError(f"results for run {result.run_uid} before its start")
        cols = result_columns(result)
        if not self.spool.has(result.run_uid) and self._probe():
            try:
                self._extend(run, cols)
                return
            except Exception as err:
                if not _unreachable(err):
                    raise
                run.stale = True  # the failed write may have left partial arrays: reopen them
                self._went_away(err, f"writing run {result.run_uid}")
        self._to_spool(result.run_uid, run, cols)
        if self._probe():  # catch up a bounded amount per write, so the sink thread keeps taking results
            self.backfill(max_chunks=BACKFILL_CHUNKS_PER_WRITE)

    def spill(self, result: ResultBlock) -> None:
        """Park ``result`` in the spool (local disk, fast) while the server is behind; the next
        writes, the idle probe and the end of the run write it back, in order."""
        run = self._runs.get(result.run_uid)
        if run is None:
            raise RuntimeError(f"results for run {result.run_uid} before its start")
        self._to_spool(result.run_uid, run, result_columns(result))

    def _to_spool(self, run_uid: str, run: RunState, cols: dict[str, np.ndarray]) -> None:
        self.spool.begin(run_uid, parent=self.parent_name, start=run.start, model_card=self.model_card,
                         written=run.n)
        self.spool.append(run_uid, cols)
        self.frames_spooled += frame_count(cols)

    def close_run(self, run_uid: str, summary: dict) -> None:
        run = self._runs.pop(run_uid, None)
        if run is None:
            return
        stop = summary.get("stop", {})
        # a run of which no frame was reconstructed is not complete: a reader must not take it for results
        done = bool(run.n or self.spool.has(run_uid))
        end = {"complete": done, "exit_status": stop.get("exit_status"), "stop": stop}
        if not done:
            end["status"] = "no frame reconstructed"
        if not self.spool.has(run_uid):
            try:
                run.container.update_metadata({**end, "frames": run.n})
                return
            except Exception as err:
                if not _unreachable(err):
                    raise
                self._went_away(err, f"closing run {run_uid}")
                self.spool.begin(run_uid, parent=self.parent_name, start=run.start, model_card=self.model_card,
                                 written=run.n)
        self.spool.update(run_uid, close=end)
        if self._probe():
            self.backfill()
        if self.spool.has(run_uid) and not self.online:
            logger.warning("run %s ended while Tiled is unreachable: %d frames wait in %s and are written when it "
                           "answers again (or with `cdinn-stream backfill --tiled URL --spool %s`)", run_uid,
                           self.spool.frames(run_uid), self.spool.root / run_uid, self.spool.root)
        elif self.spool.has(run_uid):  # the write-back yielded to new results (see behind)
            logger.info("run %s ended with %d frames still parked in %s: they are written back with the next "
                        "writes and while idle", run_uid, self.spool.frames(run_uid), self.spool.root / run_uid)

    def idle(self) -> None:
        """Called about once a second while no results come: write spooled results back if the
        server answers (a bounded amount per call, so that new results are not held up)."""
        if self.spool.runs() and self._probe():
            self.backfill(max_chunks=BACKFILL_CHUNKS_IDLE)

    def write_refined(self, block: RefinedBlock) -> None:
        """Refined frames into the run's container: ``refined_amplitude``, ``refined_phase``,
        ``refined_seq_num``, ``refined_chi2_nn``, ``refined_chi2`` (grown like the others). While
        the server is away they are not spooled: the error is logged and counted."""
        run = self._runs.get(block.run_uid)
        if run is None or run.container is None or self.spool.has(block.run_uid):
            raise ConnectionError(f"no Tiled container for run {block.run_uid} now: refined frames "
                                  f"{block.frames.seq_nums.tolist()} not stored")
        cols = {"refined_amplitude": np.ascontiguousarray(block.amplitude, np.float32),
                "refined_phase": np.ascontiguousarray(block.phase, np.float32),
                "refined_seq_num": block.frames.seq_nums.astype(np.int64),
                "refined_chi2_nn": np.asarray(block.chi2_nn, np.float64),
                "refined_chi2": np.asarray(block.chi2_refined, np.float64)}
        if not run.refined:
            for key, value in cols.items():
                run.refined[key] = run.container.write_array(value, key=key)
        else:
            for key, value in cols.items():
                run.refined[key].patch(value, offset=(run.n_refined,), extend=True)
        run.n_refined += len(block.frames)

    # -- writing -------------------------------------------------------------------------
    def _create(self, run_uid: str, start: dict):
        parent = self._parent_container()
        if run_uid in parent:  # e.g. a second replay of the same run
            logger.warning("Tiled already holds %s/%s: replacing it", self.parent_name, run_uid)
            parent.delete_contents(run_uid, recursive=True, external_only=False)
        return parent.create_container(run_uid, metadata={
            "raw_run_uid": run_uid, "start": start, "model_card": self.model_card, "complete": False})

    @staticmethod
    def _extend(run: RunState, cols: dict[str, np.ndarray]) -> None:
        if not run.arrays:
            for key in ARRAYS:
                meta = {"columns": list(FRAME_INFO_COLUMNS)} if key == "frame_info" else None
                run.arrays[key] = run.container.write_array(cols[key], key=key, metadata=meta)
        else:
            for key in ARRAYS:
                run.arrays[key].patch(cols[key], offset=(run.n,), extend=True)
        run.n += frame_count(cols)

    def backfill(self, max_chunks: int | None = None) -> int:
        """Write spooled runs back to the server, in order; returns the frames written. Stops
        after ``max_chunks`` chunks (``None``: everything), after any chunk past the first while
        :attr:`behind` says new results are piling up, or (going offline) if the server goes
        away again."""
        total = chunks_done = 0
        for run_uid in self.spool.runs():
            manifest = self.spool.manifest(run_uid)
            live = self._runs.get(run_uid)
            finished = True
            try:
                if (live is not None and live.container is not None and not live.stale
                        and live.n == manifest["written"]):
                    run = live  # parked while the server was up: the live handles are good
                else:
                    run = self._reopen(manifest)  # fresh handles: a failed write may have left partial arrays
                for chunk in self.spool.chunks(run_uid):
                    if (max_chunks is not None and chunks_done >= max_chunks) or (chunks_done and self.behind()):
                        finished = False
                        break
                    cols = Spool.read(chunk)
                    self._extend(run, cols)
                    self.spool.update(run_uid, written=run.n)
                    chunk.unlink()
                    total += frame_count(cols)
                    chunks_done += 1
                if live is not None and run is not live:
                    live.container, live.arrays, live.n, live.stale = run.container, run.arrays, run.n, False
                if not finished:
                    break
                if "close" in manifest or "close" in self.spool.manifest(run_uid):
                    end = self.spool.manifest(run_uid)["close"]
                    run.container.update_metadata({**end, "frames": run.n})
                    self.spool.remove(run_uid)
                elif live is not None:
                    self.spool.remove(run_uid)  # the run goes on, straight to the server again
            except Exception as err:
                if not _unreachable(err):
                    raise
                if live is not None:
                    live.stale = True  # a write may have stopped half-way: reopen the handles next time
                self._went_away(err, f"writing spooled run {run_uid}")
                break
        return total

    def _reopen(self, manifest: dict) -> RunState:
        """The run's container and arrays as the spool left them (``written`` frames in Tiled)."""
        run_uid = manifest["run_uid"]
        parent = self._parent_container() if manifest["parent"] == self.parent_name else self._container(
            manifest["parent"])
        if manifest["written"] == 0 or run_uid not in parent:
            if run_uid in parent:
                parent.delete_contents(run_uid, recursive=True, external_only=False)
            container = parent.create_container(run_uid, metadata={
                "raw_run_uid": run_uid, "start": manifest["start"], "model_card": manifest["model_card"],
                "complete": False})
            return RunState(manifest["start"], container)
        container = parent[run_uid]
        return RunState(manifest["start"], container, {k: container[k] for k in ARRAYS}, manifest["written"])
