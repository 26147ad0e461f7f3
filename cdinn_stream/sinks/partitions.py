"""Several workers, one run in Tiled: a partition per worker while the run goes, one ordered run after.

While a run is processed by the worker pool (:mod:`cdinn_stream.apps.worker`), each worker
process writes the results of the frames it got to its own *partition*,
``<parent>-parts/<run uid>.<worker>-<process>``, through a :class:`PartitionSink` (the spooled
Tiled sink: a partition survives the server going away like any run). The key names the worker
and the process (a token drawn at start), so a worker restarted under the same name writes a new
partition beside its predecessor's and never deletes rows that were stored and acknowledged; the
spool is keyed the same way, so the predecessor's spooled rows are written back to the
predecessor's partition. Two writers never extend the same array, so no write can interleave
with or overwrite another.

When every frame of the run is acknowledged, one worker (the one whose claim in the broker's
key-value bucket is created first) calls :func:`merge_partitions`: it reads every partition of
the run, orders the rows by seq_num, keeps the first copy of each seq_num (a frame redelivered
after a worker died may have been stored by both the dead worker and the one that took it over:
same frame, same model, same result), writes them to ``<parent>/<run uid>`` -- the same
container, arrays and metadata as the single-process pipeline's, so
:func:`~cdinn_stream.sinks.tiled_layout.read_run` and every reader work unchanged -- marks it
``complete`` and deletes the partitions. Every frame is then stored exactly once, in seq_num
order. The merge never writes a run from no partition, and never replaces a run whose metadata
says ``complete`` (it logs and leaves it). Rows are keyed by seq_num alone, as in the
single-process layout: the pool reconstructs one stream per run (the worker refuses the frames
of a second image stream). :func:`read_pool_run` reads a run either way: the merged run once it
is complete (with the rows of any partition written back after the merge), else the partitions
merged on the fly.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..live.blocks import RefinedBlock, ResultBlock, range_seq_nums, seq_ranges
from .spooled import SpooledSink
from .tiled import RunState, TiledSink, TiledStore
from .tiled_layout import ARRAYS, frame_info_columns, read_observables

__all__ = ["PartitionStore", "PartitionSink", "merge_rows", "merge_partitions", "read_pool_run", "partitions_of",
           "parts_parent", "process_token"]

logger = logging.getLogger(__name__)


def parts_parent(parent: str) -> str:
    """The container holding the partitions of runs stored under ``parent``."""
    return f"{parent}-parts"


def process_token() -> str:
    """A token for this process (``p`` and 6 hex digits): partition keys differ between processes."""
    return f"p{secrets.token_hex(3)}"


class PartitionStore(TiledStore):
    """A :class:`~cdinn_stream.sinks.tiled.TiledStore` of partitions: run ``uid`` goes to
    ``<parent>-parts/<uid>.<worker>-<process>`` (:meth:`new_key`), never replacing a partition that
    exists. Its methods take the partition's key where a run uid would be."""

    def __init__(self, client, *, worker: str, parent: str = "cdinn", model_card: dict | None = None,
                 process: str | None = None):
        super().__init__(client, parent=parts_parent(parent), model_card=model_card)
        self.worker = worker
        self.process = process or process_token()
        self._used: set[str] = set()

    def new_key(self, run_uid: str) -> str:
        """A partition key for a run opened now: ``<uid>.<worker>-<process>`` (``-2``, ``-3``... when
        this process opens the same run again, e.g. a replay)."""
        base = f"{run_uid}.{self.worker}-{self.process}"
        key, k = base, 1
        while key in self._used:
            k += 1
            key = f"{base}-{k}"
        self._used.add(key)
        return key

    def _new(self, parent, key: str, start: dict) -> RunState:
        return RunState(parent.create_container(key, metadata={
            "raw_run_uid": key.split(".")[0], "worker": self.worker, "process": self.process, "start": start,
            "model_card": self.model_card, "complete": False}))

    def create(self, run_uid: str, start: dict) -> RunState:
        """A new partition ``run_uid`` (a key of :meth:`new_key`); one that exists is never replaced."""
        parent = self._parent_container()
        if run_uid in parent:
            raise RuntimeError(f"Tiled already holds the partition {self.parent}/{run_uid}: not replaced")
        return self._new(parent, run_uid, start)

    def reopen(self, manifest: dict, previous: RunState | None = None) -> RunState:
        """The partition the spool names (its key), with fresh handles; a partition the merge
        deleted meanwhile (or never made) is made again, with the spooled rows only."""
        key = manifest["run_uid"]
        parent = self._parent_container()
        if key in parent and manifest["written"]:
            container = parent[key]
            run = RunState(container, {k: container[k] for k in ARRAYS if k in container}, manifest["written"])
        else:
            if key in parent:  # this spool's own partition, holding none of its rows yet (maybe a failed write's)
                parent.delete_contents(key, recursive=True, external_only=False)
            run = self._new(parent, key, manifest["start"])
        if previous is not None:
            run.refined, run.n_refined = previous.refined, previous.n_refined
        return run


