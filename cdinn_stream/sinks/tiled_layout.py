"""The layout of reconstructions in Tiled, and reading it back (no Tiled import: pure numpy).

One container per raw run holds ``amplitude`` and ``phase`` ``(N, h, w)`` float32, ``chi2``
``(N,)`` float64 (each frame's trust figure: chi^2 of the reconstruction against the measured
crop) and ``frame_info`` ``(N, 8)`` float64, one row per frame with the columns
:data:`FRAME_INFO_COLUMNS` (the integers are exact in float64; ``model_version`` indexes the
container's ``model_versions`` metadata, written at the run's end). :func:`read_frame_info` and
:func:`read_run` give them back as named arrays. The writer is :class:`~cdinn_stream.sinks.tiled.TiledSink`.
"""

from __future__ import annotations

import numpy as np

from ..live.blocks import ResultBlock

__all__ = ["FRAME_INFO_COLUMNS", "ARRAYS", "result_columns", "frame_count", "frame_info_columns", "read_frame_info",
           "read_run", "upgrade_columns"]

#: columns of the ``frame_info`` array, one row per frame
FRAME_INFO_COLUMNS = ("seq_num", "time", "crop_origin_row", "crop_origin_col", "peak_row", "peak_col", "latency_s",
                      "model_version")
#: the arrays of a run's container, all with one row per frame
ARRAYS = ("amplitude", "phase", "chi2", "frame_info")


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
            "frame_info": frame_info(f.seq_nums, f.times, f.origins, f.peaks, result.latency, result.model_version)}


def upgrade_columns(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows spooled by an earlier version in today's layout: ``chi2`` NaN where it was not kept,
    ``frame_info`` padded to :data:`FRAME_INFO_COLUMNS` (model version 0)."""
    n, info = frame_count(cols), np.asarray(cols["frame_info"], np.float64)
    missing = len(FRAME_INFO_COLUMNS) - info.shape[1]
    return {**cols, "chi2": cols.get("chi2", np.full(n, np.nan)),
            "frame_info": np.pad(info, ((0, 0), (0, missing))) if missing > 0 else info}


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


def read_run(container) -> dict[str, np.ndarray]:
    """A stored run's reconstructions: ``amplitude`` and ``phase`` ``(N, h, w)``, ``chi2`` ``(N,)``
    (NaN in runs stored before it was kept) and the named per-frame metadata of
    :func:`read_frame_info`, all in the same order."""
    info = read_frame_info(container)
    chi2 = container["chi2"].read() if "chi2" in container else np.full(len(info["seq_num"]), np.nan)
    return {"amplitude": container["amplitude"].read(), "phase": container["phase"].read(), "chi2": chi2, **info}
