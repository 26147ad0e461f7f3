"""The layout of reconstructions in Tiled, and reading it back (no Tiled import: pure numpy).

One container per raw run holds ``amplitude`` and ``phase`` ``(N, h, w)`` float32, ``chi2``
``(N,)`` float64 (each frame's trust figure: chi^2 of the reconstruction against the measured
crop) and ``frame_info`` ``(N, 8)`` float64, one row per frame with the columns
:data:`FRAME_INFO_COLUMNS` (the integers are exact in float64; ``model_version`` indexes the
container's ``model_versions`` metadata, written at the run's end), and ``observables`` ``(N, K)``
float64, each frame's observables (:data:`cdinn_stream.core.observables.OBSERVABLES`, ``chi2``
among them) in the columns :data:`OBSERVABLE_COLUMNS` (named, with their units, in the array's
metadata; NaN where a frame has none: rows from before they were kept). :func:`read_frame_info`,
:func:`read_observables` and :func:`read_run` give them back as named arrays. The writer is
:class:`~cdinn_stream.sinks.tiled.TiledSink`.
"""

from __future__ import annotations

import numpy as np

from ..core.observables import OBSERVABLES
from ..live.blocks import ResultBlock

__all__ = ["FRAME_INFO_COLUMNS", "OBSERVABLE_COLUMNS", "ARRAYS", "result_columns", "frame_count", "frame_info_columns",
           "read_frame_info", "read_observables", "read_run", "upgrade_columns", "array_metadata"]

#: columns of the ``frame_info`` array, one row per frame
FRAME_INFO_COLUMNS = ("seq_num", "time", "crop_origin_row", "crop_origin_col", "peak_row", "peak_col", "latency_s",
                      "model_version")
#: columns of the ``observables`` array (:data:`cdinn_stream.core.observables.OBSERVABLES`)
OBSERVABLE_COLUMNS = tuple(OBSERVABLES)
#: the arrays of a run's container, all with one row per frame
ARRAYS = ("amplitude", "phase", "chi2", "frame_info", "observables")


def array_metadata(key: str) -> dict | None:
    """The metadata an array of the layout is created with (its columns, for the tables)."""
    if key == "frame_info":
        return {"columns": list(FRAME_INFO_COLUMNS)}
    if key == "observables":
        return {"columns": list(OBSERVABLE_COLUMNS), "units": [OBSERVABLES[k][0] for k in OBSERVABLE_COLUMNS]}
    return None


def observables_rows(observables: dict[str, np.ndarray], chi2: np.ndarray) -> np.ndarray:
    """``(N, K)`` float64 rows in the order of :data:`OBSERVABLE_COLUMNS` (NaN for any missing)."""
    n = len(chi2)
    rows = np.full((n, len(OBSERVABLE_COLUMNS)), np.nan)
    for j, name in enumerate(OBSERVABLE_COLUMNS):
        if name == "chi2":
            rows[:, j] = chi2
        elif name in observables:
            rows[:, j] = observables[name]
    return rows


def frame_info(seq_nums, times, origins, peaks, latency, model_version=0) -> np.ndarray:
    """``(N, 8)`` float64 rows in the order of :data:`FRAME_INFO_COLUMNS`."""
    n = len(seq_nums)
    info = np.empty((n, len(FRAME_INFO_COLUMNS)))
    info[:, 0], info[:, 1], info[:, 6], info[:, 7] = seq_nums, times, latency, model_version
    info[:, 2:4], info[:, 4:6] = np.reshape(origins, (n, 2)), np.reshape(peaks, (n, 2))
    return info


def result_columns(result: ResultBlock) -> dict[str, np.ndarray]:
    """The rows a result adds to each of :data:`ARRAYS`."""
    f = result.frames
    return {"amplitude": np.ascontiguousarray(result.amplitude, np.float32),
            "phase": np.ascontiguousarray(result.phase, np.float32),
            "chi2": np.asarray(result.chi2, np.float64),
            "frame_info": frame_info(f.seq_nums, f.times, f.origins, f.peaks, result.latency, result.model_version),
            "observables": observables_rows(result.observables, np.asarray(result.chi2, np.float64))}


def upgrade_columns(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows spooled by an earlier version in today's layout: ``chi2`` NaN where it was not kept,
    ``frame_info`` padded to :data:`FRAME_INFO_COLUMNS` (model version 0), ``observables`` NaN
    but their ``chi2``."""
    n, info = frame_count(cols), np.asarray(cols["frame_info"], np.float64)
    missing = len(FRAME_INFO_COLUMNS) - info.shape[1]
    chi2 = cols.get("chi2", np.full(n, np.nan))
    return {**cols, "chi2": chi2, "frame_info": np.pad(info, ((0, 0), (0, missing))) if missing > 0 else info,
            "observables": cols["observables"] if "observables" in cols else observables_rows({}, chi2)}


def frame_count(cols: dict[str, np.ndarray]) -> int:
    """Frames in a set of :func:`result_columns`."""
    return len(cols["amplitude"])


def frame_info_columns(info: np.ndarray) -> dict[str, np.ndarray]:
    """Named per-frame arrays from ``(N, 8)`` ``frame_info`` rows: ``seq_num`` ``(N,)`` int64,
    ``time`` ``(N,)`` float64, ``crop_origin`` and ``peak`` ``(N, 2)`` int64, ``latency_s`` ``(N,)``,
    ``model_version`` ``(N,)`` int64 (0 in runs stored before it was a column)."""
    info = np.asarray(info, np.float64)
    info = info.reshape(-1, info.shape[-1] if info.ndim == 2 else len(FRAME_INFO_COLUMNS))
    version = info[:, 7].astype(np.int64) if info.shape[1] > 7 else np.zeros(len(info), np.int64)
    return {"seq_num": info[:, 0].astype(np.int64), "time": info[:, 1].copy(),
            "crop_origin": info[:, 2:4].astype(np.int64), "peak": info[:, 4:6].astype(np.int64),
            "latency_s": info[:, 6].copy(), "model_version": version}


def read_frame_info(container) -> dict[str, np.ndarray]:
    """A stored run's per-frame metadata (see :func:`frame_info_columns`), without its images."""
    return frame_info_columns(container["frame_info"].read())


def read_observables(container) -> dict[str, np.ndarray]:
    """A stored run's observables by name, ``(N,)`` float64 each, in frame order (the columns the
    array's metadata names; an empty dict for a run stored before they were kept)."""
    if "observables" not in container:
        return {}
    node = container["observables"]
    table = np.asarray(node.read(), np.float64).reshape(-1, len(node.metadata["columns"]))
    return {name: table[:, j].copy() for j, name in enumerate(node.metadata["columns"])}


def read_run(container) -> dict[str, np.ndarray]:
    """A stored run's reconstructions: ``amplitude`` and ``phase`` ``(N, h, w)``, ``chi2`` ``(N,)``
    (NaN in runs stored before it was kept), the named per-frame metadata of
    :func:`read_frame_info` and ``observables`` (:func:`read_observables`), all in the same order."""
    info = read_frame_info(container)
    chi2 = container["chi2"].read() if "chi2" in container else np.full(len(info["seq_num"]), np.nan)
    return {"amplitude": container["amplitude"].read(), "phase": container["phase"].read(), "chi2": chi2, **info,
            "observables": read_observables(container)}