class PartitionSink(TiledSink):
    """The Tiled sink of one worker process of the pool: each run goes to a partition of its own
    (:class:`PartitionStore`), spooled while the server is away (the spool is keyed by the
    partition, so an earlier process's spool of the same run is kept and written back)."""

    def __init__(self, client, *, worker: str, parent: str = "cdinn", model_card: dict | None = None,
                 spool_dir: str | Path | None = None, retry_interval: float = 2.0, process: str | None = None):
        self.store: PartitionStore
        SpooledSink.__init__(self, PartitionStore(client, worker=worker, parent=parent, model_card=model_card,
                                                  process=process),
                             spool_dir=spool_dir, retry_interval=retry_interval)
        self._keys: dict[str, str] = {}  # run uid -> its partition's key

    def _part(self, block: ResultBlock | RefinedBlock):
        key = self._keys.get(block.run_uid)
        if key is None:
            raise RuntimeError(f"results for run {block.run_uid} before its start")
        return replace(block, frames=replace(block.frames, run_uid=key))

    def open_run(self, run_uid: str, start: dict) -> None:
        key = self._keys[run_uid] = self.store.new_key(run_uid)
        super().open_run(key, start)

    def write(self, result: ResultBlock) -> None:
        super().write(self._part(result))

    def spill(self, result: ResultBlock) -> None:
        super().spill(self._part(result))

    def write_refined(self, block: RefinedBlock) -> None:
        super().write_refined(self._part(block))

    def spools_run(self, run_uid: str) -> bool:
        """Whether this sink's spool holds rows of the run (of any of its partitions) not yet
        written back."""
        try:
            return any(key.startswith(f"{run_uid}.") and self.spool.manifest(key).get("server", self.store.location)
                       == self.store.location for key in self.spool.runs())  # another server's: never written here
        except (OSError, ValueError):  # the sink thread removed a spool while it was read: ask again later
            return True

    def close_run(self, run_uid: str, summary: dict) -> None:
        key = self._keys.pop(run_uid, None)
        if key is not None:
            super().close_run(key, summary)


def partitions_of(client, run_uid: str, parent: str = "cdinn") -> list:
    """The partition containers of a run (an empty list when there are none)."""
    name = parts_parent(parent)
    if name not in client:
        return []
    parts = client[name]
    return [parts[k] for k in parts if k.startswith(f"{run_uid}.")]


def _rows(container) -> dict[str, np.ndarray] | None:
    """A partition's arrays (``None`` for one that holds no frame), cut to the rows every array
    holds: a worker killed in a write leaves its arrays extended to different lengths (the rows
    past the shortest were never acknowledged: they come again, in another partition). A worker
    killed in its first write, before every array was created, leaves no whole row."""
    if "amplitude" not in container:
        return None
    missing = [k for k in ARRAYS if k not in container]
    if missing:
        logger.warning("partition %s: arrays %s never created (its first write cut short): no row of it merged",
                       getattr(container, "item", {}).get("id", "?"), missing)
        return None
    arrays = {k: np.asarray(container[k].read()) for k in ARRAYS}
    whole = min(len(v) for v in arrays.values())
    if any(len(v) != whole for v in arrays.values()):
        logger.warning("partition %s: arrays of %s rows (a write cut short): its first %d rows merged",
                       getattr(container, "item", {}).get("id", "?"), sorted({len(v) for v in arrays.values()}),
                       whole)
    return {k: v[:whole] for k, v in arrays.items()}


