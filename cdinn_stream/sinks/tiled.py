"""Tiled sink: one container per raw run, arrays that grow as batches land.

Where results go: ``client[parent][run_uid]`` -- ``parent`` is ``"cdinn"`` by default
(``"cdinn-replay"`` for replays), ``run_uid`` is the uid of the raw run's start document, so a
user who knows the raw run finds its reconstruction next to it::

    from tiled.client import from_uri
    rec = from_uri(URL, api_key=KEY)["cdinn"][raw_run_uid]
    rec["amplitude"].read(), rec["phase"].read()        # (N, h, w) float32
    rec["chi2"].read()                                  # (N,) float64: each frame's trust figure
    info = read_frame_info(rec)                         # per-frame metadata, same order
    info["seq_num"], info["peak"]                       # (N,) int64, (N, 2) int64
    obs = read_observables(rec)                         # each frame's observables by name
    obs["peak_row"], obs["strain_rms"]                  # (N,) float64, same order
    rec.metadata["model_card"], rec.metadata["complete"]

Arrays: ``amplitude``, ``phase`` ``(N, h, w)`` float32, ``chi2`` ``(N,)`` float64 (chi^2 of each
reconstruction against its measured crop) and ``frame_info`` ``(N, 8)`` float64,
one row per frame with the columns :data:`FRAME_INFO_COLUMNS` (seq_num, event time, crop
origin row and column, Bragg peak row and column, latency in s, model version; also in the array's metadata
``columns``; the integers are exact in float64), and ``observables`` ``(N, K)`` float64, the
table of each frame's observables (:data:`cdinn_stream.core.observables.OBSERVABLES`; columns and
units in the array's metadata). The model versions are listed in the metadata
``model_versions`` at the run's end (version 0: the model of ``model_card``; later ones: weights
adapted live, with where they were saved). :func:`read_frame_info` and :func:`read_run`
give them back as named arrays (:mod:`cdinn_stream.sinks.tiled_layout`). The per-frame metadata
share one array because every array costs one request per write, and on a busy server each
request costs about as much as megabytes of data (``docs/design.md``, section 13). Each write
extends the five arrays with ``ArrayClient.patch(..., extend=True)``. Refined frames (NN-seeded
ER/HIO, :mod:`cdinn_stream.live.refine`) add ``refined_amplitude``, ``refined_phase``,
``refined_seq_num``, ``refined_chi2_nn`` and ``refined_chi2``. The container's metadata
holds the model card, the raw run's start document, and at the end ``complete`` and counts
(``complete`` stays False, with ``status``, for a run of which no frame was reconstructed).

Two pieces: :class:`TiledStore` only talks to Tiled (create a run's container, extend its
arrays, write refined arrays, set the end metadata, reopen a container after a failure, probe
the server) and raises when a request fails; :class:`TiledSink` is the
:class:`~cdinn_stream.sinks.spooled.SpooledSink` wrapper around a :class:`TiledStore`, which
keeps results safe while the server is unreachable or behind.

When the server cannot be reached (stopped, restarting, network down; a 5xx or 429 answer
counts as away) nothing is lost: results go to an on-disk spool (:mod:`cdinn_stream.sinks.spool`;
``spool_dir``, default ``$CDINN_SPOOL`` or ``~/.cache/cdinn-stream/spool``) and are written back,
in order, as soon as the server answers again (probed at most every ``retry_interval`` seconds,
with each write and every second while idle); the run's container then ends ``complete``. If
the process ends before the server is back, the spool stays on disk and ``cdinn-stream backfill
--tiled URL`` writes it later. A server that is up but slower than the results come (a burst
from a fast detector) gets the same treatment: past a backlog of half its queue bound, the sink
thread parks results in the spool (:meth:`TiledSink.spill`, local disk) instead of writing them,
and each later write and idle call writes a bounded number of parked chunks back, oldest first,
so nothing is dropped and the run's arrays stay in seq_num order. The first failing request takes the
Tiled client's own retries (``TILED_RETRY_TIMEOUT``, 45 s by default) before spooling starts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..live.blocks import RefinedBlock, ResultBlock
from .spooled import SpooledSink
from .tiled_layout import (
    ARRAYS,
    FRAME_INFO_COLUMNS,
    array_metadata,
    frame_count,
    read_frame_info,
    read_observables,
    read_run,
    result_columns,
    upgrade_columns,
)

__all__ = ["connect_tiled", "TiledSink", "TiledStore", "RunState", "FRAME_INFO_COLUMNS", "read_frame_info",
           "read_observables", "read_run"]

logger = logging.getLogger(__name__)


@dataclass
class RunState:
    """A run's place in Tiled: what :class:`TiledStore` hands back and writes through."""

    container: Any  #: the run's Tiled container
    arrays: dict = field(default_factory=dict)  #: key -> Tiled array client, once written
    n: int = 0  #: frames in Tiled
    refined: dict = field(default_factory=dict)  #: refined_* key -> Tiled array client
    n_refined: int = 0


