"""Tiled sink: one container per raw run, arrays that grow as batches land.

Where results go: ``client[parent][run_uid]`` -- ``parent`` is ``"cdinn"`` by default
(``"cdinn-replay"`` for replays), ``run_uid`` is the uid of the raw run's start document, so a
user who knows the raw run finds its reconstruction next to it::

    from tiled.client import from_uri
    rec = from_uri(URL, api_key=KEY)["cdinn"][raw_run_uid]
    rec["amplitude"].read(), rec["phase"].read()        # (N, h, w) float32
    rec["seq_num"].read(), rec["peak"].read()           # per-frame metadata, same order
    rec.metadata["model_card"], rec.metadata["complete"]

Arrays: ``amplitude``, ``phase`` ``(N, h, w)`` float32; ``seq_num`` ``(N,)`` int64; ``time``
``(N,)`` float64; ``crop_origin`` and ``peak`` ``(N, 2)`` int64; ``latency_s`` ``(N,)`` float64.
Each batch extends them with ``ArrayClient.patch(..., extend=True)``. The container's metadata
holds the model card, the raw run's start document, and at the end ``complete`` and counts.
"""

from __future__ import annotations

import logging

import numpy as np

from ..engine import ResultBlock

__all__ = ["TiledSink"]

logger = logging.getLogger(__name__)

_ARRAYS = ("amplitude", "phase", "seq_num", "time", "crop_origin", "peak", "latency_s")


def _columns(result: ResultBlock) -> dict[str, np.ndarray]:
    f = result.frames
    return {"amplitude": np.ascontiguousarray(result.amplitude, np.float32),
            "phase": np.ascontiguousarray(result.phase, np.float32),
            "seq_num": f.seq_nums.astype(np.int64), "time": f.times.astype(np.float64),
            "crop_origin": f.origins.astype(np.int64), "peak": f.peaks.astype(np.int64),
            "latency_s": np.asarray(result.latency, np.float64)}


class TiledSink:
    """Writes each run's reconstructions to Tiled (see the module docstring for the layout).

    Args:
        client: a tiled client container (``tiled.client.from_uri(url, api_key=...)``).
        parent: name of the container that holds one container per run.
        model_card: stored in every run's metadata.
    """

    def __init__(self, client, *, parent: str = "cdinn", model_card: dict | None = None):
        self.client = client
        self.parent_name = parent
        self.model_card = model_card or {}
        self._runs: dict[str, dict] = {}
        self._parent = None

    @classmethod
    def from_uri(cls, uri: str, *, api_key: str | None = None, **kwargs) -> TiledSink:
        """Connect to a Tiled server (``api_key`` or ``TILED_API_KEY`` from the environment)."""
        from tiled.client import from_uri

        return cls(from_uri(uri, api_key=api_key), **kwargs)

    def _parent_container(self):
        if self._parent is None:
            if self.parent_name in self.client:
                self._parent = self.client[self.parent_name]
            else:
                self._parent = self.client.create_container(self.parent_name,
                                                            metadata={"description": "cdinn-stream reconstructions"})
        return self._parent

    def open_run(self, run_uid: str, start: dict) -> None:
        parent = self._parent_container()
        if run_uid in parent:  # e.g. a second replay of the same run
            logger.warning("Tiled already holds %s/%s: replacing it", self.parent_name, run_uid)
            parent.delete_contents(run_uid, recursive=True, external_only=False)
        container = parent.create_container(run_uid, metadata={
            "raw_run_uid": run_uid, "start": start, "model_card": self.model_card, "complete": False})
        self._runs[run_uid] = {"container": container, "arrays": {}, "n": 0}

    def write(self, result: ResultBlock) -> None:
        run = self._runs.get(result.run_uid)
        if run is None:
            raise RuntimeError(f"results for run {result.run_uid} before its start")
        cols = _columns(result)
        if not run["arrays"]:
            for key in _ARRAYS:
                run["arrays"][key] = run["container"].write_array(cols[key], key=key)
        else:
            for key in _ARRAYS:
                run["arrays"][key].patch(cols[key], offset=(run["n"],), extend=True)
        run["n"] += len(cols["seq_num"])

    def close_run(self, run_uid: str, summary: dict) -> None:
        run = self._runs.pop(run_uid, None)
        if run is None:
            return
        stop = summary.get("stop", {})
        run["container"].update_metadata({"complete": True, "frames": run["n"],
                                          "exit_status": stop.get("exit_status"), "stop": stop})