def merge_rows(parts: list[dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], int]:
    """One set of rows from several partitions' rows: ordered by seq_num (``frame_info`` column
    0), the first copy of each seq_num kept. Returns the rows and the duplicates dropped."""
    parts = [p for p in parts if p is not None and len(p["amplitude"])]
    if not parts:
        return {}, 0
    keys = [k for k in ARRAYS if all(k in p for p in parts)]
    rows = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    seq = rows["frame_info"][:, 0].astype(np.int64)
    order = np.argsort(seq, kind="stable")
    _, first = np.unique(seq[order], return_index=True)
    keep = order[first]
    return {k: v[keep] for k, v in rows.items()}, int(len(seq) - len(keep))


def _closed(container) -> bool:
    container.refresh() if hasattr(container, "refresh") else None
    return "stop" in container.metadata


def merge_partitions(client, run_uid: str, *, parent: str = "cdinn", close_wait: float = 5.0,
                     end: dict | None = None, chunk: int = 4096, expected: int | None = None,
                     revise: Callable[[dict[str, np.ndarray]], None] | None = None) -> dict:
    """Merge a run's partitions into ``<parent>/<run uid>`` (see the module docstring), mark it
    complete with ``end`` and delete the partitions. Waits up to ``close_wait`` s for every
    partition to be closed by its worker (a partition of a worker that died is merged as it is).
    ``revise(rows)``, if given, may change the merged rows in place before they are written (the
    worker pool recomputes their ``correlation`` against the run's first stored frame).
    Returns a summary: frames, duplicates dropped, workers, ``frames_rejected`` (the frames the
    workers' pipelines turned away, by category, as seq_num ranges: an empty frame, a malformed
    one; from the partitions' end summaries) and, given the frames ``expected`` (the stop
    document's count), those, ``frames_missing`` (expected less stored) and of them
    ``frames_lost``: missing and rejected by no worker (dropped after their last delivery, or
    the model failed on them: the workers' error lines name them), with a warning when frames
    are missing; with ``revise``, whether it ``revised`` the rows (when it raises, the rows are
    stored as they are); with ``skipped`` (why) and nothing written when there is no partition,
    or when ``<parent>/<run uid>`` is complete already."""
    target = client[parent] if parent in client else None
    if target is not None and run_uid in target and target[run_uid].metadata.get("complete"):
        logger.warning("run %s: %s/%s is complete already: not merged again (its partitions, if any, are left for "
                       "read_pool_run)", run_uid, parent, run_uid)
        return {"frames": 0, "workers": [], "skipped": "complete already"}
    parts_name = parts_parent(parent)
    deadline = time.monotonic() + close_wait
    while True:
        parts = partitions_of(client, run_uid, parent)
        open_parts = [p for p in parts if not _closed(client[parts_name][p.item["id"]])]
        if not open_parts or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    parts = [client[parts_name][p.item["id"]] for p in parts]  # read again: their metadata as they closed
    if not parts:
        logger.warning("run %s: no partition to merge (no worker stored a frame of it): nothing written", run_uid)
        return {"frames": 0, "workers": [], "skipped": "no partition"}
    if open_parts:
        logger.warning("run %s: %d partitions not closed by their workers after %s s (a worker died, or its rows wait "
                       "in its spool?): merged as they are", run_uid, len(open_parts), close_wait)
    rows, duplicates = merge_rows([_rows(p) for p in parts])
    revised = None
    if revise is not None and rows:
        try:
            revise(rows)
            revised = True
        except Exception:  # noqa: BLE001 - the rows as the workers made them are stored
            logger.warning("run %s: revising the merged rows failed: stored as the workers made them", run_uid,
                           exc_info=True)
            revised = False
    workers = sorted({p.metadata.get("worker", "?") for p in parts})
    store = TiledStore(client, parent=parent, model_card=parts[0].metadata.get("model_card"))
    run = store.create(run_uid, dict(parts[0].metadata.get("start", {})))
    n = len(rows.get("amplitude", ()))
    for lo in range(0, n, chunk):
        store.extend(run, {k: v[lo : lo + chunk] for k, v in rows.items()})
    versions = next((p.metadata.get("model_versions") for p in parts if p.metadata.get("model_versions")), [])
    stored = rows["frame_info"][:, 0].astype(np.int64) if n else np.zeros(0, np.int64)
    rejected = _rejected(parts, stored)
    summary = {"frames": n, "duplicates_dropped": duplicates, "workers": workers, "partitions": len(parts),
               "frames_rejected": {k: seq_ranges(v) for k, v in rejected.items()}}
    if revised is not None:
        summary["revised"] = revised
    if expected is not None:
        missing = max(0, int(expected) - n)
        turned_away = len(np.unique(np.concatenate([np.zeros(0, np.int64), *rejected.values()])))
        lost = max(0, missing - turned_away)
        summary.update(frames_expected=int(expected), frames_missing=missing, frames_lost=lost)
        if missing:
            logger.warning("run %s: %d of its %d frames stored: %d missing, of which %d rejected by the workers' "
                           "pipelines (%s) and %d lost (dropped after their last delivery, or the model failed on "
                           "them: see the workers' error lines)", run_uid, n, expected, missing, turned_away,
                           ", ".join(f"{k}: {len(v)}" for k, v in rejected.items()) or "none", lost)
    store.finish(run, {**(end or {}), "complete": bool(n), "model_versions": versions, "pool": summary})
    container = client[parts_name]
    for p in parts:
        container.delete_contents(p.item["id"], recursive=True, external_only=False)
    return summary