class TiledStore:
    """Writes runs to Tiled and nothing else: no retries of its own, no spool (for those, see
    :class:`TiledSink`). Every method raises when its request fails; :meth:`unreachable` tells a
    server that could not be reached from a bad request. The
    :class:`~cdinn_stream.sinks.spooled.Store` protocol.

    Args:
        client: a tiled client container (``tiled.client.from_uri(url, api_key=...)``).
        parent: name of the container that holds one container per run.
        model_card: stored in every run's metadata.
    """

    def __init__(self, client, *, parent: str = "cdinn", model_card: dict | None = None):
        self.client = client
        self.parent = parent
        self.model_card = model_card or {}
        #: the server's address, recorded with spooled runs (see SpooledSink.backfill)
        self.location = str(getattr(client, "uri", None) or getattr(getattr(client, "context", None), "api_uri", ""))
        self._parent = None
        try:  # tiled's write_array imports dask.array on first use: about 0.8 s of imports under the
            import dask.array  # noqa: F401  GIL, which would stall the scan's thread at a run's first write
        except Exception:  # missing or broken: write_array says so when it is called
            logger.debug("dask.array did not import ahead of the first write", exc_info=True)

    # -- the server ----------------------------------------------------------------------
    def _parent_container(self):
        if self._parent is None:
            self._parent = self._container(self.parent)
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

    def answers(self) -> bool:
        """Whether the server answers now (one request, 2 s at most)."""
        import httpx

        try:
            httpx.get(str(self.client.context.api_uri), timeout=2.0).raise_for_status()
        except Exception:
            return False
        return True

    @staticmethod
    def unreachable(err: BaseException) -> bool:
        """Whether ``err`` means the server could not be reached (as opposed to a bad request)."""
        import httpx

        if isinstance(err, httpx.HTTPStatusError):  # a proxy's 502/503 while Tiled restarts, or too busy
            return err.response.status_code >= 500 or err.response.status_code == 429
        return isinstance(err, (httpx.TransportError, ConnectionError, TimeoutError))

    # -- writing -------------------------------------------------------------------------
    @staticmethod
    def columns(result: ResultBlock) -> dict[str, np.ndarray]:
        """The rows ``result`` adds to each of the run's arrays."""
        return result_columns(result)

    def create(self, run_uid: str, start: dict) -> RunState:
        """The run's container, empty (a container of the same name is replaced)."""
        parent = self._parent_container()
        if run_uid in parent:  # e.g. a second replay of the same run
            logger.warning("Tiled already holds %s/%s: replacing it", self.parent, run_uid)
            parent.delete_contents(run_uid, recursive=True, external_only=False)
        return RunState(parent.create_container(run_uid, metadata={
            "raw_run_uid": run_uid, "start": start, "model_card": self.model_card, "complete": False}))

    @staticmethod
    def extend(run: RunState, cols: dict[str, np.ndarray]) -> None:
        """Add rows to the run's arrays (the first write creates them). Rows spooled by an earlier
        version, and a container it began, are brought to one layout (:func:`upgrade_columns`;
        an older container keeps its 7-column ``frame_info`` and gets ``chi2``, NaN before)."""
        cols = upgrade_columns(cols)
        if not run.arrays:
            for key in ARRAYS:
                run.arrays[key] = run.container.write_array(cols[key], key=key, metadata=array_metadata(key))
        else:
            if "chi2" not in run.arrays:  # a container an earlier version began
                run.arrays["chi2"] = run.container.write_array(np.full(run.n, np.nan), key="chi2")
            if "observables" not in run.arrays:
                run.arrays["observables"] = run.container.write_array(
                    np.full((run.n, cols["observables"].shape[1]), np.nan), key="observables",
                    metadata=array_metadata("observables"))
            width = run.arrays["frame_info"].shape[-1]
            cols = {**cols, "frame_info": cols["frame_info"][:, :width]}
            for key in ARRAYS:
                run.arrays[key].patch(cols[key], offset=(run.n,), extend=True)
        run.n += frame_count(cols)

    @staticmethod
    def finish(run: RunState, end: dict) -> None:
        """The run's end (with ``model_versions``) into its metadata, with ``frames``."""
        run.container.update_metadata({**end, "frames": run.n})

    def write_refined(self, run: RunState, block: RefinedBlock) -> None:
        """Refined frames into the run's container: ``refined_amplitude``, ``refined_phase``,
        ``refined_seq_num``, ``refined_chi2_nn``, ``refined_chi2`` (grown like the others)."""
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

    def reopen(self, manifest: dict, previous: RunState | None = None) -> RunState:
        """The run's container and arrays as the spool left them (``written`` frames in Tiled), with
        fresh handles; the refined arrays of ``previous`` (the handles these replace) carry over."""
        run_uid = manifest["run_uid"]
        parent = self._parent_container() if manifest["parent"] == self.parent else self._container(
            manifest["parent"])
        if manifest["written"] == 0 or run_uid not in parent:
            if run_uid in parent:
                parent.delete_contents(run_uid, recursive=True, external_only=False)
            run = RunState(parent.create_container(run_uid, metadata={
                "raw_run_uid": run_uid, "start": manifest["start"], "model_card": manifest["model_card"],
                "complete": False}))
        else:
            container = parent[run_uid]
            run = RunState(container, {k: container[k] for k in ARRAYS if k in container}, manifest["written"])
        if previous is not None:
            run.refined, run.n_refined = previous.refined, previous.n_refined
        return run