def _rejected(parts: list, stored: np.ndarray) -> dict[str, np.ndarray]:
    """The seq_nums the partitions' workers rejected, by category, less those some worker
    stored (a frame rejected by a worker whose sink then failed, stored on its redelivery)."""
    found: dict[str, list[np.ndarray]] = {}
    for p in parts:
        for category, ranges in (p.metadata.get("frames_rejected") or {}).items():
            found.setdefault(category, []).append(range_seq_nums(ranges))
    out = {k: np.setdiff1d(np.concatenate(v), stored) for k, v in found.items()}
    return {k: v for k, v in out.items() if len(v)}


def read_pool_run(client, run_uid: str, parent: str = "cdinn") -> dict[str, np.ndarray]:
    """A run of the pool in seq_num order, each frame once: the merged run when it is complete
    (with the rows of partitions written back after the merge, e.g. from a worker's spool), else
    its partitions merged now (as :func:`~cdinn_stream.sinks.tiled_layout.read_run` names them)."""
    parts = partitions_of(client, run_uid, parent)
    if parent in client and run_uid in client[parent] and client[parent][run_uid].metadata.get("complete"):
        container = client[parent][run_uid]
        merged = {k: np.asarray(container[k].read()) for k in ARRAYS if k in container}
        if not parts:
            return {"amplitude": merged["amplitude"], "phase": merged["phase"], "chi2": merged["chi2"],
                    **frame_info_columns(merged["frame_info"]), "observables": read_observables(container)}
        rows, _ = merge_rows([merged, *(_rows(p) for p in parts)])
        columns = list(container["observables"].metadata["columns"])
    else:
        rows, _ = merge_rows([_rows(p) for p in parts])
        if not rows:
            return {}
        columns = list(next(p for p in parts if "observables" in p)["observables"].metadata["columns"])
    obs = {name: rows["observables"][:, j].copy() for j, name in enumerate(columns)}
    return {"amplitude": rows["amplitude"], "phase": rows["phase"], "chi2": rows["chi2"],
            **frame_info_columns(rows["frame_info"]), "observables": obs}