class TiledSink(SpooledSink):
    """Writes each run's reconstructions to Tiled (see the module docstring for the layout): a
    :class:`~cdinn_stream.sinks.spooled.SpooledSink` around a :class:`TiledStore`.

    Args:
        client: a tiled client container (``tiled.client.from_uri(url, api_key=...)``).
        parent: name of the container that holds one container per run.
        model_card: stored in every run's metadata.
        spool_dir: where results wait while the server is unreachable.
        retry_interval: seconds between probes of an unreachable server.
    """

    store_name = "Tiled"
    backfill_command = "cdinn-stream backfill --tiled URL --spool {spool}"

    def __init__(self, client, *, parent: str = "cdinn", model_card: dict | None = None,
                 spool_dir: str | Path | None = None, retry_interval: float = 2.0):
        self.store: TiledStore
        super().__init__(TiledStore(client, parent=parent, model_card=model_card), spool_dir=spool_dir,
                         retry_interval=retry_interval)

    @classmethod
    def from_uri(cls, uri: str, *, api_key: str | None = None, **kwargs) -> TiledSink:
        """Connect to a Tiled server (``api_key`` or ``TILED_API_KEY`` from the environment)."""
        return cls(connect_tiled(uri, api_key), **kwargs)

    @property
    def client(self):
        """The tiled client container the store writes through."""
        return self.store.client

    @property
    def parent_name(self) -> str:
        return self.store.parent

    @property
    def model_card(self) -> dict:
        return self.store.model_card

    @staticmethod
    def _extend(run: RunState, cols: dict[str, np.ndarray]) -> None:
        # a static method, as before the split, so that a subclass may wrap ``TiledSink._extend(run, cols)``
        TiledStore.extend(run, cols)


def connect_tiled(uri: str, api_key: str | None = None):
    """A Tiled client, or a ``ValueError`` that says what to do (start the server, pass a key)."""
    import httpx
    from tiled.client import from_uri

    try:
        return from_uri(uri, api_key=api_key)
    except httpx.HTTPStatusError as err:
        if err.response.status_code in (401, 403):
            raise ValueError(_refused(uri, api_key)) from None
        raise ValueError(f"the Tiled server at {uri} answered {err.response.status_code}: {err}") from None
    except RuntimeError as err:  # tiled: "This server requires API key authentication."
        if "api key" in str(err).lower() or "api_key" in str(err):
            raise ValueError(_refused(uri, api_key)) from None
        raise
    except httpx.TransportError as err:
        raise ValueError(f"cannot reach a Tiled server at {uri} ({err}): is it running, and is the URL right?") \
            from None


def _refused(uri: str, api_key: str | None) -> str:
    if api_key:
        return f"the Tiled server at {uri} refused the API key given: check --api-key or $TILED_API_KEY"
    return (f"the Tiled server at {uri} needs an API key: pass --api-key KEY or set TILED_API_KEY "
            "(the key the server was started with, e.g. tiled serve ... --api-key KEY)")

